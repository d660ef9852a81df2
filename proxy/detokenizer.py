"""Token ids -> text deltas, per choice, with stop strings.

`IncrementalDetokenizer` keeps vLLM's two offsets into the ids: text is decoded from a short
window `ids[prefix_offset:]` and compared with the window's old text `ids[prefix_offset:
read_offset]`; the difference is new text. A delta ending in U+FFFD is held back (the last
token may be the first bytes of a multi-byte character). Cost per token: two decodes of a
window of a few tokens, so O(1) in the output length. `finish()` emits whatever the windows
have not (after a failed Rust step, by decoding all ids once), so the contract holds for any
tokenizer whose decode is prefix-stable:

    "".join(every delta) + finish() == tokenizer.decode(all ids, skip_special_tokens)

`TextStream` puts stop strings on top: new text joins the held text; a stop string found
there ends the choice (the text is cut before it, or after it with include_stop_str_in_output);
otherwise everything but the longest suffix that could begin a stop string is released. The
search costs O(new text) per token whatever the number of stop strings: str.find on the held
text for a few short stops, else an Aho–Corasick automaton fed only the new text, whose state
also gives the suffix to hold (its depth); see `_StopAutomaton` for how its set-up stays off
the critical path of other streams.
"""

from __future__ import annotations

import logging
import threading
import weakref
from array import array
from collections import deque
from collections.abc import Sequence

