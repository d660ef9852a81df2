"""Tokenizer loading from a local directory (transformers' fast tokenizers; no hub).

A checkpoint without tokenizer files is served in token-ids-only mode: `load_tokenizer`
returns None and text prompts are refused with a message that says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TokenizerError(RuntimeError):
    """No usable tokenizer where one was asked for; names the path."""


class Tokenizer:
    """The few calls the engine and the proxy need, over a transformers tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer

    def __len__(self) -> int:
        return len(self._tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer in `path`, or None if the directory has no tokenizer files."""
    root = Path(path)
    if not root.is_dir():
        raise TokenizerError(f"tokenizer path {str(root)!r} is not a directory")
    if not any((root / f).exists() for f in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: token-ids-only mode", root)
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean "unusable here"
        raise TokenizerError(f"cannot load the tokenizer in {str(root)!r}: {e}") from e
    return Tokenizer(tok)
