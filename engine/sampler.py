"""Token sampling for one step, batched over every sequence that samples.

Order, as vLLM applies it: penalties (repetition on prompt and output tokens, presence and
frequency on output tokens) -> min_tokens masks EOS and stop ids -> greedy rows take the
argmax; random rows divide by temperature, drop tokens under min_p * max prob, keep the
top-k by value and the top-p nucleus, and draw by an exponential race: the token maximising
p / E, E = -log(u). Each u comes from a counter-based generator (kernels/sampling.py) keyed
by (seed, choice_index) with counter (output position, token id), so a seeded request draws
the same tokens alone, in any batch, after a retry, and on CPU or GPU (bit-equal uniforms).
Nothing here holds per-request generator state.

A row may bring a token mask (`SampleRow.allowed`, a bool [vocab] tensor, or
`SampleRow.bitmask`, int32 words with a bit per token: structured outputs): tokens outside
it are set to -inf after penalties and min_tokens, before the greedy argmax or the
filters, so a masked row only ever draws an allowed token (its processed logprobs are those
of the masked distribution). Rows without one are untouched.

A row's `logit_bias` (OpenAI's) is added to its logits first, before penalties (vLLM's
order).

Logprobs follow `logprobs_mode` (vLLM V1's names): raw_logprobs (the default) are the
model's own log-softmax, before biases, penalties, masks, temperature and filters;
processed_logprobs those of the distribution the token was drawn from (after all of them;
greedy rows: temperature 1); raw_logits / processed_logits the same values before the
log-softmax. Ranks are within the reported values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pdserve.common.params import SamplingParams
from pdserve.common.wire import Logprob

RaceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one sequence for one draw."""

    params: SamplingParams
    seed: int
    choice_index: int
    token_ids: Sequence[int]  # the sequence's prompt + output so far
    num_prompt_tokens: int
    min_tokens_blocked: Sequence[int] = ()  # EOS and stop ids masked until min_tokens
    allowed: torch.Tensor | None = None  # bool [vocab]: the tokens this draw may take
    bitmask: torch.Tensor | None = None  # int32 [ceil(vocab / 32)]: bit t set: t allowed
    # the output position of this draw, where token_ids does not end at it yet (an
    # asynchronous step: the previous token is still on the device); None: len(token_ids)
    output_position: int | None = None

    @property
    def num_output_tokens(self) -> int:  # the draw is for this output position
        if self.output_position is not None:
            return self.output_position
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_simple(self) -> bool:
        """Whether this draw needs nothing but its logits, temperature, filters and seed: no
        bias, penalty, mask, logprobs or active min_tokens. Simple rows need no host state of
        the tokens so far, so a step can draw them before the previous step's token is back
        (`Sampler.draw`)."""
        p = self.params
        return (self.allowed is None and self.bitmask is None and not p.logit_bias
                and not p.has_penalties and p.logprobs is None
                and not (self.num_output_tokens < p.min_tokens and self.min_tokens_blocked))


class SampleResult(NamedTuple):
    token: int
    logprobs: dict[int, Logprob] | None  # sampled token first, then the top-N