from pdserve.proxy.tokenization import ProxyTokenizer

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one choice's output ids, delivered as it becomes certain. With a Rust
    tokenizer each id is one `tokenizers` DecodeStream step (the same two offsets and
    hold-back rule, in Rust: one call per token); a step that fails (a window whose decode is
    not prefix-stable) moves this choice to the windows decoded here, from the same offsets."""

    def __init__(self, tokenizer: ProxyTokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted: list[str] = []  # every delta so far
        stream = getattr(tokenizer, "decode_stream", None)  # a bare `decode` will do too
        self._rust, self._stream = stream(skip_special_tokens) if stream else (None, None)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; returns the text it completes (often all of its text, sometimes ""
        while a multi-byte character is incomplete)."""
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self._rust, token_id)
            except Exception as e:  # noqa: BLE001 - the windows below decide instead
                logger.debug("DecodeStream step failed (%s): decoding windows", e)
                self._stream = None
            else:
                if delta is None:
                    return ""
                self.prefix_offset = self.read_offset  # as the stream moved its own
                self.read_offset = len(self.ids)
                self.emitted.append(delta)
                return delta
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing certain yet: keep the window
        if not new_text.startswith(prefix_text):
            logger.debug("detokenizer window not prefix-stable: %r -> %r", prefix_text, new_text)
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.emitted.append(delta)
        return delta

    def finish(self) -> str:
        """The remaining text after the last id: held-back bytes (decoded with U+FFFD if they
        never completed) and any correction, so the whole equals one decode of all ids.
        While the Rust DecodeStream made every delta (no step failed), what it emitted is
        the full decode's prefix by construction: only the window's held-back tail is left,
        decoded here without decoding the whole output again."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if self._stream is not None and window.startswith(prefix_text):
            rest = window[len(prefix_text):]
        else:
            full = self._decode(self.ids)
            done = "".join(self.emitted)
            if full.startswith(done):
                rest = full[len(done):]
            else:  # a tokenizer whose decode is not prefix-stable: the windowed remainder
                logger.warning("streamed text diverged from the full decode; tail may differ")
                rest = window[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted.append(rest)
        return rest


# Stop lists this small (the usual case) are searched with str.find / str.endswith on the held
# text; larger ones go through an Aho–Corasick automaton (`_StopAutomaton`).
_FEW_STOPS = 4
_SHORT_STOP = 32
# The automaton's lazy build: work units per character scanned, per stop (see _StopAutomaton).
_BUDGET_PER_STOP = 4
_BUDGET_BASE = 16


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.
    Only prefixes ending in text's last character are tried (found with rfind)."""
    if not text:
        return 0
    last = text[-1]
    best = 0
    for stop in stops:
        k = min(len(stop) - 1, len(text))  # candidate prefix lengths: best < length <= k
        while k > best:
            i = stop.rfind(last, best, k)
            if i < 0:
                break
            if text.endswith(stop[:i + 1]):
                best = i + 1
                break
            k = i
    return best


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text` (the longest one at a tie)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop)
        if pos >= 0 and (best is None or pos < best[0]
                         or (pos == best[0] and len(stop) > len(best[1]))):
            best = (pos, stop)
    return best


def _common_prefix_len(a: str, b: str) -> int:
    """len(os.path.commonprefix([a, b])) by slice comparisons at C speed, linear: chunks of
    doubling size while equal, then halving the chunk that differs."""
    n = min(len(a), len(b))
    lo, step = 0, 8
    while lo < n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
        step *= 2
    if lo >= n:
        return n
    hi = min(lo + step, n)  # a[:lo] == b[:lo]; they differ before hi, or a, b end there
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _separator(joined: str) -> str:
    """A character in no stop string (a lone surrogate unless a stop holds that one)."""
    if "\udfff" not in joined:
        return "\udfff"
    used = set(joined)
    return next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in used)


class _StopAutomaton:
    """Aho–Corasick automaton of one stop list, shared by every stream with that list.

    The trie is not built node by node. The distinct stops are sorted (`pats`) and laid end
    to end in `text`, each followed by a character in none of them; the trie node of the
    prefix `pats[i][:d]` has the id `base[i] + d` for the first i (in sorted order) with that
    prefix. Its first child is then the next id (character `text[id]`), and the other
    children, where stops part ways (at most one per stop), are in `branch`. The constructor
    is linear in the total stop length with little Python work per stop (sort, common
    prefixes, joins): about a millisecond for the validator's largest list.

    Failure links (`fail`), the longest stop ending at a node (`out`) and node depths (`dep`)
    are computed breadth first, a trie level at a time, and only as deep as streams' text
    gets into the stops: `scan` wants levels down to twice its state's depth, plus two, and
    works toward them with a budget of about 4 units per stop per character scanned (a node
    costs a unit, plus one per failure link its computation follows). Levels down to D cost
    at most 2·D units per stop in all (the failure-link steps along one stop's path add up
    to its length), so the budget keeps the levels ahead of the state and no character pays
    for a whole expensive level at once; whatever a character still needs is computed then.
    In all, at most one full build (linear in the total stop length: 40-80 ms in CPython for
    the validator's largest list), shared by the choices of a request, spread over the
    characters that walk into the stops.
    """

    def __init__(self, stops: Sequence[str]):
        pats = sorted(set(s for s in stops if s))
        if not pats:
            raise ValueError("no stop strings")
        self.sep = sep = _separator("".join(pats))
        self.text = sep.join(pats) + sep
        self.maxlen = max(map(len, pats))
        base, off = [], 0
        for p in pats:
            base.append(off)
            off += len(p) + 1
        lcp = [0] + [_common_prefix_len(a, b) for a, b in zip(pats, pats[1:])]
        # pats[i] leaves pats[i-1] at depth lcp[i]: a branch out of the node of that prefix,
        # whose id uses the first pattern j < i sharing it (the previous index with a smaller
        # lcp, found with a monotonic stack)
        branch: dict[int, dict[str, int]] = {}
        bparent = [0] * len(pats)
        stack = [0]
        for i in range(1, len(pats)):
            d = lcp[i]
            while stack and lcp[stack[-1]] >= d:
                stack.pop()
            j = stack[-1] if stack else 0
            stack.append(i)
            u = base[j] + d
            bparent[i] = u
            branch.setdefault(u, {})[pats[i][d]] = base[i] + d + 1
        self.branch = branch
        n = len(self.text)
        self.fail = array("l", [0]) * n
        self.out = array("l", [0]) * n
        self.dep = array("l", [0]) * n
        self.built = 0  # every node down to this depth has fail, out and dep
        self.limit = -1  # scan calls advance() for a state deeper than this
        self._pats, self._base, self._lcp, self._bparent = pats, base, lcp, bparent
        self._alive = list(range(len(pats)))  # the stops longer than `built`
        self._level: list[int] | None = None  # level built + 1: its nodes' stops ...
        self._next = 0  # ... and how many of them are done
        self._budget = _BUDGET_PER_STOP * len(pats) + _BUDGET_BASE  # per character scanned
        self._lock = threading.Lock()  # building; reads need none (levels <= built are final)

    def advance(self, depth: int) -> None:
        """For a state at `depth`: complete every level down to depth + 1 (the next character
        may go there) and spend the budget of one character on levels down to 2·depth + 2."""
        with self._lock:
            need = min(depth + 1, self.maxlen)
            goal = min(2 * depth + 2, self.maxlen)
            budget = self._budget
            built = self.built
            if built >= goal:
                return
            pats, base, lcp, bparent = self._pats, self._base, self._lcp, self._bparent
            text, branch, fail, out, dep = (self.text, self.branch, self.fail, self.out,
                                            self.dep)
            level, k, d = self._level, self._next, built + 1
            while built < goal and (budget > 0 or built < need):
                if level is None:  # start level d
                    alive = self._alive = [i for i in self._alive if len(pats[i]) >= d]
                    level = [i for i in alive if lcp[i] < d]  # the rest share those nodes
                    k = 0
                    budget -= 1 + len(alive) // 8
                    continue
                if k == len(level):  # level d is complete
                    built, d, level = d, d + 1, None
                    continue
                i = level[k]
                k += 1
                v = base[i] + d
                f = 0
                if d > 1:
                    c = text[v - 1]
                    f = fail[v - 1 if d - 1 > lcp[i] else bparent[i]]  # the parent's
                    while True:  # the longest proper suffix of the node that is a node
                        budget -= 1
                        if text[f] == c:
                            f += 1
                            break
                        b = branch.get(f)
                        if b is not None and (w := b.get(c)) is not None:
                            f = w
                            break
                        if f == 0:
                            break
                        f = fail[f]
                fail[v] = f
                dep[v] = d
                out[v] = d if len(pats[i]) == d else out[f]
                budget -= 1
            self._level, self._next = level, k
            self.built = built
            self.limit = self.maxlen if built >= self.maxlen else (built - 2) // 2

    def scan(self, state: int, new: str, offset: int) -> tuple[int, int, int]:
        """Feed `new` (its first character at index `offset` of the caller's text) from
        `state`: (the state after it, start, length) of the earliest stop found (the longest
        at a tie), length 0 if none. After a match the state is not meaningful."""
        text, branch, fail, out, dep, sep = (self.text, self.branch, self.fail, self.out,
                                             self.dep, self.sep)
        limit = self.limit
        best_start, best_len = 0, 0
        j = offset
        for ch in new:
            if dep[state] > limit:
                self.advance(dep[state])
                limit = self.limit
            if ch == sep:  # in no stop: only the root is a suffix (and text[state] may be it)
                state = 0
            else:
                while True:
                    if text[state] == ch:
                        state += 1
                        break
                    b = branch.get(state)
                    if b is not None and (w := b.get(ch)) is not None:
                        state = w
                        break
                    if state == 0:
                        break
                    state = fail[state]
            j += 1
            n = out[state]
            if n and (not best_len or j - n <= best_start):
                best_start, best_len = j - n, n  # same start later = a longer stop
            # a stop starting at or before the best would have to extend the current node
            if best_len and j - dep[state] > best_start:
                break
        return state, best_start, best_len


_automata: weakref.WeakValueDictionary[tuple[str, ...], _StopAutomaton] = \
    weakref.WeakValueDictionary()
_automata_lock = threading.Lock()


def _automaton(stops: Sequence[str]) -> _StopAutomaton:
    """The automaton of `stops`, shared while some stream uses it (a request's choices)."""
    key = tuple(stops)
    with _automata_lock:
        ac = _automata.get(key)
        if ac is None:
            ac = _automata[key] = _StopAutomaton(stops)
        return ac


class _FewStops:
    """Stop strings in held text, for a few short stops: str.find over the held text and the
    new text (both short), and the hold-back by str.endswith."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def release(self, new: str, final: bool) -> tuple[str, int, int]:
        """(text released, start, length of the stop found in it or length 0)."""
        self.pending += new
        hit = _find_stop(self.pending, self.stops)
        if hit is not None:
            out, self.pending = self.pending, ""
            return out, hit[0], len(hit[1])
        keep = 0 if final else _longest_stop_prefix_suffix(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, 0, 0


class _ManyStops:
    """Stop strings by the automaton, fed only new text. The held text is the automaton
    state's node (its depth is the hold-back), kept as chunks so that releasing part of it
    copies only what is released."""

    def __init__(self, stops: Sequence[str]):
        self.ac = _automaton(stops)
        self.state = 0
        self.chunks: deque[str] = deque()
        self.head = 0  # released characters of chunks[0]
        self.held = 0  # held characters in all

    def _take(self, count: int) -> str:
        pieces = []
        chunks = self.chunks
        while count:
            c = chunks[0]
            rest = len(c) - self.head
            if rest <= count:
                pieces.append(c[self.head:] if self.head else c)
                chunks.popleft()
                self.head = 0
                count -= rest
            else:
                pieces.append(c[self.head:self.head + count])
                self.head += count
                count = 0
        return "".join(pieces)

    def release(self, new: str, final: bool) -> tuple[str, int, int]:
        """(text released, start, length of the stop found in it or length 0)."""
        state, start, length = self.ac.scan(self.state, new, self.held)
        if new:
            self.chunks.append(new)
            self.held += len(new)
        if length or final:
            out = self._take(self.held)
            self.held = 0
            return out, start, length
        self.state = state
        keep = self.ac.dep[state]
        out = self._take(self.held - keep)
        self.held = keep
        return out, 0, 0


class TextStream:
    """Text deltas of one choice, stop strings applied.

    Call `add(token_id)` per output token and `finish()` when the engine finished the choice;
    `stopped` becomes the matched stop string when one fires (then the caller ignores later
    tokens and, once every choice is done, the request is aborted).

    New text joins the held text (the longest suffix of the text so far that is a proper
    prefix of some stop string); the earliest stop string there (the longest at a tie) ends
    the choice; otherwise all but the new longest such suffix is released. Searching the held
    and new text suffices: no stop string can start in text already released. Cost per
    token: O(new text) (a few short stops: O(held + new text) at C speed), whatever the
    number of stop strings.
    """

    def __init__(self, tokenizer: ProxyTokenizer, stop: Sequence[str] = (), *,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.stopped: str | None = None
        self._stops = stop_filter(self.stop)

    def add(self, token_id: int) -> str:
        """Released text after this token ("" when nothing is certain yet)."""
        return self._release(self.detok.add(token_id), final=False)

    def finish(self) -> str:
        """Everything still held, once the engine finished the choice (a stop string may still
        fire in the last held text)."""
        return self._release(self.detok.finish(), final=True)

    def _release(self, new: str, final: bool) -> str:
        if self.stopped is not None:
            return ""
        if self._stops is None:
            return new
        out, start, length = self._stops.release(new, final)
        if length:
            self.stopped = out[start:start + length]
            return out[:start + length] if self.include_stop else out[:start]
        return out


def stop_filter(stops: Sequence[str]) -> _FewStops | _ManyStops | None:
    """The stop-string search for one stream (None without stop strings): `release(new,
    final)` -> (text, start, length): the text released, and where the stop string that
    fired lies in it (length 0: none fired; the text is then all released)."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    if len(stops) <= _FEW_STOPS and max(map(len, stops)) <= _SHORT_STOP:
        return _FewStops(stops)
    return _ManyStops(stops)
