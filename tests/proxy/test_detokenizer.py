"""The incremental detokenizer and stop strings, on the built-in byte-level BPE tokenizer.

The contract: the deltas of every step, then `finish()`, concatenate to exactly
`tokenizer.decode(all ids, skip_special_tokens=True)`, however the ids split characters.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.proxy import detokenizer
from pdserve.proxy.detokenizer import IncrementalDetokenizer, TextStream
from pdserve.proxy.tokenization import ProxyTokenizer, _unicode_to_byte
from pdserve.proxy.validation import MAX_STOP_CHARS, MAX_STOPS

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


class WindowsOnly:
    """The same tokenizer without `decode_stream`: the detokenizer decodes windows itself."""

    def __init__(self, tok: ProxyTokenizer):
        self.decode = tok.decode


class FailingStep:
    """A DecodeStream that raises at its `fail_at`-th step (counting from 0)."""

    def __init__(self, inner: Any, fail_at: int):
        self.inner, self.fail_at, self.n = inner, fail_at, 0

    def step(self, rust: Any, token_id: int) -> str | None:
        self.n += 1
        if self.n - 1 == self.fail_at:
            raise RuntimeError("Invalid prefix encountered")
        return self.inner.step(rust, token_id)


@pytest.mark.parametrize("seed", range(3))
def test_rust_decode_stream_gives_the_windows_deltas(tok: ProxyTokenizer, seed: int) -> None:
    """Token by token, the DecodeStream path releases what the window method does, and a
    step that fails hands over to the windows mid-stream without losing or repeating text."""
    assert IncrementalDetokenizer(tok)._stream is not None  # the Rust path is the one tested
    rng = random.Random(200 + seed)
    vocab = len(tok.tokenizer)
    for _ in range(80):
        text = " ".join(rng.choice(MULTIBYTE + ["plain", "a"]) for _ in range(4))
        data = text.encode()
        cut = rng.randrange(len(data))
        ids = (byte_ids(tok, data[:cut]) + [rng.randrange(vocab) for _ in range(3)]
               + tok.encode(data[cut:].decode("utf-8", "replace"), add_special_tokens=False))
        for skip in (True, False):
            want = stream_text(WindowsOnly(tok), ids, skip)  # type: ignore[arg-type]
            assert stream_text(tok, ids, skip) == want, ids
            d = IncrementalDetokenizer(tok, skip)
            k = rng.randrange(len(ids))
            d._stream = FailingStep(d._stream, k)
            deltas = [d.add(i) for i in ids]
            assert d._stream is None or k >= len(ids)
            assert "".join(deltas) + d.finish() == tok.decode(ids, skip_special_tokens=skip)
            assert deltas[:k] == want[0][:k]


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


# ---- stop strings: the matchers against a reference --------------------------------------
#
# TextStream picks plain str.find for a few short stops and an Aho–Corasick automaton for the
# rest (built lazily, a trie level at a time, on a work budget). Both must release exactly
# what the original matcher did, delta by delta: it is the reference below, kept verbatim.


def reference_release(stops: list[str], deltas: list[str], include: bool) -> tuple[
        list[str], str | None]:
    """The text released after each delta (the last delta is the final one) and the stop
    string that fired: the original TextStream's search, rescanning everything held."""
    stops = [s for s in stops if s]
    pending, out = "", []
    for n, new in enumerate(deltas):
        final = n == len(deltas) - 1
        pending += new
        if not stops:
            out.append(pending)
            pending = ""
            continue
        best: tuple[int, str] | None = None  # the earliest stop; the longest at a tie
        for stop in stops:
            pos = pending.find(stop)
            if pos >= 0 and (best is None or pos < best[0]
                             or (pos == best[0] and len(stop) > len(best[1]))):
                best = (pos, stop)
        if best is not None:
            end = best[0] + len(best[1]) if include else best[0]
            out.append(pending[:end])
            return out, best[1]
        keep = 0  # the longest suffix that is a proper prefix of some stop
        if not final:
            for stop in stops:
                for k in range(min(len(stop) - 1, len(pending)), keep, -1):
                    if pending.endswith(stop[:k]):
                        keep = k
                        break
        cut = len(pending) - keep
        out.append(pending[:cut])
        pending = pending[cut:]
    return out, None


