"""Tokenizer loading from a local directory (transformers' fast tokenizers; no hub).

A checkpoint without tokenizer files is served in token-ids-only mode: `load_tokenizer`
returns None and text prompts are refused with a message that says so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pdserve.common import UserError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TokenizerError(UserError, RuntimeError):
    """No usable tokenizer where one was asked for; names the path."""


class Tokenizer:
    """The few calls the engine and the proxy need, over a transformers tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer  # the transformers tokenizer (chat templates live there)
        self._backend = _plain_backend(hf_tokenizer)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` whose decode is exactly this tokenizer's, or None."""
        return self._backend

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """transformers' decode; straight through the Rust tokenizer where that is all
        transformers would do (the proxy decodes every streamed token: its Python wrapper
        cost ~10 µs a call)."""
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _plain_backend(hf):
    """The `tokenizers.Tokenizer` under a fast tokenizer whose decode is exactly its
    backend's (transformers' own `_decode`, no clean-up of tokenization spaces), else None."""
    backend = getattr(hf, "_tokenizer", None)
    decode = getattr(type(hf), "_decode", None)
    if backend is None or not callable(getattr(backend, "decode", None)) or decode is None:
        return None
    if decode.__module__ != "transformers.tokenization_utils_tokenizers" or \
            type(hf).decode.__module__ != "transformers.tokenization_utils_base":
        return None  # a tokenizer class of its own: keep its decode
    return None if getattr(hf, "clean_up_tokenization_spaces", False) else backend


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer in `path`, or None if the directory has no tokenizer files."""
    root = Path(path)
    if not root.is_dir():
        raise TokenizerError(f"tokenizer path {str(root)!r} is not a directory")
    if not any((root / f).exists() for f in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: token-ids-only mode", root)
        return None
    try:
        tok = _tokenizer_class(root).from_pretrained(str(root), local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean "unusable here"
        raise TokenizerError(f"cannot load the tokenizer in {str(root)!r}: {e}") from e
    return Tokenizer(tok)


def _tokenizer_class(root: Path) -> type:
    """The class tokenizer_config.json names, imported alone: AutoTokenizer would read the
    model's config through transformers' config code, which imports torch (the proxy must
    not). AutoTokenizer only when the file names no class transformers exports."""
    import transformers

    try:
        name = json.loads((root / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else transformers.AutoTokenizer
