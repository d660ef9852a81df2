"""The one validator of a generation request against the served model, after parsing and
tokenization and before anything reaches a worker: every problem is an OpenAI 400 naming the
parameter. Workers check again what reaches them (the engine's `check_request`).

- any string in the body must be encodable as UTF-8 (`check_strings`: a lone surrogate such as
  "\ud800" is refused, naming where it is); a body too deeply nested to parse is refused;
- prompt token ids, `stop_token_ids`, `allowed_token_ids` and `logit_bias` keys must be < the
  model's vocabulary size;
- `stop`: at most MAX_STOPS strings of at most MAX_STOP_CHARS characters; `stop_token_ids`:
  at most MAX_STOP_TOKEN_IDS ids;
- max_tokens against max_model_len (vLLM's messages, `resolve_max_tokens`);
- `priority` fits in 32 bits; `cache_salt` is a non-empty string of at most
  MAX_CACHE_SALT_CHARS characters (`check_cache_salt`); the sampling ranges (`SamplingParams`,
  mapped back to the request's parameter names).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pdserve.common.params import SamplingParams
from pdserve.common.prefix import check_cache_salt
from pdserve.proxy.errors import OpenAIError
from pdserve.proxy.protocol import CompletionRequest, SamplingRequest

MAX_STOPS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


def check_strings(data: Any) -> None:
    """400 naming the first string UTF-8 cannot encode (a lone surrogate from a "\\ud800"
    escape); 400 for a body nested too deeply to handle."""
    try:  # the common case at C speed; walk only to name what failed
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return
    except RecursionError:
        raise OpenAIError("the request body nests too deeply") from None
    except UnicodeEncodeError:
        pass
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise OpenAIError(f"{path or 'the body'}: not valid Unicode text ({e.reason} "
                                  f"at position {e.start})", param=path or None) from None
        elif isinstance(value, dict):
            stack += [(k, path) for k in value]
            stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not vocab_size or not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise OpenAIError(f"{param}: token id(s) {bad[:5]} outside the vocabulary [0, "
                          f"{vocab_size})", param=param)


def validate(req: SamplingRequest, prompt_ids: list[int], prompt_param: str, *,
             max_model_len: int, vocab_size: int, seed: int) -> SamplingParams:
    """The request's SamplingParams, or OpenAIError(400) naming what is wrong."""
    check_token_ids(prompt_ids, vocab_size, prompt_param)
    stops, stop_ids = req.stop_list(), req.stop_token_ids or []
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise OpenAIError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                          "characters", param="stop")
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise OpenAIError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids",
                          param="stop_token_ids")
    check_token_ids(stop_ids, vocab_size, "stop_token_ids")
    if req.allowed_token_ids is not None:
        if not req.allowed_token_ids:
            raise OpenAIError("allowed_token_ids must not be empty", param="allowed_token_ids")
        check_token_ids(req.allowed_token_ids, vocab_size, "allowed_token_ids")
    bias = req.logit_bias_ids()
    if bias is not None:
        check_token_ids(list(bias), vocab_size, "logit_bias")
    if not -2**31 <= req.priority < 2**31:
        raise OpenAIError("priority must be an integer in [-2^31, 2^31)", param="priority")
    try:
        check_cache_salt(req.cache_salt)
    except ValueError as e:
        raise OpenAIError(str(e), param="cache_salt") from None
    max_tokens = resolve_max_tokens(req, len(prompt_ids), max_model_len, prompt_param)
    return req.sampling_params(max_tokens, seed)


def resolve_max_tokens(req: SamplingRequest, num_prompt_tokens: int, max_model_len: int,
                       prompt_param: str) -> int:
    """The effective max_tokens, or a 400 with vLLM's messages when the prompt leaves no room
    or the requested budget does not fit. An unset completions max_tokens (default 16) is
    capped to the room left instead of refused."""
    if num_prompt_tokens >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.", param=prompt_param, code="context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    requested = req.requested_max_tokens()
    explicit = requested is not None and (
        not isinstance(req, CompletionRequest) or "max_tokens" in req.model_fields_set)
    if requested is None:
        return room
    if not explicit:
        return min(requested, room)
    if requested > room:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) \
            is not None else "max_tokens"
        raise OpenAIError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has "
            f"{num_prompt_tokens} input tokens ({requested} > {max_model_len} - "
            f"{num_prompt_tokens}).", param=param, code="context_length_exceeded")
    return requested