class StringsTokenizer:
    """Token i decodes to strings[i]: a TextStream's deltas are then exactly the tokens'
    strings (an empty one is an empty delta)."""

    def __init__(self, strings: list[str]):
        self.strings = strings

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.strings[i] for i in ids)


def stream_release(stops: list[str], deltas: list[str], include: bool) -> tuple[
        list[str], str | None]:
    """What a TextStream releases for these deltas (then finish()), as reference_release."""
    s = TextStream(StringsTokenizer(deltas), stops,  # type: ignore[arg-type]
                   include_stop_str_in_output=include)
    out = []
    for i in range(len(deltas)):
        out.append(s.add(i))
        if s.stopped is not None:
            return out, s.stopped
    out.append(s.finish())
    if s.stopped is not None:
        return out, s.stopped
    return out, None


def filter_release(f: Any, deltas: list[str], include: bool) -> tuple[list[str], str | None]:
    """The same through a stop filter directly (the last delta is final, not empty)."""
    out = []
    for n, new in enumerate(deltas):
        text, start, length = f.release(new, n == len(deltas) - 1)
        if length:
            out.append(text[:start + length] if include else text[:start])
            return out, text[start:start + length]
        out.append(text)
    return out, None


ALPHABETS = ["ab", "abc", "aab ", "ab世😀", "xy\u0301é", "ab\udfff", "ab\udfff\ue000"]


def random_case(rng: random.Random) -> tuple[list[str], list[str], bool]:
    """(stops, deltas, include): few or many short stops over a small alphabet, some of them
    prefixes, suffixes, overlaps or copies of others; text that often holds them; deltas of
    0 to 6 characters."""
    alpha = rng.choice(ALPHABETS)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice(alpha) for _ in range(rng.randint(lo, hi)))

    stops = [word(1, 6) for _ in range(rng.randint(1, 8))]
    for _ in range(rng.randint(0, 4)):
        s = rng.choice(stops)
        cut = rng.randint(1, len(s))
        stops.append(rng.choice([s[:cut], s[-cut:], s[-cut:] + word(1, 3), s, word(0, 2) + s]))
    if rng.random() < 0.2:
        stops.append("")  # ignored
    rng.shuffle(stops)
    if "\ue000" in alpha:  # the first two separator choices both in stops
        stops += ["\udfff", "\ue000b"]
    parts = []
    for _ in range(rng.randint(0, 6)):
        parts.append(word(0, 8))
        if rng.random() < 0.5:
            s = rng.choice(stops)
            parts.append(s[:rng.randint(0, len(s))] if rng.random() < 0.5 else s)
    text = "".join(parts)
    deltas, i = [], 0
    while i < len(text):
        n = rng.choice([0, 0, 1, 1, 1, 2, 3, 6])
        deltas.append(text[i:i + n])
        i += n
    deltas.append(rng.choice(["", "", word(1, 3)]))  # the final delta
    return stops, deltas, rng.random() < 0.5


