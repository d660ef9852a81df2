"""The incremental detokenizer and stop strings, on the built-in byte-level BPE tokenizer.

The contract: the deltas of every step, then `finish()`, concatenate to exactly
`tokenizer.decode(all ids, skip_special_tokens=True)`, however the ids split characters.
"""

from __future__ import annotations

import random

import pytest

from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.proxy.detokenizer import IncrementalDetokenizer, TextStream
from pdserve.proxy.tokenization import ProxyTokenizer, _unicode_to_byte

MULTIBYTE = ["é", "ß", "世界", "😀", "🇺🇳", "ąčę", "日本語のテキスト", "Ω≈ç√", "👩‍👩‍👧"]


@pytest.fixture(scope="module")
def tok(proxy_cache_dir) -> ProxyTokenizer:
    t = load_tokenizer(builtin_model_path())
    assert t is not None
    return ProxyTokenizer(t)


def byte_ids(tok: ProxyTokenizer, data: bytes) -> list[int]:
    """One token per byte (the byte-level alphabet is in every byte-level BPE vocab)."""
    inverse = {b: c for c, b in _unicode_to_byte().items()}
    ids = tok.tokenizer.hf.convert_tokens_to_ids([inverse[b] for b in data])
    assert all(i is not None and i != tok.tokenizer.hf.unk_token_id for i in ids)
    return ids


def stream_text(tok: ProxyTokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[
        list[str], str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [d.add(i) for i in ids]
    return deltas, d.finish()


def test_split_multibyte_characters_are_held_back(tok: ProxyTokenizer) -> None:
    ids = byte_ids(tok, "a😀b".encode())  # a, F0, 9F, 98, 80, b
    deltas, rest = stream_text(tok, ids)
    assert deltas == ["a", "", "", "", "😀", "b"]
    assert rest == ""
    # a character cut at the end is flushed as the full decode shows it
    ids = byte_ids(tok, "x世".encode()[:-1])
    deltas, rest = stream_text(tok, ids)
    assert "".join(deltas) == "x" and "".join(deltas) + rest == tok.decode(ids)


def test_invalid_bytes_in_the_middle_still_appear(tok: ProxyTokenizer) -> None:
    # a lone continuation byte, a truncated sequence followed by ASCII, then a real character
    ids = byte_ids(tok, b"a\x80b\xe4\xb8c") + tok.encode("é ok", add_special_tokens=False)
    deltas, rest = stream_text(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids)
    assert "\ufffd" in tok.decode(ids)


def test_special_tokens_are_skipped_or_kept(tok: ProxyTokenizer) -> None:
    ids = [0] + tok.encode("hi", add_special_tokens=False) + [4, 2] + byte_ids(tok, "é".encode())
    for skip in (True, False):
        deltas, rest = stream_text(tok, ids, skip)
        assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_match_full_decode(tok: ProxyTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    vocab = len(tok.tokenizer)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas, rest = stream_text(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids), ids


@pytest.mark.parametrize("seed", range(3))
def test_random_multibyte_text_split_anywhere(tok: ProxyTokenizer, seed: int) -> None:
    """Real text with multi-byte characters, as BPE pieces and as bytes cut at random."""
    rng = random.Random(100 + seed)
    for _ in range(60):
        text = " ".join(rng.choice(MULTIBYTE + ["plain", "a", "x1"]) for _ in range(6))
        ids = tok.encode(text, add_special_tokens=False)
        deltas, rest = stream_text(tok, ids)
        assert "".join(deltas) + rest == text
        # the same bytes, tokenised byte by byte, with BPE pieces mixed in at random
        data = text.encode()
        cut = rng.randrange(len(data))
        mixed = byte_ids(tok, data[:cut]) + tok.encode(data[cut:].decode("utf-8", "replace"),
                                                       add_special_tokens=False)
        deltas, rest = stream_text(tok, mixed)
        assert "".join(deltas) + rest == tok.decode(mixed)


def text_stream(tok: ProxyTokenizer, ids: list[int], stop: list[str],
                include: bool = False) -> tuple[str, TextStream, int]:
    """Run ids through a TextStream until a stop fires; (text, stream, tokens consumed)."""
    s = TextStream(tok, stop, include_stop_str_in_output=include)
    out = []
    for n, tid in enumerate(ids, start=1):
        out.append(s.add(tid))
        if s.stopped is not None:
            return "".join(out), s, n
    out.append(s.finish())
    return "".join(out), s, len(ids)


def test_stop_string_truncates_and_counts_the_completing_token(tok: ProxyTokenizer) -> None:
    ids = tok.encode("The cat sat on the mat. The end", add_special_tokens=False)
    text, s, used = text_stream(tok, ids, ["mat."])
    assert text == "The cat sat on the " and s.stopped == "mat."
    assert "mat." in tok.decode(ids[:used]) and "mat." not in tok.decode(ids[:used - 1])
    text, s, _ = text_stream(tok, ids, ["mat."], include=True)
    assert text == "The cat sat on the mat."


def test_stop_string_prefix_is_held_back_then_released(tok: ProxyTokenizer) -> None:
    ids = tok.encode("abc abd abe", add_special_tokens=False)
    s = TextStream(tok, ["abx"])
    shown = ""
    for tid in ids:
        shown += s.add(tid)
        # what could still become "abx" is never shown before it is ruled out
        assert not shown.endswith(("a", "ab"))
    assert shown + s.finish() == "abc abd abe"
    assert s.stopped is None


def test_stop_string_across_a_split_character(tok: ProxyTokenizer) -> None:
    ids = byte_ids(tok, "ok 世界 done".encode())
    text, s, _ = text_stream(tok, ids, ["界 d"])
    assert text == "ok 世" and s.stopped == "界 d"


def test_earliest_stop_wins(tok: ProxyTokenizer) -> None:
    ids = tok.encode("one two three", add_special_tokens=False)
    text, s, _ = text_stream(tok, ids, ["three", "two"])
    assert text == "one " and s.stopped == "two"


@pytest.mark.parametrize("seed", range(3))
def test_random_stops_release_exactly_the_text_before_them(tok: ProxyTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    vocab = len(tok.tokenizer)
    for _ in range(80):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randrange(5, 40))]
        full = tok.decode(ids)
        if len(full) < 4:
            continue
        a = rng.randrange(len(full) - 2)
        stop = full[a:a + rng.randrange(1, 4)]
        if "\ufffd" in stop:
            continue  # a decode artifact of incomplete bytes, not a stop a client sends
        text, s, used = text_stream(tok, ids, [stop])
        assert s.stopped == stop, (ids, stop)
        assert text == full[:full.index(stop)]
        assert stop in tok.decode(ids[:used]) and stop not in tok.decode(ids[:used - 1])


def test_incremental_released_text_is_a_prefix_of_the_final_text(tok: ProxyTokenizer) -> None:
    ids = tok.encode("streaming " * 20 + "世界😀", add_special_tokens=False)
    s = TextStream(tok, ["zzz"])
    shown = ""
    for tid in ids:
        shown += s.add(tid)
        assert tok.decode(ids).startswith(shown)
    assert shown + s.finish() == tok.decode(ids)
