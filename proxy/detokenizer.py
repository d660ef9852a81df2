"""Token ids -> text deltas, per choice, with stop strings.

`IncrementalDetokenizer` keeps vLLM's two offsets into the ids: text is decoded from a short
window `ids[prefix_offset:]` and compared with the window's old text `ids[prefix_offset:
read_offset]`; the difference is new text. A delta ending in U+FFFD is held back (the last
token may be the first bytes of a multi-byte character). Cost per token: two decodes of a
window of a few tokens, so O(1) in the output length. `finish()` decodes all ids once and
emits whatever the windows have not, so the contract holds for any tokenizer whose decode is
prefix-stable:

    "".join(every delta) + finish() == tokenizer.decode(all ids, skip_special_tokens)

`TextStream` puts stop strings on top: new text goes to a pending buffer; a stop string found
there ends the choice (the text is cut before it, or after it with include_stop_str_in_output);
otherwise everything but the longest suffix that could begin a stop string is released.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pdserve.proxy.tokenization import ProxyTokenizer

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one choice's output ids, delivered as it becomes certain."""

    def __init__(self, tokenizer: ProxyTokenizer, skip_special_tokens: bool = True):
        # No prompt context before the first window (vLLM adds some): the contract is with
        # decode(output ids) alone, which is what a non-streaming response returns too.
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted: list[str] = []  # every delta so far

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; returns the text it completes (often all of its text, sometimes ""
        while a multi-byte character is incomplete)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing certain yet: keep the window
        if not new_text.startswith(prefix_text):
            # the window's old text changed: not prefix-stable here; finish() reconciles
            logger.debug("detokenizer window not prefix-stable: %r -> %r", prefix_text, new_text)
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.emitted.append(delta)
        return delta

    def finish(self) -> str:
        """The remaining text after the last id: held-back bytes (decoded with U+FFFD if they
        never completed) and any correction, so the whole equals one decode of all ids."""
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        if full.startswith(done):
            rest = full[len(done):]
        else:  # a tokenizer whose decode is not prefix-stable: emit the windowed remainder
            logger.warning("streamed text diverged from the full decode; tail may differ")
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            rest = self._decode(self.ids[self.prefix_offset:])[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted.append(rest)
        return rest


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Text deltas of one choice, stop strings applied.

    Call `add(token_id)` per output token and `finish()` when the engine finished the choice;
    `stopped` becomes the matched stop string when one fires (then the caller ignores later
    tokens and, once every choice is done, the request is aborted).
    """

    def __init__(self, tokenizer: ProxyTokenizer, stop: Sequence[str] = (), *,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.pending = ""  # decoded, not yet released (could be the start of a stop string)
        self.stopped: str | None = None

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
        self.pending += new
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hit = self._find_stop()
        if hit is not None:
            pos, stop = hit
            self.stopped = stop
            end = pos + len(stop) if self.include_stop else pos
            out, self.pending = self.pending[:end], ""
            return out
        keep = 0 if final else _longest_stop_prefix_suffix(self.pending, self.stop)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the pending text (the longest one at a tie). Released
        text never ends inside a possible stop string, so searching `pending` suffices."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            pos = self.pending.find(stop)
            if pos >= 0 and (best is None or pos < best[0]
                             or (pos == best[0] and len(stop) > len(best[1]))):
                best = (pos, stop)
        return best
