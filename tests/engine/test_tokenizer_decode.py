"""The proxy's per-token decode goes straight to the Rust tokenizer where transformers'
decode would do nothing more: same strings as transformers' own decode, and transformers'
path kept where it does more (clean-up of tokenization spaces)."""

from __future__ import annotations

import random

from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.tokenizer import Tokenizer, load_tokenizer


def test_fast_decode_equals_transformers_decode():
    tok = load_tokenizer(builtin_model_path())
    assert tok._backend is not None  # the built-in tokenizer takes the fast path
    rng = random.Random(0)
    vocab = len(tok)
    special = sorted(tok.hf.all_special_ids)
    for _ in range(2000):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(vocab)
               for _ in range(rng.randrange(0, 16))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == tok.hf.decode(ids, skip_special_tokens=skip), ids


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode():
    hf = load_tokenizer(builtin_model_path()).hf
    hf.clean_up_tokenization_spaces = True
    tok = Tokenizer(hf)
    assert tok._backend is None
    ids = hf.encode("Hello , world !")
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