def _rows(idx: list[int], device: torch.device) -> torch.Tensor:
    return to_device(idx, torch.long, device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync: on CUDA through pinned memory and
    a non-blocking copy (a copy from pageable memory would wait for the stream's queued
    work, i.e. for the step in flight)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """In place: each row's logit_bias added to its tokens (ids outside the vocabulary are
    ignored here; the proxy and the engine refuse them before)."""
    V = logits.shape[1]
    for i, r in enumerate(rows):
        bias = r.params.logit_bias
        if bias:
            ids = [t for t in bias if t < V]
            logits[i, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype,
                                           device=logits.device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """In place on logits [N, V] for rows that have penalties."""
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return
    device, V = logits.device, logits.shape[1]
    sel = _rows(idx, device)
    sub = logits[sel]
    counts = torch.zeros(len(idx), V + 1, device=device)  # column V absorbs padding
    seen_prompt = torch.zeros(len(idx), V + 1, dtype=torch.bool, device=device)

    def padded(lists: list[Sequence[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in lists))
        return torch.tensor([list(x) + [V] * (width - len(x)) for x in lists], device=device)

    out_ids = padded([rows[i].token_ids[rows[i].num_prompt_tokens:] for i in idx])
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
    seen_prompt.scatter_(1, padded([rows[i].token_ids[:rows[i].num_prompt_tokens] for i in idx]),
                         True)
    counts, seen_prompt = counts[:, :V], seen_prompt[:, :V]
    p = [rows[i].params for i in idx]
    rep = torch.tensor([x.repetition_penalty for x in p], device=device)[:, None]
    freq = torch.tensor([x.frequency_penalty for x in p], device=device)[:, None]
    pres = torch.tensor([x.presence_penalty for x in p], device=device)[:, None]
    seen = seen_prompt | (counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[sel] = sub


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    for i, r in enumerate(rows):
        if r.num_output_tokens < r.params.min_tokens and r.min_tokens_blocked:
            logits[i, list(r.min_tokens_blocked)] = float("-inf")


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [N, W] bitmasks (bit t of a row: token t) -> bool [N, vocab], where they are."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].bool()


def _stacked(masks: list, dtype: torch.dtype, width: int, what: str,
             device: torch.device) -> torch.Tensor:
    """Per-row masks checked (dtype, shape) and stacked, then sent to `device` at once."""
    for m in masks:
        if m.dtype != dtype or m.shape != (width,):
            raise ValueError(f"{what} must be a {dtype} tensor of shape ({width},), got "
                             f"{m.dtype} {tuple(m.shape)}")
    return torch.stack(masks).to(device, non_blocking=True)


def apply_token_masks(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """In place: -inf outside each masked row's allowed tokens. Bool masks and bitmasks
    each travel to the device as one stacked tensor; one check (one sync) for rows that allow
    no token."""
    idx = [i for i, r in enumerate(rows) if r.allowed is not None or r.bitmask is not None]
    if not idx:
        return
    device, V = logits.device, logits.shape[1]
    W = (V + 31) // 32
    allowed = torch.ones(len(idx), V, dtype=torch.bool, device=device)
    bool_rows = [k for k, i in enumerate(idx) if rows[i].allowed is not None]
    bit_rows = [k for k, i in enumerate(idx) if rows[i].bitmask is not None]
    if bool_rows:
        allowed[bool_rows] = _stacked([rows[idx[k]].allowed for k in bool_rows], torch.bool,
                                      V, "a token mask", device)
    if bit_rows:
        words = _stacked([rows[idx[k]].bitmask for k in bit_rows], torch.int32, W,
                         "a token bitmask", device)
        allowed[bit_rows] &= unpack_bitmask(words, V)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("a token mask allows no token")
    sel = _rows(idx, device)
    logits[sel] = logits[sel].masked_fill(~allowed, float("-inf"))


def apply_filters(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, use: tuple[bool, bool, bool] | None = None
                  ) -> torch.Tensor:
    """min-p, then top-k (by value: ties with the k-th logit stay) and top-p on x [N, V]
    (temperature-scaled logits); returns x with filtered tokens at -inf. `use`: whether any
    row has min_p > 0, top_k > 0, top_p < 1, where the caller knows (no device reads)."""
    if use is None:
        use = (bool((min_p > 0).any()), bool((top_k > 0).any()), bool((top_p < 1).any()))
    use_min_p, use_k, use_p = use
    if use_min_p:
        probs = torch.softmax(x, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        x = x.masked_fill(probs < threshold, float("-inf"))
    if not (use_k or use_p):
        return x
    xs, order = x.sort(dim=-1, descending=False)
    V = x.shape[1]
    if use_k:
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = xs.gather(1, (V - k)[:, None])
        xs = xs.masked_fill(xs < kth, float("-inf"))
    if use_p:
        cum = torch.softmax(xs, dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False  # the most likely token always stays
        xs = xs.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, xs)


def _logprobs(logp: torch.Tensor, tokens: torch.Tensor, num: int) -> dict[int, Logprob]:
    """logp [V] of one row -> {sampled token, then the top `num`}."""
    tok = int(tokens)
    lp = logp[tok]
    out = {tok: Logprob(float(lp), int((logp > lp).sum()) + 1)}
    if num > 0:
        vals, ids = logp.topk(num)
        for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True), start=1):
            out.setdefault(t, Logprob(v, rank))
    return out


class Sampler:
    """Draws one token per row. `race` is the exponential-race kernel for the device."""

    MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")

    def __init__(self, race: RaceFn, logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in self.MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(self.MODES)}, got "
                             f"{logprobs_mode!r}")
        self.race = race
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampleResult]:
        """logits [N, V] fp32 (modified in place) -> one result per row, in order."""
        if not rows:
            return []
        want = [r.params.logprobs for r in rows]
        any_logprobs = any(w is not None for w in want)
        raw = self.logprobs_mode.startswith("raw")
        raw_logits = logits.clone() if raw and any_logprobs else None
        apply_logit_bias(logits, rows)
        apply_penalties(logits, rows)
        apply_min_tokens(logits, rows)
        apply_token_masks(logits, rows)
        keep_dist = any_logprobs and not raw
        tokens, dist_logits = self._draw(logits, rows, keep_dist)
        logp = None
        if any_logprobs:
            values = raw_logits if raw_logits is not None else dist_logits
            logp = values if self.logprobs_mode.endswith("logits") \
                else torch.log_softmax(values, dim=-1)
        tokens_list = tokens.tolist()
        return [
            SampleResult(tok, None if n is None else _logprobs(logp[i], tokens[i], n))
            for i, (tok, n) in enumerate(zip(tokens_list, want, strict=True))
        ]

    def draw(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """The tokens [N] (int64, on the logits' device) of simple rows (`SampleRow.is_simple`)
        without waiting for them: nothing here reads the device, so the host can go on while
        the GPU runs. The same tokens as `__call__` draws for the same rows."""
        if not all(r.is_simple for r in rows):
            raise ValueError("Sampler.draw takes simple rows only (SampleRow.is_simple)")
        return self._draw(logits, rows, False)[0]

    def _draw(self, logits: torch.Tensor, rows: Sequence[SampleRow], keep_dist: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy rows: the argmax; random rows: temperature, filters, the exponential race.
        Returns the tokens and (with keep_dist) the logits each row drew from."""
        device = logits.device
        tokens = logits.argmax(dim=-1)
        dist_logits = logits  # the distribution each row draws from (greedy: as is)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand:
            sel = _rows(rand, device)
            p = [rows[i].params for i in rand]
            x = logits[sel] / to_device([q.temperature for q in p], torch.float32,
                                        device)[:, None]
            x = apply_filters(
                x,
                to_device([q.top_k for q in p], torch.int64, device),
                to_device([q.top_p for q in p], torch.float32, device),
                to_device([q.min_p for q in p], torch.float32, device),
                use=(any(q.min_p > 0 for q in p), any(q.top_k > 0 for q in p),
                     any(q.top_p < 1 for q in p)),
            )
            probs = torch.softmax(x, dim=-1)
            t = lambda vals: to_device(vals, torch.int64, device)  # noqa: E731
            tokens[sel] = self.race(
                probs, t([rows[i].seed for i in rand]), t([rows[i].choice_index for i in rand]),
                t([rows[i].num_output_tokens for i in rand]),
            )
            if keep_dist:
                dist_logits = logits.clone()
                dist_logits[sel] = x
        return tokens, dist_logits
