"""Request bodies of /v1/chat/completions and /v1/completions, as OpenAI and vLLM define them,
and their mapping onto `SamplingParams`.

Parsing is pydantic (types only); ranges are checked once, by `SamplingParams`, whose
ValueError names the field, mapped back here to the request's parameter name. Unknown fields
are ignored, as OpenAI and vLLM do, and logged. Features this server does not implement
(beam search, bad_words, suffix, best_of > n) are refused with a 400 naming the parameter
rather than silently ignored; docs/api-fields.md lists every field and what it does here
(tests/proxy/test_api_fields.py walks that table). Tool calling: proxy/tools.py.

Prompt logprobs: vLLM's `prompt_logprobs`, and completions `echo` with `logprobs` (whose
logprobs then start with the prompt's, as the legacy API and lm-eval expect); completions
`max_tokens: 0` with `echo` returns the prompt alone (the engine draws one token, which the
client does not get). Streams refuse `prompt_logprobs` (vLLM's rule) but take echo +
logprobs. A completion's `prompt` may be a batch (strings or token-id lists): choice j of
prompt i has index i * n + j.

Structured outputs: OpenAI's `response_format` (json_object, json_schema) and vLLM's
`structured_outputs` ({json | regex | choice | grammar | json_object}) and older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` become one
`StructuredOutputs` constraint; two at once, or a grammar that does not compile (checked
here with llguidance, cached), is a 400 naming the parameter.

Defaults (vLLM 0.12): temperature/top_p/top_k/min_p/repetition_penalty null -> 1/1/0/0/1;
max_tokens 16 for completions, the rest of max_model_len for chat.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from pdserve.common.grammar import grammar_text
from pdserve.common.params import SamplingParams, StructuredOutputs
from pdserve.proxy.errors import OpenAIError

logger = logging.getLogger(__name__)

MAX_N = 128  # choices per request; beyond this a client is better served by separate requests
MAX_PROMPTS = 256  # prompts in one completion request (LangChain sends 20 at a time)
COMPLETION_DEFAULT_MAX_TOKENS = 16


# Fields of vLLM's or OpenAI's requests that this server does not implement and that would
# change the answer: refused by name (400) when set to anything but null, false, empty or
# the inert value below, rather than ignored. docs/api-fields.md lists every field.
NOT_IMPLEMENTED = {
    "length_penalty": "it applies to beam search, which is not supported",
    "logits_processors": "custom logits processors are not supported",
    "chat_template": "the server's chat template is used (start it with --chat-template)",
    "documents": "the chat template gets no documents",
    "mm_processor_kwargs": "the served models take text only",
    "multi_modal_data": "the served models take text only",
    "prompt_embeds": "prompts are text or token ids",
    "kv_transfer_params": "the server moves KV itself (prefill/decode disaggregation)",
    "guided_whitespace_pattern": "JSON constraints use fixed separators",
    "functions": "use tools",
    "function_call": "use tool_choice",
    "prediction": "predicted outputs are not supported",
    "audio": "the served models produce text only",
    "modalities": "the served models produce text only",
    "vllm_xargs": "no extension takes extra arguments",
}
INERT_VALUES: dict[str, Any] = {"length_penalty": 1.0, "modalities": ["text"]}
# Accepted and without effect here, by design (docs/api-fields.md says why); not logged.
IGNORED = frozenset({
    "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
    "reasoning_effort", "verbosity", "request_id", "spaces_between_special_tokens",
    "guided_decoding_backend", "web_search_options",
})


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingRequest(BaseModel):
    """Fields both endpoints share (OpenAI's and vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # unknown fields: ignored, logged

    model: str | None = None
    n: int = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool | None = None  # vLLM extra: token ids in every choice
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprob tokens as "token_id:N"
    user: str | None = None  # accepted, unused
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    priority: int = 0  # vLLM's: lower is served first when the proxy's queue holds requests
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared within one salt only
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's
    guided_json: str | dict[str, Any] | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: every draw is one of these
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens
    bad_words: list[str] | None = None  # vLLM's: refused (not implemented), not ignored

    def logit_bias_ids(self) -> dict[int, float] | None:
        """logit_bias with its keys as token ids; 400 for a key that is not one."""
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                tid = int(key)
            except ValueError:
                tid = -1
            if tid < 0:
                raise OpenAIError(f"logit_bias: {key!r} is not a token id", param="logit_bias")
            out[tid] = value
        return out

    def truncate(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt after `truncate_prompt_tokens` (vLLM's: its last k tokens; -1: the
        model's length)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return prompt_ids
        k = max_model_len if k == -1 else k
        return prompt_ids[-k:] if k and len(prompt_ids) > k else prompt_ids

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def check_common(self) -> None:
        """Request-level rules that SamplingParams cannot see."""
        extra = self.extra_fields()
        if extra:
            for name, why in NOT_IMPLEMENTED.items():
                if name in extra and extra[name] not in (None, False, [], {}, "") \
                        and extra[name] != INERT_VALUES.get(name):
                    raise OpenAIError(f"{name} is not supported: {why}", param=name)
            unknown = sorted(set(extra) - IGNORED)
            if unknown:
                logger.info("ignored unknown request fields: %s", unknown)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options can only be set when stream is true",
                              param="stream_options")
        if not 1 <= self.n <= MAX_N:
            raise OpenAIError(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        if self.use_beam_search:
            raise OpenAIError("beam search is not supported", param="use_beam_search")
        if self.prompt_logprobs is not None and self.stream:
            raise OpenAIError("prompt_logprobs are not available when stream is true",
                              param="prompt_logprobs")
        if self.bad_words:
            raise OpenAIError("bad_words is not supported", param="bad_words")
        k = self.truncate_prompt_tokens
        if k is not None and (k < -1 or k == 0):
            raise OpenAIError("truncate_prompt_tokens must be -1 (the model's length) or >= 1",
                              param="truncate_prompt_tokens")

    def structured(self) -> StructuredOutputs | None:
        """The one output constraint the request asks for (None: free text); OpenAIError
        (400) for two, a malformed one, or a grammar that does not compile."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(("response_format", {"json": '{"type": "object"}'}))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise OpenAIError("response_format json_schema needs json_schema.schema "
                                      "(a JSON schema object)", param="response_format")
                found.append(("response_format", {"json": json.dumps(schema)}))
            elif kind != "text":
                raise OpenAIError(f"response_format type {kind!r} is not one of text, "
                                  "json_object, json_schema", param="response_format")
        so = self.structured_outputs
        if so is not None:
            so = {k: v for k, v in so.items() if v not in (None, False)}
            if so.pop("json_object", None):
                so["json"] = '{"type": "object"}'
            keys = sorted(set(so) & {"json", "regex", "choice", "grammar"})
            if len(keys) != 1 or set(so) - set(keys) - {"disable_any_whitespace",
                                                        "disable_additional_properties",
                                                        "whitespace_pattern"}:
                raise OpenAIError("structured_outputs takes one of json, regex, choice, "
                                  "grammar, json_object", param="structured_outputs")
            found.append(("structured_outputs", {keys[0]: so[keys[0]]}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append((name, {key: value}))
        if not found:
            return None
        if len(found) > 1:
            raise OpenAIError(f"{found[0][0]} and {found[1][0]} both constrain the output: "
                              "send one", param=found[1][0])
        param, spec = found[0]
        if isinstance(spec.get("json"), dict):
            spec["json"] = json.dumps(spec["json"])
        try:
            out = StructuredOutputs(**spec)
            _compiles(out)
        except (ValueError, TypeError) as e:
            raise OpenAIError(f"{param}: {e}", param=param) from e
        return out

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (vLLM's continuous_usage_stats, with include_usage)."""
        return self.include_usage and bool(self.stream_options
                                           and self.stream_options.continuous_usage_stats)

    # ---- SamplingParams ------------------------------------------------------------------

    def _param_name(self, field: str) -> str:
        return field

    def _num_logprobs(self) -> int | None:
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def sampling_params(self, max_tokens: int | None, seed: int | None) -> SamplingParams:
        """The engine's params; a bad value raises OpenAIError(400) naming the parameter."""
        try:
            return SamplingParams(
                n=self.n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                repetition_penalty=1.0 if self.repetition_penalty is None
                else self.repetition_penalty,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=seed,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                logprobs=self._num_logprobs(),
                structured=self.structured(),
                allowed_token_ids=self.allowed_token_ids,
                prompt_logprobs=self._prompt_logprobs(),
                logit_bias=self.logit_bias_ids(),
            )
        except ValueError as e:
            m = re.match(r"SamplingParams\.(\w+) (.*)", str(e), re.S)
            if m is None:
                raise OpenAIError(str(e)) from e
            param = self._param_name(m.group(1))
            raise OpenAIError(f"{param} {m.group(2)}", param=param) from e


def _template_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return call
        return {**call, "function": {**fn, "arguments": args}}
    return call


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_call_id, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow")

    # the roles OpenAI's API defines; anything else is a client error, not template input
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as the chat template sees it: content parts joined into one string
        (newline-separated, as vLLM does for string-content templates)."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    param = f"messages.{index}.content.{j}"
                    raise OpenAIError(f"{param}: only text content parts are supported, got "
                                      f"type {part.get('type')!r}", param=param)
                texts.append(part["text"])
            content = "\n".join(texts)
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        out["content"] = content if content is not None else ""
        # templates (Llama 3.1's, Hermes') read a call's arguments as a mapping, while
        # OpenAI's messages carry them as JSON text: decode them, as vLLM does
        calls = out.get("tool_calls")
        if isinstance(calls, list):
            out["tool_calls"] = [_template_call(c) for c in calls]
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; "required" may return several
    echo: bool = False  # vLLM's: an assistant last message's text starts the reply
    # the server's reading of tools + tool_choice (proxy/tools.py), set before the params
    _tool_plan: Any = PrivateAttr(default=None)

    def structured(self) -> StructuredOutputs | None:
        """The output constraint: response_format and friends, or the tool plan's schema
        (a named function's parameters, or the "required" array); both at once is a 400."""
        base = super().structured()
        schema = self._tool_plan.schema() if self._tool_plan is not None else None
        if schema is None:
            return base
        if base is not None:
            raise OpenAIError("tool_choice and a response format both constrain the output: "
                              "send one", param="tool_choice")
        try:
            spec = StructuredOutputs(json=json.dumps(schema))
            _compiles(spec)
        except ValueError as e:
            raise OpenAIError(f"tools: {e}", param="tools") from e
        return spec

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", param="top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise OpenAIError("add_generation_prompt and continue_final_message cannot both be "
                              "true", param="continue_final_message")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def _param_name(self, field: str) -> str:
        if field == "logprobs":
            return "top_logprobs"
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return field

    def _num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]

    def echo_text(self, messages: list[dict[str, Any]]) -> str:
        """With `echo`, the text the reply starts with: the last message's, when it is the
        assistant's (the role of the reply), as vLLM does; else nothing."""
        if not self.echo or messages[-1].get("role") != "assistant":
            return ""
        return str(messages[-1].get("content") or "")


PromptInput = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError("max_tokens 0 needs echo (the prompt and its logprobs alone); "
                              "otherwise it must be >= 1", param="max_tokens")
        if self.max_tokens == 0 and self.min_tokens:
            raise OpenAIError("min_tokens must be 0 when max_tokens is 0", param="min_tokens")

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) is the whole answer."""
        return bool(self.echo) and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list, or a batch of either (MAX_PROMPTS at
        most); 400 for an empty one, naming its place."""
        p = self.prompt
        batch = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
        if len(batch) > MAX_PROMPTS:
            raise OpenAIError(f"prompt: at most {MAX_PROMPTS} prompts in one request",
                              param="prompt")
        for i, one in enumerate(batch):
            if (isinstance(one, list) and not one) or one == "":
                where = "prompt" if len(batch) == 1 else f"prompt.{i}"
                raise OpenAIError(f"{where}: the prompt is empty", param=where)
        return batch  # type: ignore[return-value]

    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        """vLLM's prompt_logprobs; echo with logprobs asks for them too (at least as many
        top entries as logprobs)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs


@functools.lru_cache(maxsize=256)
def _compiles(spec: StructuredOutputs) -> str:
    return grammar_text(spec)


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; errors become OpenAIError(400) naming the parameter."""
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object", param=None)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from e
    req.check()
    return req


def validation_error(errors: list[Any]) -> OpenAIError:
    """The first pydantic error as an OpenAI 400 (param = its dotted location)."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # a union's branch names (str, list[int], ...) are not parameters
    loc = [x for x in loc if not re.fullmatch(r"(str|int|list\[.*\]|dict\[.*\]|function-.*)", x)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    return OpenAIError(f"{param}: {msg}" if param else msg, param=param)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise OpenAIError("send exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        if any(t < 0 for t in self.tokens):
            raise OpenAIError("tokens: token ids must be >= 0", param="tokens")
