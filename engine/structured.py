"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF grammar) turned into
the sampler's per-row token mask, with llguidance (Rust, no dependencies).

`Grammars` belongs to one engine: it builds llguidance's view of the engine's tokenizer once,
compiles each distinct `StructuredOutputs` spec once (cached), and keeps one matcher per
choice of each running request. A matcher is fed the choice's output ids as they grow; where
the output is not a continuation of what it has consumed (the request arrived on D after P
drew the first token, a failover resubmitted it with its output so far, a preemption
recomputed it), it is reset and replays the whole output, so the grammar state follows the
request wherever it runs. JSON is compiled without flexible whitespace: random weights would
otherwise wander in it.

A step's grammar rows get their masks together (`bitmasks`): llguidance fills one int32
bitmask (a bit per token) for all of them on its own threads, and the sampler unpacks it on
the device, so a step moves 1/8 of a bool mask's bytes and computes the rows in parallel.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from pdserve.common.grammar import grammar_text
from pdserve.common.params import StructuredOutputs

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256


class _RequestGrammar:
    """The matchers of one request's choices."""

    def __init__(self, owner: Grammars, spec: StructuredOutputs):
        self.owner, self.spec = owner, spec
        # choice -> [matcher, tokens consumed, the last of them]
        self.matchers: dict[int, list[Any]] = {}

    def advance(self, choice: int, output: list[int]) -> Any:
        """The choice's matcher, having consumed `output` (the choice's output so far)."""
        entry = self.matchers.get(choice)
        if entry is None:
            entry = self.matchers[choice] = [self.owner.matcher(self.spec), 0, None]
        m, n, last = entry
        # a request's output only grows (a failover or a handoff makes a new request, with
        # fresh matchers): length and last token tell a continuation without rescanning it
        if len(output) < n or (n and output[n - 1] != last):
            m.reset()
            n = 0
        new = output[n:]
        if new and not m.consume_tokens(new):
            raise ValueError(f"the output left the grammar: {m.get_error()}")
        entry[1], entry[2] = len(output), (output[-1] if output else None)
        return m


class Grammars:
    """Grammar masks for one engine (see the module's docstring). Not thread-safe beyond
    the cache: the engine's step thread calls `mask`."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        """`tokenizer`: the engine's `Tokenizer` (its Rust `tokenizers` backend is what
        llguidance reads); `vocab_size`: the model's (logits' width)."""
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids)
        self._lltok: Any = None
        self._compiled: OrderedDict[StructuredOutputs, str] = OrderedDict()
        self._lock = threading.Lock()
        self._requests: weakref.WeakKeyDictionary[Any, _RequestGrammar] = \
            weakref.WeakKeyDictionary()
        self._executor: Any = None  # llguidance's thread pool for batched masks

    def _tok(self) -> Any:
        if self._lltok is None:
            from llguidance import LLTokenizer

            backend = getattr(self._tokenizer, "backend", None)
            if backend is None:
                raise ValueError("structured outputs need the model's tokenizer (a Rust "
                                 "`tokenizers` one); this engine has none")
            try:  # recent llguidance takes every EOS id; 1.6 takes one
                self._lltok = LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=self.eos or None)
            except TypeError:
                self._lltok = LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=self.eos[0] if self.eos else None)
        return self._lltok

    def compiled(self, spec: StructuredOutputs) -> str:
        with self._lock:
            g = self._compiled.get(spec)
            if g is not None:
                self._compiled.move_to_end(spec)
                return g
        g = grammar_text(spec)
        with self._lock:
            self._compiled[spec] = g
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return g

    def matcher(self, spec: StructuredOutputs) -> Any:
        from llguidance import LLMatcher

        m = LLMatcher(self._tok(), self.compiled(spec), log_level=0)
        if m.is_error():
            raise ValueError(f"{spec.kind}: {m.get_error()}")
        return m

    def _state(self, request: Any, spec: StructuredOutputs) -> _RequestGrammar:
        state = self._requests.get(request)
        if state is None or state.spec != spec:
            state = self._requests[request] = _RequestGrammar(self, spec)
        return state

    @property
    def num_words(self) -> int:
        """int32 words of one bitmask row."""
        return (self.vocab_size + 31) // 32

    def bitmasks(self, items: list[tuple[Any, StructuredOutputs, int, list[int]]]
                 ) -> torch.Tensor:
        """The allowed next tokens of several choices at once, each item (request, spec,
        choice, output so far): an int32 [len(items), num_words] CPU tensor whose bit t of
        row i is set when token t is allowed. Matchers advance one by one (cheap); the masks
        are computed in parallel by llguidance's executor threads. ValueError if an output
        left its grammar (the engine then finds which request by running each alone)."""
        with _as_value_error():
            matchers = [(self._state(req, spec).advance(choice, output), i)
                        for i, (req, spec, choice, output) in enumerate(items)]
            bitmask = torch.zeros(len(items), self.num_words, dtype=torch.int32)
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            # what llguidance.torch.fill_next_token_bitmask_par does, without importing that
            # module (it compiles TorchScript at import): rows of num_words * 4 bytes
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(),
                                                   self.num_words * 4, len(items))
            return bitmask


class _as_value_error:
    """A grammar failure as the request's ValueError, which the engine contains (aborts
    that request): llguidance raises ValueError or RuntimeError, and a Rust panic is a
    BaseException."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: Any, tb: Any) -> bool:
        if e is None or isinstance(e, ValueError | KeyboardInterrupt | SystemExit):
            return False
        raise ValueError(f"structured output failed: {type(e).__name__}: {e}") from e
