"""The OpenAI-compatible HTTP surface over any `Backend`: `create_app(backend, ...)`.

A completion request: read the JSON body (400 unless `application/json`; 413 when too
large; strings UTF-8 can encode) -> pydantic request (400 naming the parameter) -> model
name (404) -> chat template and tokenization in a worker thread -> the validator against the
served model (`validation.py`: token ids, stop lists, max_tokens vs max_model_len, sampling
ranges; 400 naming the parameter) -> `SamplingParams` with a seed always set (a random 63-bit
one when the client sent none, so retries reproduce) -> `Generation.start()` (a refused
request is still a plain 400/503) -> JSON body, or SSE (`data: {...}` chunks, usage chunk,
`data: [DONE]`). A client that disconnects at any point cancels the work and the backend
aborts the request.

Routes: POST /v1/chat/completions, /v1/completions; GET /v1/models; POST /tokenize,
/detokenize; GET /health (200 / 503, the backend's report as JSON), /version; GET|POST
/ping and POST /invocations (SageMaker). /v1/* and /invocations need the API key when one
is set (`auth.py`); /tokenize, /detokenize and the probes stay open. Token-ids-only mode
(backend.tokenizer is None): completions with token-id prompts work and return `text: ""`
with `token_ids` in each choice; text prompts, chat, stop strings and /tokenize get a 400 that says why.

The generation routes are served by `fast_path.FastPath` in front of this FastAPI app (the
same `OpenAIServer` calls, without the framework's layers); the routes below still answer
what it hands over (cross-origin requests) and every app made with `fast_path=False`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive

from pdserve.common import __version__
from pdserve.common.logs import Throttled
from pdserve.proxy.access_log import AccessLogMiddleware
from pdserve.proxy.auth import APIKeyMiddleware, APIKeys, resolve_api_keys
from pdserve.proxy.backend import Backend, GenerationRequest
from pdserve.proxy.errors import OpenAIError, install_error_handlers, model_not_found
from pdserve.proxy.formatting import ResponseFormatter, models_response
from pdserve.proxy.middleware import BodyLimitMiddleware, RequestIdMiddleware
from pdserve.proxy.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from pdserve.proxy.serving import Generation, GenerationGroup, collect
from pdserve.proxy.streaming import ClientDisconnected, DisconnectWatch, SSEResponse, sse_stream
from pdserve.proxy.tokenization import ChatTemplateError, ProxyTokenizer
from pdserve.proxy.tools import ToolPlan, ToolStream, plan_tools
from pdserve.proxy.validation import check_strings, validate

logger = logging.getLogger(__name__)
flood = Throttled(logger)
T = TypeVar("T")

_seed_source = random.SystemRandom()
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode
READY_WAIT_S = 10.0
NO_TOKENIZER = ("this server has no tokenizer (token-ids-only mode): {what}; send token ids "
                "as the prompt of /v1/completions")


def decode_json(content_type: str, raw: bytes) -> Any:
    """The decoded JSON body; 400 for another content type, malformed JSON or a string
    UTF-8 cannot encode."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError("Unsupported Media Type: Only 'application/json' is allowed")
    try:  # strict and fast: valid UTF-8, no lone surrogates, no NaN: nothing more to check
        return _decode_json(raw)
    except (msgspec.MsgspecError, RecursionError):
        pass  # the standard library decides: its error message, or what it accepts (NaN)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the request body is not valid JSON: {e}") from e
    except RecursionError:
        raise OpenAIError("the request body nests too deeply") from None
    check_strings(data)
    return data


async def read_json(request: Request) -> Any:
    """The decoded JSON body of a framework request (`decode_json`)."""
    return decode_json(request.headers.get("content-type", ""), await request.body())


# Prompts up to this many characters are templated and tokenized on the event loop: a worker
# thread's round trip costs more than the work (~250 µs against ~80 µs for 256 characters
# on the development VM); longer ones go to a thread, where the Rust tokenizer releases the
# GIL and the streams on the loop keep flowing.
INLINE_TEXT_CHARS = 512


