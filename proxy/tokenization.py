"""The proxy's view of a tokenizer: chat templates, prompts, and the strings and bytes of
single tokens (for logprobs). Wraps `engine.tokenizer.Tokenizer` without changing it.

Every call here is CPU work that can take milliseconds on long inputs: the app runs them off
the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import functools
from typing import Any

from pdserve.engine.tokenizer import Tokenizer

try:  # tokenizers >= 0.21: incremental decoding in Rust, one call per token
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the proxy decodes windows itself
    _DecodeStream = None


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in of every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the messages."""


class ProxyTokenizer:
    """Thread-safe for concurrent reads (fast tokenizers release the GIL and keep no state
    per call); caches per-token strings and bytes, bounded by the vocabulary."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._hf = tokenizer.hf
        decoder = getattr(getattr(self._hf, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = {i: t.content for i, t in getattr(self._hf, "added_tokens_decoder",
                                                          {}).items()}
        self._text_cache: dict[int, str] = {}
        self._bytes_cache: dict[int, list[int] | None] = {}

    # ---- prompts -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> tuple[Any, Any]:
        """(the Rust tokenizer, a new `tokenizers` DecodeStream over it) when this
        tokenizer's decode is the Rust tokenizer's; (None, None) otherwise."""
        backend = self.tokenizer.backend
        if backend is None or _DecodeStream is None:
            return None, None
        return backend, _DecodeStream(skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template applied to `messages` (text, not ids)."""
        if not getattr(self._hf, "chat_template", None):
            raise ChatTemplateError("this model's tokenizer has no chat template: use "
                                    "/v1/completions with a prompt instead")
        kwargs = dict(chat_template_kwargs or {})
        for reserved in ("tokenize", "add_generation_prompt", "continue_final_message",
                         "conversation", "messages", "tools"):
            kwargs.pop(reserved, None)
        if tools:
            kwargs["tools"] = tools
        try:
            text = self._hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **kwargs)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise ChatTemplateError(f"cannot apply the chat template: {e}") from e
        except Exception as e:  # jinja2 TemplateError and friends
            if type(e).__module__.startswith("jinja2"):
                raise ChatTemplateError(f"the chat template failed: {e}") from e
            raise
        if not isinstance(text, str):
            raise ChatTemplateError("the chat template did not render to text")
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Prompt ids of a conversation: the template writes BOS and the other special tokens
        itself, so the text is encoded without adding any."""
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    # ---- single tokens (logprobs) --------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The token as text, special tokens included (partial UTF-8 shows as U+FFFD)."""
        text = self._text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._text_cache[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int] | None:
        """The token's raw UTF-8 bytes (a byte-level BPE piece may be part of a character)."""
        if token_id in self._bytes_cache:
            return self._bytes_cache[token_id]
        out: list[int] | None
        if token_id in self._special:
            out = list(self._special[token_id].encode("utf-8"))
        elif self._byte_level:
            piece = self._hf.convert_ids_to_tokens(token_id)
            table = _unicode_to_byte()
            out = [table[c] for c in piece] if piece is not None and all(
                c in table for c in piece) else list(self.token_text(token_id).encode("utf-8"))
        else:
            out = list(self.token_text(token_id).encode("utf-8"))
        self._bytes_cache[token_id] = out
        return out
