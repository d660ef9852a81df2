"""Response bodies and SSE chunks in the shapes of the OpenAI OpenAPI description:
`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`,
`CreateCompletionResponse` (streamed and not), `ListModelsResponse`, `CompletionUsage`.

vLLM's extras ride along where its clients expect them: `stop_reason` in every finished
choice; `token_ids` (and `prompt_token_ids`) in choices when the request set
`return_token_ids` or the server has no tokenizer (token-ids-only mode, where `text` is "");
`prompt_logprobs` (completions: in each choice; chat: in the body) when asked for; logprob
tokens as "token_id:N" with `return_tokens_as_token_ids`; usage in
every chunk with `continuous_usage_stats`. A completion of a batch of prompts answers
choice j of prompt i at index i * n + j, usage summed over the prompts. Completions with
echo start each choice with its prompt's text (and, with logprobs, the prompt's logprobs:
the first token's is null, nothing predicts it); chat with echo starts with the last
message's text when that is the assistant's.
Logprob values of -inf (masked tokens) become -9999.0, OpenAI's "very unlikely".
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from pdserve.common.wire import Logprob
from pdserve.proxy.serving import ChoiceResult, ChoiceUpdate
from pdserve.proxy.tokenization import ProxyTokenizer
from pdserve.proxy.tools import ToolStream

VERY_UNLIKELY = -9999.0
DONE = b"data: [DONE]\n\n"


_json = msgspec.json.Encoder()


def sse(obj: dict[str, Any]) -> bytes:
    """One SSE event, as the bytes sent; compact JSON, UTF-8 as is (msgspec)."""
    return b"data: " + _json.encode(obj) + b"\n\n"


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def _lp(value: float) -> float:
    return value if math.isfinite(value) else VERY_UNLIKELY


class LogprobFormatter:
    """Token strings, bytes and top-N lists of logprob entries, for both endpoints."""

    def __init__(self, tokenizer: ProxyTokenizer | None, num_top: int, as_ids: bool = False):
        """`as_ids`: tokens named "token_id:N" (vLLM's return_tokens_as_token_ids; always so
        in token-ids-only mode)."""
        self.tok = None if as_ids else tokenizer
        self.bytes_tok = tokenizer
        self.num_top = num_top

    def text(self, token_id: int) -> str:
        return self.tok.token_text(token_id) if self.tok is not None else f"token_id:{token_id}"

    def bytes(self, token_id: int) -> list[int] | None:
        return self.bytes_tok.token_bytes(token_id) if self.bytes_tok is not None else None

    def top(self, entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
        """The `num_top` most likely tokens of a position, most likely first."""
        ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))
        return [(t, lp) for t, lp in ranked if lp.rank <= self.num_top][:self.num_top]

    def chat(self, token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> list[dict[str, Any]]:
        """`ChatCompletionTokenLogprob` entries, one per token."""
        out = []
        for tid, entries in zip(token_ids, logprobs):
            out.append({
                "token": self.text(tid), "logprob": _lp(entries[tid].logprob),
                "bytes": self.bytes(tid),
                "top_logprobs": [{"token": self.text(t), "logprob": _lp(lp.logprob),
                                  "bytes": self.bytes(t)} for t, lp in self.top(entries)],
            })
        return out


class CompletionLogprobs:
    """The legacy `logprobs` object of one completion choice; keeps the running text offset
    so streamed chunks continue where the last one ended."""

    def __init__(self, fmt: LogprobFormatter, start_offset: int = 0):
        self.fmt = fmt
        self.offset = start_offset

    def build(self, token_ids: list[int],
              entries: Sequence[dict[int, Logprob] | None] | None) -> dict[str, Any]:
        """The object for these tokens (output, or the prompt's with echo): the token's own
        logprob and, as the legacy API reports them, the top-N with it; null for a position
        without an entry (a prompt's first token, which nothing predicts)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for i, tid in enumerate(token_ids):
            s = self.fmt.text(tid)
            e = entries[i] if entries is not None and i < len(entries) else None
            tokens.append(s)
            token_lps.append(None if e is None or tid not in e else _lp(e[tid].logprob))
            tops.append(None if e is None else
                        {self.fmt.text(t): _lp(lp.logprob) for t, lp in e.items()})
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}


def _joined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


def vllm_prompt_logprobs(entries: Sequence[dict[int, Logprob] | None],
                         tok: ProxyTokenizer | None) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null or {token id: {logprob, rank,
    decoded_token}}."""
    def one(t: int, lp: Logprob) -> dict[str, Any]:
        return {"logprob": _lp(lp.logprob), "rank": lp.rank,
                "decoded_token": tok.token_text(t) if tok is not None else None}
    return [None if e is None else {str(t): one(t, lp) for t, lp in e.items()} for e in entries]


class ResponseFormatter:
    """Bodies of one request: its id, creation time, model name and options."""

    def __init__(self, *, kind: str, response_id: str, model: str,
                 tokenizer: ProxyTokenizer | None, num_top_logprobs: int | None,
                 return_token_ids: bool, prompts: list[list[int]], n: int = 1,
                 include_usage: bool = False, continuous_usage: bool = False,
                 tools: ToolStream | None = None, echo: Sequence[str] = (),
                 echo_logprobs: bool = False, prompt_logprobs: bool = False,
                 tokens_as_ids: bool = False):
        """`prompts`: the request's prompts (several: a batched completion, whose choice
        index i * n + j is prompt i's choice j). `tools`: the request's tool plan (chat),
        whose calls replace the text. `echo`: per prompt, the text each choice starts with;
        `echo_logprobs`: a completion's logprobs start with the prompt's;
        `prompt_logprobs`: vLLM's field in the answer. Prompt logprobs come from
        `set_prompt_logprobs` once the generation started."""
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be chat or completion, got {kind!r}")
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.tok = tokenizer
        self.logprobs = None if num_top_logprobs is None else LogprobFormatter(
            tokenizer, num_top_logprobs, as_ids=tokens_as_ids)
        self.return_token_ids = return_token_ids
        self.prompts = prompts
        self.prompt_token_ids = prompts[0]
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.n = n
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.tools = tools
        self.echo = list(echo)
        self.echo_logprobs = echo_logprobs
        self.want_prompt_logprobs = prompt_logprobs
        self.prompt_logprobs: list[list[dict[int, Logprob] | None] | None] = [None] * len(prompts)
        self._completion_lps: dict[int, CompletionLogprobs] = {}
        # every chunk of a stream starts the same: `data: {"id":...,"choices":[` encoded once
        head = _json.encode(self._chunk_head())
        self._chunk_start = b"data: " + head[:-1] + b',"choices":['

    def set_prompt_logprobs(self, per_prompt: Sequence[list[dict[int, Logprob] | None] | None]
                            ) -> None:
        self.prompt_logprobs = list(per_prompt)

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _extras(self, choice: dict[str, Any], token_ids: list[int], finish: str | None,
                stop_reason: str | int | None) -> dict[str, Any]:
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _completion_logprobs(self, index: int, token_ids: list[int],
                             logprobs: list[dict[int, Logprob]] | None,
                             with_prompt: bool = False) -> dict[str, Any] | None:
        """The choice's logprobs object for these tokens; `with_prompt`: the prompt's part
        first (echo with logprobs, in the first piece of a choice)."""
        if self.logprobs is None or logprobs is None:
            return None
        acc = self._completion_lps.setdefault(index, CompletionLogprobs(self.logprobs))
        if with_prompt and self.echo_logprobs:
            p = index // self.n
            head = acc.build(self.prompts[p], self.prompt_logprobs[p])
            return _joined(head, acc.build(token_ids, logprobs))
        return acc.build(token_ids, logprobs)

    def _completion_extras(self, choice: dict[str, Any], index: int) -> dict[str, Any]:
        """vLLM's per-choice prompt fields of a completion."""
        p = index // self.n
        if self.want_prompt_logprobs:
            plp = self.prompt_logprobs[p]
            choice["prompt_logprobs"] = None if plp is None else vllm_prompt_logprobs(plp,
                                                                                       self.tok)
        if self.return_token_ids:
            choice["prompt_token_ids"] = self.prompts[p]
        return choice

    # ---- non-streaming -------------------------------------------------------------------

    def response(self, choices: list[ChoiceResult], num_completion_tokens: int
                 ) -> dict[str, Any]:
        """The whole body."""
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        out = []
        for c in choices:
            if self.kind == "chat":
                lps = None
                if self.logprobs is not None and c.logprobs is not None:
                    lps = {"content": self.logprobs.chat(c.token_ids, c.logprobs), "refusal": None}
                message: dict[str, Any] = {"role": "assistant",
                                           "content": self._echo(c.index) + c.text,
                                           "refusal": None}
                finish = c.finish_reason
                if self.tools is not None:
                    content, calls = self.tools.plan.calls(c.text)
                    if calls:
                        message["content"], message["tool_calls"] = content, calls
                        if self.tools.plan.mode != "named":
                            finish = "tool_calls"
                choice: dict[str, Any] = {"index": c.index, "message": message,
                                          "logprobs": lps, "finish_reason": finish}
            else:
                choice = {"index": c.index, "text": self._echo(c.index) + c.text,
                          "logprobs": self._completion_logprobs(c.index, c.token_ids, c.logprobs,
                                                                with_prompt=True),
                          "finish_reason": c.finish_reason}
                choice = self._completion_extras(choice, c.index)
            out.append(self._extras(choice, c.token_ids, c.finish_reason, c.stop_reason))
        body["choices"] = out
        body["usage"] = usage(self.num_prompt_tokens, num_completion_tokens)
        if self.return_token_ids and len(self.prompts) == 1:
            body["prompt_token_ids"] = self.prompt_token_ids
        if self.kind == "chat" and self.want_prompt_logprobs:
            plp = self.prompt_logprobs[0]
            body["prompt_logprobs"] = None if plp is None else vllm_prompt_logprobs(plp, self.tok)
        return body

    # ---- streaming -----------------------------------------------------------------------

    def _chunk_head(self) -> dict[str, Any]:
        head = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        if self.include_usage and self.kind == "chat":
            # null on every chunk but the last, as the chat chunk schema describes; the
            # completion schema has no null usage, so completion chunks leave it out
            head["usage"] = None
        return head

    def first_chunks(self, indices: list[int]) -> list[bytes]:
        """Chat: the role announcement of every choice (and, with echo, the echoed text).
        Completions with echo: the prompt (with logprobs: the prompt's)."""
        chunks = []
        for i in indices:
            echo = self._echo(i)
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}
                if echo:
                    chunks.append(self._chunk_start + _json.encode(choice) + b"]}\n\n")
                    choice = {"index": i, "delta": {"content": echo}, "logprobs": None,
                              "finish_reason": None}
            elif echo or self.echo_logprobs:
                lps = None
                if self.echo_logprobs and self.logprobs is not None:
                    p = i // self.n
                    acc = self._completion_lps.setdefault(i, CompletionLogprobs(self.logprobs))
                    lps = acc.build(self.prompts[p], self.prompt_logprobs[p])
                choice = {"index": i, "text": echo, "logprobs": lps, "finish_reason": None}
            else:
                continue
            chunks.append(self._chunk_start + _json.encode(choice) + b"]}\n\n")
        return chunks

    def chunk(self, upd: ChoiceUpdate, num_completion_tokens: int = 0) -> bytes | None:
        """One choice's update as an SSE event, or None when it carries nothing to show.
        `num_completion_tokens`: the count so far (continuous usage)."""
        has_lps = self.logprobs is not None and bool(upd.logprobs)
        if not (upd.text or has_lps or upd.finish_reason is not None
                or (self.return_token_ids and upd.token_ids)):
            return None
        if self.kind == "chat":
            lps = None
            if has_lps and self.logprobs is not None and upd.logprobs is not None:
                lps = {"content": self.logprobs.chat(upd.token_ids, upd.logprobs), "refusal": None}
            if self.tools is not None:
                delta, finish = self.tools.delta(upd.index, upd.text, upd.finish_reason)
                if not delta and finish is None and not lps and not self.return_token_ids:
                    return None
            else:
                delta = {"content": upd.text} if upd.text else {}
                finish = upd.finish_reason
            choice: dict[str, Any] = {"index": upd.index, "delta": delta, "logprobs": lps,
                                      "finish_reason": finish}
        else:
            choice = {"index": upd.index, "text": upd.text,
                      "logprobs": self._completion_logprobs(upd.index, upd.token_ids, upd.logprobs)
                      if has_lps else None,
                      "finish_reason": upd.finish_reason}
        choice = self._extras(choice, upd.token_ids, upd.finish_reason, upd.stop_reason)
        if self.continuous_usage:
            head = self._chunk_head()
            head["usage"] = usage(self.num_prompt_tokens, num_completion_tokens)
            return sse({**head, "choices": [choice]})
        return self._chunk_start + _json.encode(choice) + b"]}\n\n"

    def usage_chunk(self, num_completion_tokens: int) -> bytes:
        head = self._chunk_head()
        head["usage"] = usage(self.num_prompt_tokens, num_completion_tokens)
        return sse({**head, "choices": []})


def models_response(names: list[str], *, root: str | None, max_model_len: int,
                    created: int) -> dict[str, Any]:
    """`ListModelsResponse` with vLLM's extra fields (root, parent, max_model_len)."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "pdserve",
         "root": root or name, "parent": None, "max_model_len": max_model_len}
        for name in names]}