@pytest.fixture(params=["few", "many", "many-unbudgeted", "many-tiny-budget"])
def matcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which stop filter TextStream uses: the str.find one for any list, the automaton for
    any list (building each level only when the state needs it, or one node per character)."""
    if request.param == "few":
        monkeypatch.setattr(detokenizer, "_FEW_STOPS", 10**9)
        monkeypatch.setattr(detokenizer, "_SHORT_STOP", 10**9)
    else:
        monkeypatch.setattr(detokenizer, "_FEW_STOPS", -1)
    if request.param == "many-unbudgeted":
        monkeypatch.setattr(detokenizer, "_BUDGET_PER_STOP", 0)
        monkeypatch.setattr(detokenizer, "_BUDGET_BASE", 0)
    elif request.param == "many-tiny-budget":
        monkeypatch.setattr(detokenizer, "_BUDGET_PER_STOP", 0)
        monkeypatch.setattr(detokenizer, "_BUDGET_BASE", 2)
    return request.param


@pytest.mark.parametrize("seed", range(3))
def test_stop_matching_equals_the_reference(matcher: str, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        stops, deltas, include = random_case(rng)
        want = reference_release(stops, deltas, include)
        assert filter_release(detokenizer.stop_filter(stops), deltas, include) == want, \
            (stops, deltas, include)
        # through TextStream: the deltas as tokens, then finish() (an empty final delta)
        assert stream_release(stops, deltas[:-1], include) == \
            reference_release(stops, deltas[:-1] + [""], include), (stops, deltas, include)


def test_default_choice_of_matcher() -> None:
    assert detokenizer.stop_filter([]) is None
    assert detokenizer.stop_filter(["", ""]) is None
    assert isinstance(detokenizer.stop_filter(["</s>", "\n\n"]), detokenizer._FewStops)
    assert isinstance(detokenizer.stop_filter(["a"] * 5), detokenizer._ManyStops)
    assert isinstance(detokenizer.stop_filter(["x" * 33]), detokenizer._ManyStops)


@pytest.mark.parametrize("stops, chunks, stopped, text", [
    # both in one delta: the earliest start wins, though "bc" ends first
    (["bc", "abcd"], ["abcd"], "abcd", ""),
    # "bc" completes a delta earlier: it fires before "abcd" could
    (["bc", "abcd"], ["abc", "d"], "bc", "a"),
    # the same start: the longer one
    (["a", "ab"], ["xab"], "ab", "x"),
    (["a", "ab"], ["xa", "b"], "a", "x"),
])
def test_which_stop_fires(matcher: str, stops: list[str], chunks: list[str], stopped: str,
                          text: str) -> None:
    got, stop = stream_release(stops, chunks, include=False)
    assert stop == stopped and "".join(got) == text
    assert (got, stop) == reference_release(stops, chunks + [""], False)


def test_the_largest_stop_lists_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_STOPS stops of MAX_STOP_CHARS characters out of a periodic text, so that the
    text walks every trie level: none fires (the held text is ~1000 characters long), one
    fires deep, or all but one break off the text at once. The automaton with its default
    budget, with none (each level built when the state needs it) and with a tiny one."""
    rng = random.Random(7)
    unit = "the cat sat on the mat; 世界 😀 "
    text = unit * (2 * MAX_STOP_CHARS // len(unit) + 2)
    n = MAX_STOP_CHARS - 1
    shifts = rng.sample(range(len(unit) * 4), MAX_STOPS)
    variants = {
        "held": [text[i:i + n] + "#" for i in shifts],
        "fires deep": [text[i:i + n] + "#" for i in shifts[1:]] + [text[5:5 + n + 1]],
        "breaks early": ["#" + text[i:i + n] for i in shifts[1:]] + [text[:n] + "#"],
    }
    budgets = [(detokenizer._BUDGET_PER_STOP, detokenizer._BUDGET_BASE), (0, 0), (0, 2)]
    for name, stops in variants.items():
        deltas, i = [], 0
        while i < len(text):
            k = rng.choice([0, 1, 3, 4, 7, 40])
            deltas.append(text[i:i + k])
            i += k
        deltas.append("")
        include = name == "fires deep"
        want = reference_release(stops, deltas, include)
        assert (want[1] is not None) == (name == "fires deep")
        for per_stop, base in budgets:
            monkeypatch.setattr(detokenizer, "_BUDGET_PER_STOP", per_stop)
            monkeypatch.setattr(detokenizer, "_BUDGET_BASE", base)
            f = detokenizer.stop_filter(stops)
            assert isinstance(f, detokenizer._ManyStops)
            assert filter_release(f, deltas, include) == want, (name, per_stop, base)
