"""Response bodies and SSE chunks in the shapes of the OpenAI OpenAPI description:
`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`,
`CreateCompletionResponse` (streamed and not), `ListModelsResponse`, `CompletionUsage`.

vLLM's extras ride along where its clients expect them: `stop_reason` in every finished
choice; `token_ids` (and `prompt_token_ids`) in choices when the request set
`return_token_ids` or the server has no tokenizer (token-ids-only mode, where `text` is "").
Logprob values of -inf (masked tokens) become -9999.0, OpenAI's "very unlikely".
"""

from __future__ import annotations

import math
import time
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

    def __init__(self, tokenizer: ProxyTokenizer | None, num_top: int):
        self.tok = tokenizer
        self.num_top = num_top

    def text(self, token_id: int) -> str:
        # token-ids-only mode names tokens as vLLM's --return-tokens-as-token-ids does
        return self.tok.token_text(token_id) if self.tok is not None else f"token_id:{token_id}"

    def bytes(self, token_id: int) -> list[int] | None:
        return self.tok.token_bytes(token_id) if self.tok is not None else None

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

    def build(self, token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entries in zip(token_ids, logprobs):
            s = self.fmt.text(tid)
            tokens.append(s)
            token_lps.append(_lp(entries[tid].logprob))
            # the sampled token and the top-N, as the legacy API reports them
            tops.append({self.fmt.text(t): _lp(lp.logprob) for t, lp in entries.items()})
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}


class ResponseFormatter:
    """Bodies of one request: its id, creation time, model name and options."""

    def __init__(self, *, kind: str, response_id: str, model: str,
                 tokenizer: ProxyTokenizer | None, num_top_logprobs: int | None,
                 return_token_ids: bool, prompt_token_ids: list[int],
                 include_usage: bool = False, tools: ToolStream | None = None):
        """`tools`: the request's tool plan (chat), whose calls replace the text."""
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind must be chat or completion, got {kind!r}")
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.logprobs = None if num_top_logprobs is None else LogprobFormatter(tokenizer,
                                                                               num_top_logprobs)
        self.return_token_ids = return_token_ids
        self.prompt_token_ids = prompt_token_ids
        self.include_usage = include_usage
        self.tools = tools
        self._completion_lps: dict[int, CompletionLogprobs] = {}
        # every chunk of a stream starts the same: `data: {"id":...,"choices":[` encoded once
        head = _json.encode(self._chunk_head())
        self._chunk_start = b"data: " + head[:-1] + b',"choices":['

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
                             logprobs: list[dict[int, Logprob]] | None) -> dict[str, Any] | None:
        if self.logprobs is None or logprobs is None:
            return None
        acc = self._completion_lps.setdefault(index, CompletionLogprobs(self.logprobs))
        return acc.build(token_ids, logprobs)

    # ---- non-streaming -------------------------------------------------------------------

    def response(self, choices: list[ChoiceResult], num_completion_tokens: int,
                 prefix_text: str = "") -> dict[str, Any]:
        """The whole body; `prefix_text` is the echoed prompt (completions with echo)."""
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        out = []
        for c in choices:
            if self.kind == "chat":
                lps = None
                if self.logprobs is not None and c.logprobs is not None:
                    lps = {"content": self.logprobs.chat(c.token_ids, c.logprobs), "refusal": None}
                message: dict[str, Any] = {"role": "assistant", "content": c.text,
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
                choice = {"index": c.index, "text": prefix_text + c.text,
                          "logprobs": self._completion_logprobs(c.index, c.token_ids, c.logprobs),
                          "finish_reason": c.finish_reason}
            out.append(self._extras(choice, c.token_ids, c.finish_reason, c.stop_reason))
        body["choices"] = out
        body["usage"] = usage(len(self.prompt_token_ids), num_completion_tokens)
        if self.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    # ---- streaming -----------------------------------------------------------------------

    def _chunk_head(self) -> dict[str, Any]:
        head = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        if self.include_usage and self.kind == "chat":
            # null on every chunk but the last, as the chat chunk schema describes; the
            # completion schema has no null usage, so completion chunks leave it out
            head["usage"] = None
        return head

    def first_chunks(self, indices: list[int], prefix_text: str = "") -> list[bytes]:
        """Chat: the role announcement of every choice. Completions with echo: the prompt."""
        chunks = []
        for i in indices:
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}
            elif prefix_text:
                choice = {"index": i, "text": prefix_text, "logprobs": None, "finish_reason": None}
            else:
                continue
            chunks.append(self._chunk_start + _json.encode(choice) + b"]}\n\n")
        return chunks

    def chunk(self, upd: ChoiceUpdate) -> bytes | None:
        """One choice's update as an SSE event, or None when it carries nothing to show."""
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
        return self._chunk_start + _json.encode(choice) + b"]}\n\n"

    def usage_chunk(self, num_completion_tokens: int) -> bytes:
        head = self._chunk_head()
        head["usage"] = usage(len(self.prompt_token_ids), num_completion_tokens)
        return sse({**head, "choices": []})


def models_response(names: list[str], *, root: str | None, max_model_len: int,
                    created: int) -> dict[str, Any]:
    """`ListModelsResponse` with vLLM's extra fields (root, parent, max_model_len)."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "pdserve",
         "root": root or name, "parent": None, "max_model_len": max_model_len}
        for name in names]}