async def _off_loop(num_chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` here for a short text, else in a worker thread."""
    if num_chars <= INLINE_TEXT_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


class CompactJSONResponse(JSONResponse):
    """JSONResponse rendered by msgspec: the same compact UTF-8 JSON, several times faster."""

    generation: Generation | None = None  # the request's, for the access log

    def render(self, content: Any) -> bytes:
        return _encode_json(content)


class OpenAIServer:
    """Request handling shared by the routes; one per app."""

    def __init__(self, backend: Backend, served_model_name: str | Sequence[str] | None,
                 tool_call_parser: str | None = None):
        """`tool_call_parser`: the parser of "auto" tool choice (proxy/tools.py), None: the
        server takes no "auto" tool choice."""
        self.backend = backend
        self.tool_call_parser = tool_call_parser
        names = [served_model_name] if isinstance(served_model_name, str) else \
            list(served_model_name or ())
        # every name a client may ask for (vLLM's --served-model-name takes several); the
        # first answers /v1/models first and names responses to a request without one
        self.model_names = list(dict.fromkeys(names)) or [backend.model_name]
        self.model_name = self.model_names[0]
        self.tokenizer = ProxyTokenizer(backend.tokenizer) if backend.tokenizer is not None \
            else None
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name and name not in self.model_names:
            raise model_not_found(name)

    def need_tokenizer(self, what: str, param: str | None) -> ProxyTokenizer:
        if self.tokenizer is None:
            raise OpenAIError(NO_TOKENIZER.format(what=what), param=param)
        return self.tokenizer

    # ---- completions ---------------------------------------------------------------------

    async def chat(self, rid: str, receive: Receive, data: Any) -> Response:
        """`rid`: the request's id (X-Request-Id); `receive`: its ASGI receive, read to the
        body's end (a disconnect watch reads it from here on)."""
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, data)
        self.check_model(req.model)
        tok = self.need_tokenizer("chat completions need a chat template", "messages")
        plan = plan_tools(req.tools, req.tool_choice, auto_parser=self.tool_call_parser)
        req._tool_plan = plan
        req.sampling_params(req.requested_max_tokens(), req.seed)  # params first, then work
        messages = req.template_messages()
        try:
            prompt_ids = await _off_loop(
                sum(len(str(m.get("content") or "")) for m in messages),
                tok.apply_chat_template, messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs, tools=req.tools)
        except ChatTemplateError as e:
            raise OpenAIError(str(e), param="messages") from e
        echo = req.echo_text(messages)
        return await self._run(rid, receive, req, "chatcmpl", [prompt_ids], "messages",
                               [echo] if echo else [], tools=plan)

    async def completion(self, rid: str, receive: Receive, data: Any) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, data)
        self.check_model(req.model)
        prompts = req.prompts()
        if req.stop_list():
            self.need_tokenizer("stop strings need one (stop_token_ids do not)", "stop")
        req.sampling_params(None, req.seed)
        all_ids: list[list[int]] = []
        echoes: list[str] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                tok = self.need_tokenizer("a text prompt needs one", "prompt")
                all_ids.append(await _off_loop(len(prompt), tok.encode, prompt,
                                               req.add_special_tokens))
                echoes.append(prompt)
            else:
                all_ids.append(list(prompt))
                text = ""
                if req.echo and self.tokenizer is not None:
                    text = await asyncio.to_thread(self.tokenizer.decode, all_ids[-1],
                                                   req.skip_special_tokens)
                echoes.append(text)
        return await self._run(rid, receive, req, "cmpl", all_ids, "prompt",
                               echoes if req.echo else [])

    async def _run(self, rid: str, receive: Receive,
                   req: ChatCompletionRequest | CompletionRequest, prefix: str,
                   prompts: list[list[int]], prompt_param: str, echo: list[str],
                   tools: ToolPlan | None = None) -> Response:
        """`prompts`: one, or a completion's batch (choice j of prompt i: index i * n + j);
        `echo`: per prompt, the text its choices start with (or none)."""
        # a proxy just started serves before its workers' first health checks: wait a little
        if not await self.backend.wait_ready(READY_WAIT_S):
            why = (await self.health_report()).get("serves") or "no worker is admitted"
            flood.warning("not ready", "503: no worker can serve yet (%s); see /health", why)
            raise OpenAIError(f"no worker can serve yet ({why}): see /health",
                              status_code=503)
        response_id = f"{prefix}-{rid}"
        batched = len(prompts) > 1
        drop_output = isinstance(req, CompletionRequest) and req.echo_only
        gens = []
        for i, ids in enumerate(prompts):
            ids = req.truncate(ids, self.backend.max_model_len)
            prompts[i] = ids
            seed = req.seed if req.seed is not None else _seed_source.getrandbits(63)
            params = validate(req, ids, f"{prompt_param}.{i}" if batched else prompt_param,
                              max_model_len=self.backend.max_model_len,
                              vocab_size=self.backend.vocab_size, seed=seed)
            # unique inside the backend even when a client reuses its X-Request-Id
            gen_req = GenerationRequest(f"{response_id}-{i}-{os.urandom(4).hex()}" if batched
                                        else f"{response_id}-{os.urandom(4).hex()}", ids, params,
                                        priority=req.priority, cache_salt=req.cache_salt)
            gens.append(Generation(self.backend, gen_req, self.tokenizer, stop=req.stop_list(),
                                   include_stop_str_in_output=req.include_stop_str_in_output,
                                   skip_special_tokens=req.skip_special_tokens,
                                   index_offset=i * req.n, drop_output=drop_output))
        gen: Generation | GenerationGroup = gens[0] if not batched else GenerationGroup(gens)
        fmt = ResponseFormatter(
            kind="chat" if prefix == "chatcmpl" else "completion", response_id=response_id,
            model=req.model if req.model in self.model_names else self.model_name,
            tokenizer=self.tokenizer, num_top_logprobs=params.logprobs,
            return_token_ids=bool(req.return_token_ids) or self.tokenizer is None,
            prompts=prompts, n=req.n, include_usage=req.include_usage,
            continuous_usage=req.continuous_usage,
            tools=None if tools is None else ToolStream(tools), echo=echo,
            echo_logprobs=bool(req.echo) and isinstance(req, CompletionRequest)
            and req.logprobs is not None,
            prompt_logprobs=req.prompt_logprobs is not None,
            tokens_as_ids=bool(req.return_tokens_as_token_ids))

        async def start() -> None:
            await gen.start()
            fmt.set_prompt_logprobs([g.prompt_logprobs for g in gens])

        # one task watches for the client's disconnect, from here to the stream's end
        watch: DisconnectWatch | None = DisconnectWatch(receive)
        try:
            if req.stream:
                await watch.run(start())
                response = SSEResponse(sse_stream(gen, fmt), on_close=gen.aclose,
                                       watch=watch)
                response.generation = gen  # for the access log
                watch = None  # the response closes it
                return response

            async def whole() -> dict[str, Any]:
                await start()
                choices = await collect(gen)
                return fmt.response(choices, gen.num_completion_tokens)

            body = CompactJSONResponse(await watch.run(whole()))
            body.generation = gen  # for the access log
            return body
        except ClientDisconnected:
            logger.info("request %s: client disconnected before the response", rid)
            return Response(status_code=499)
        finally:
            if watch is not None:
                await watch.close()

    async def invocation(self, rid: str, receive: Receive, data: Any) -> Response:
        """SageMaker's /invocations: a chat body (`messages`) or a completion (`prompt`)."""
        if isinstance(data, dict) and "messages" in data:
            return await self.chat(rid, receive, data)
        if isinstance(data, dict) and "prompt" in data:
            return await self.completion(rid, receive, data)
        raise OpenAIError("Cannot find suitable handler for request. Expected one of: "
                          "['ChatCompletionRequest', 'CompletionRequest']")

    # ---- tokenizer endpoints -------------------------------------------------------------

    async def tokenize(self, data: Any) -> dict[str, Any]:
        req: TokenizeRequest = parse_request(TokenizeRequest, data)
        self.check_model(req.model)
        tok = self.need_tokenizer("/tokenize needs one", "prompt")
        if req.messages is not None:
            msgs = [m.for_template(i) for i, m in enumerate(req.messages)]
            try:
                text = await asyncio.to_thread(
                    tok.render_chat, msgs, add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                    chat_template_kwargs=req.chat_template_kwargs)
            except ChatTemplateError as e:
                raise OpenAIError(str(e), param="messages") from e
            ids = await asyncio.to_thread(tok.encode, text, bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(tok.encode, req.prompt or "", add)
        return {"count": len(ids), "max_model_len": self.backend.max_model_len, "tokens": ids,
                "token_strs": [tok.token_text(t) for t in ids] if req.return_token_strs else None}

    async def detokenize(self, data: Any) -> dict[str, Any]:
        req: DetokenizeRequest = parse_request(DetokenizeRequest, data)
        self.check_model(req.model)
        tok = self.need_tokenizer("/detokenize needs one", "tokens")
        vocab = len(tok.tokenizer)
        if any(t >= vocab for t in req.tokens):
            raise OpenAIError(f"tokens: token ids must be < {vocab}", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, req.tokens)}

    async def health_report(self) -> dict[str, Any]:
        """The backend's health snapshot ({"healthy": bool, ...}); unhealthy if it fails."""
        try:
            report = dict(await self.backend.health())
        except Exception as e:
            logger.exception("backend health check failed")
            return {"healthy": False, "reason": f"health check failed: {e}"}
        report["healthy"] = bool(report.get("healthy", False))
        return report

    async def healthy(self) -> bool:
        return (await self.health_report())["healthy"]


def create_app(backend: Backend, *, api_keys: Sequence[str] = (),
               served_model_name: str | Sequence[str] | None = None,
               max_body_bytes: int = 4 << 20, fast_path: bool = True,
               access_log: bool = False, tool_call_parser: str | None = None) -> FastAPI:
    """The app over `backend` (owned by the caller, who closes it). `api_keys` empty: the
    PDSERVE_API_KEY environment variable, if set, is the one key; none: no auth.
    `fast_path`: the generation routes answered in front of the framework
    (`fast_path.FastPath`, which behaves as the FastAPI app for everything else); False:
    the plain FastAPI app. `access_log`: a line per request (`access_log.py`).
    `tool_call_parser`: the parser of "auto" tool choice (proxy/tools.py)."""
    server = OpenAIServer(backend, served_model_name, tool_call_parser)
    keys = resolve_api_keys(api_keys)
    app = FastAPI(title="pdserve", version=__version__)
    app.state.server = server
    install_error_handlers(app)
    # added last = outermost: every response, 401 and 413 included, gets X-Request-Id
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_keys=keys)
    app.add_middleware(RequestIdMiddleware)
    if access_log:
        app.add_middleware(AccessLogMiddleware)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request.state.request_id, request.receive,
                                 await read_json(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completion(request.state.request_id, request.receive,
                                       await read_json(request))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models_response(server.model_names, root=backend.model_path,
                               max_model_len=backend.max_model_len, created=server.created)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await server.tokenize(await read_json(request))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await server.detokenize(await read_json(request))

    @app.get("/health")
    async def health() -> Response:
        # 200/503 for probes; the body says why (e.g. workers refused, and the reason)
        report = await server.health_report()
        return JSONResponse(report, status_code=200 if report["healthy"] else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    # SageMaker probes /ping with GET (and some clients with POST): one handler, one schema
    # operation per method (the same operation id twice is a broken /openapi.json)
    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")
    async def ping() -> Response:
        return Response(status_code=200 if await server.healthy() else 503)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await server.invocation(request.state.request_id, request.receive,
                                       await read_json(request))

    if not fast_path:
        return app
    from pdserve.proxy.fast_path import FastPath

    return FastPath(app, server, api_keys=APIKeys(keys),  # type: ignore[return-value]
                    max_body_bytes=max_body_bytes, access_log=access_log)
