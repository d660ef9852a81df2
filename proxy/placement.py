"""Per-request placement (issue 21): prefill a prompt on a P and hand its KV to D, or let the
chosen D prefill it itself, whichever meets the SLOs with the most headroom.

The estimates come from the workers' load reports: each engine measures its prompt tokens per
second (over steps that prefilled, mixed steps included) and its decode step time
(`engine/llm_engine.py` `StepRates`), and reports its queued prompt tokens
(`pending_prefill_tokens`). For a prompt of N tokens still to compute (its cached prefix
subtracted):

- on P: TTFT ≈ (P's queued tokens + tokens routed there and not yet reported + the
  prompts waiting at the proxy for a route + N) ÷ P's prefill rate + the KV transfer
  (`transfer_s`, a constant here);
- on a both-role worker prefilling for another (flexible roles): as on D itself (below),
  plus the transfer, at a cost to that worker's own running decodes;
- on D itself: D runs the prompt in chunks of its step budget B beside its running decodes,
  so each such step takes about decode_step + chunk ÷ rate; TTFT ≈ ceil((queued + N) ÷ B)
  steps of that, and every decode running on D sees that step time as its inter-token gap
  while the prompt runs.

A placement meets the SLO when its TTFT estimate is within `slo.ttft_s` and, for D itself,
the gap it imposes on D's running decodes (if any) is within `slo.itl_s`. Among those that
meet it the one with the larger relative headroom wins (on a tie P/D: it leaves D's decodes
alone); when neither meets it, the side whose step keeps its streams' ITL bound (a late
first token costs one request, a long step every stream on that worker), else the smaller
TTFT. A both-role P (flexible roles) is used when it meets the SLOs and D itself does not
(two collocated workers are the better layout until D's own steps break the bounds), and
when neither meets them, if fewer running streams would see its prefill steps than D's.
Over a pool of both-role workers only (no dedicated P), D and P are chosen together
(`decide_flexible`, called by `ClusterBackend._place_flexible`): collocate while a full
prompt chunk beside a worker's streams keeps their gap within `SUSTAIN_FRACTION` of the ITL
bound, else P/D onto the D running the most streams, and the proxy keeps a worker it chose
as P out of D's role until the pool collocates, where mixed steps were measured to keep the
bound, for `HOLD_TTFTS` TTFT bounds without pairing (docs/design-changes.md, sessions 12
and 14). A worker's rates it has not measured are its peers' (`borrowed_loads`); before
anyone measured anything the pool pairs from the first request, and until someone ran a
mixed step whole requests gather on one worker: the other stays clean for P's role.
Without measurements on both sides (a worker that has not run a step since it started; a D
that never prefilled borrows a P's rate), `decide` returns None and the caller
keeps its rule by prompt length. Nothing here blocks or talks to a worker: pure functions
over a `Worker`'s load and info.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# a worker collocates (takes whole requests beside its streams) while a full prompt chunk
# beside them keeps their gap within this fraction of the ITL bound: its streams, and their
# contexts, grow between one decision and the next (measured on the step-model simulator:
# at 1.0 both workers filled with streams before their mixed steps broke the bound, and the
# pool took seconds to drain one into P's role; at 0.85, on the H200 fit at time scale 8 and
# 7.5 req/s (~0.95 x 1 P + 1 D's knee), D collocated for its first seconds at estimated
# gaps of 0.65-0.85 x the bound while its mixed steps ran at ~0.95 x, and 81.5% of requests
# met the strict SLO against 97.9% for 1 P + 1 D; at 0.7, 97.3%: session 14)
SUSTAIN_FRACTION = 0.7
TRANSFER_S = 0.005  # the P->D KV handoff's typical cost on one host (BENCHMARKS.md, issue 15)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    itl_s: float


@dataclass(frozen=True)
class Estimate:
    route: str  # "pd" (prefill on P) or "skip_p" (D prefills itself)
    ttft_s: float
    itl_s: float | None  # the gap D's running decodes see meanwhile (skip_p), else None
    streams: int = 0  # the running streams that see that gap (the prefilling worker's)

    def meets(self, slo: SLO) -> bool:
        return self.ttft_s <= slo.ttft_s and (self.itl_s is None or self.itl_s <= slo.itl_s)

    def headroom(self, slo: SLO) -> float:
        """The smaller relative margin left under the SLO's bounds (negative: over)."""
        room = 1.0 - self.ttft_s / slo.ttft_s
        if self.itl_s is not None:
            room = min(room, 1.0 - self.itl_s / slo.itl_s)
        return room


def on_p(load: dict[str, Any], routed_tokens: int, prompt_tokens: int,
         transfer_s: float = TRANSFER_S) -> Estimate | None:
    """TTFT if P prefills: its queue, what is on its way there, then this prompt."""
    rate = load.get("prefill_tokens_per_s")
    if not rate:
        return None
    queued = load.get("pending_prefill_tokens", 0) + routed_tokens
    return Estimate("pd", (queued + prompt_tokens) / rate + transfer_s, None)


def streams(load: dict[str, Any]) -> int:
    """The streams decoding on a worker (what a prompt chunk beside them slows down): its
    report's `num_requests_decoding`, else (older workers) every running request."""
    n = load.get("num_requests_decoding")
    return int(load.get("num_requests_running", 0) if n is None else n)


def _rate(load: dict[str, Any], beside_decodes: bool,
          fallback_rate: float | None = None) -> float | None:
    """The prompt tokens/s to expect: in a step beside running decodes, the marginal rate
    measured in such steps (`mixed_prefill_tokens_per_s`: on our engine a mixed step costs
    more than its parts), else (or until measured) the rate over every prefilling step."""
    rate = load.get("prefill_tokens_per_s") or fallback_rate
    if beside_decodes:
        rate = load.get("mixed_prefill_tokens_per_s") or rate
    return rate


def on_d(load: dict[str, Any], routed_tokens: int, prompt_tokens: int,
         step_budget: int, fallback_rate: float | None = None) -> Estimate | None:
    """TTFT if D prefills the prompt itself, and the gap its running decodes see meanwhile.
    `fallback_rate`: the prefill rate to assume while D has measured none (a D behind P's
    only decodes; the caller passes a P's, the same model on like hardware)."""
    running = streams(load)
    rate = _rate(load, running > 0, fallback_rate)
    step_ms = load.get("decode_step_ms")
    if not rate or step_ms is None:
        return None
    queued = load.get("pending_prefill_tokens", 0) + routed_tokens
    work = queued + prompt_tokens
    chunk = min(step_budget, work)
    step_s = step_ms / 1e3 + chunk / rate
    steps = max(1, math.ceil(work / step_budget))
    return Estimate("skip_p", steps * step_s, step_s if running else None, running)


RATE_KEYS = ("prefill_tokens_per_s", "mixed_prefill_tokens_per_s", "decode_step_ms")


def borrowed_loads(loads: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The loads of a pool of both-role workers (one model on like GPUs), each rate a worker
    has not measured yet taken from a worker that has: a worker that never ran such a step
    (the idle one of a pair, a P that never decoded, a D that never prefilled) is judged by
    its peers' costs instead of leaving every estimate out until it happens to run one."""
    known = {k: ld[k] for ld in loads.values() for k in RATE_KEYS if ld.get(k) is not None}
    out = {}
    for key, load in loads.items():
        missing = {k: v for k, v in known.items() if load.get(k) is None}
        out[key] = {**load, **missing} if missing else load
    return out


def mixed_gap_s(load: dict[str, Any], mixed_budget: int) -> float | None:
    """The inter-token gap a worker's streams would see in a step that also runs a full
    chunk of prompt (`mixed_budget` tokens): its decode step plus that chunk at the marginal
    rate of its mixed steps. None until measured."""
    rate, step_ms = _rate(load, True), load.get("decode_step_ms")
    if not rate or step_ms is None:
        return None
    return step_ms / 1e3 + mixed_budget / rate


def on_shared_p(load: dict[str, Any], routed_tokens: int, prompt_tokens: int,
                step_budget: int, transfer_s: float = TRANSFER_S) -> Estimate | None:
    """TTFT if a both-role worker prefills the prompt for another (flexible roles): it runs
    the prompt in chunks beside its own decodes, as a D prefilling itself does (`on_d`),
    then the KV moves; the gap its running decodes see meanwhile is the ITL cost."""
    est = on_d(load, routed_tokens, prompt_tokens, step_budget)
    if est is None:
        return None
    return Estimate("pd", est.ttft_s + transfer_s, est.itl_s, est.streams)


def decide(p_est: Estimate | None, d_est: Estimate | None, slo: SLO,
           shared_p: bool = False) -> Estimate | None:
    """The placement to use, or None when either side has no estimate yet. `shared_p`: P is
    a both-role worker (flexible roles): D itself when that meets the SLOs, else P when that
    does, else the side whose prefill steps fewer running streams see (measured on
    step-model fakes, BENCHMARKS.md session 7: choosing by headroom between two both-role
    workers piled the prompts on one of them and cost TTFT well below the knee)."""
    if p_est is None or d_est is None:
        return None
    if shared_p:
        if d_est.meets(slo):
            return d_est
        if p_est.meets(slo):
            return p_est
        # neither: prefill where the fewest running streams see its steps. The worker that
        # prefills gets no new decodes while its queue lasts (the proxy picks D by load,
        # queued prompts counted), so under sustained load one worker drifts into P's role
        # and the other into D's, as a disaggregated pair would
        return p_est if p_est.streams < d_est.streams else d_est
    meeting = [e for e in (p_est, d_est) if e.meets(slo)]
    if meeting:
        return max(meeting, key=lambda e: (e.headroom(slo), e.route == "pd"))
    # a late first token costs this request; a long step, every stream on the worker that
    # runs it: keep the streams' bound if one side does
    itl_ok = [e for e in (p_est, d_est) if e.itl_s is None or e.itl_s <= slo.itl_s]
    if len(itl_ok) == 1:
        return itl_ok[0]
    return min((p_est, d_est), key=lambda e: (e.ttft_s, e.route != "pd"))


@dataclass(frozen=True)
class Option:
    """One way to serve a request over workers that all take both roles (flexible roles):
    `p` prefills it for `d` (route "pd"), or `d` prefills it itself (`p` None, "skip_p")."""

    est: Estimate
    d: Any
    p: Any | None
    d_streams: int  # the streams running on D
    sustains: bool  # D's steps would keep its streams' gap within the ITL bound with a
    # prompt chunk beside them (mixed steps cheap enough to collocate; True until measured)


def decide_flexible(options: list[Option], slo: SLO, preferred: Any,
                    pack: bool = False) -> Option | None:
    """Placement over a pool of both-role workers, choosing D and P together (the proxy's
    pick by load alone names the idlest worker D, which spreads decodes over every worker and
    puts prompt chunks into every worker's steps). In order:

    1. D prefills it itself, within the SLOs, on a worker whose mixed steps keep the ITL
       bound (`sustains`) or that runs no stream (nothing to hurt yet) — only while no
       worker decodes that could take it (else 2): collocated serving while it is the cheaper
       layout; the load-preferred worker first, then by headroom. `pack` (no mixed step
       measured anywhere yet): the worker running the most streams first instead, so the
       others stay clean for P's role should mixed steps prove dear.
    2. P/D within the SLOs, onto the D with the most streams (decodes gather on one worker,
       prompts on the others: a disaggregated pair forms under load, where mixed steps cost
       more than the ITL bound allows).
    3. None meets them: the soonest first token among the placements whose steps keep the
       ITL bound (a late first token costs one request, a long step every stream beside
       it) — whole beside streams only where a full chunk would keep it (`sustains`: a
       short prompt's own estimate misses what a mixed step costs beyond its tokens) —
       else P/D from the worker running the fewest streams to the one running the most
       (its steps clean while it decodes; the P's streams drain).

    (Session 14 dropped a rule between 2 and 3, "D prefills it itself within the SLOs on any
    worker": it put short prompts beside a D's hundreds of streams, whose mixed steps then
    broke the bound for all of them: docs/design-changes.md.)
    """
    if not options:
        return None
    pds = [o for o in options if o.est.route == "pd"]
    meets_pd = [o for o in pds if o.est.meets(slo)]
    whole_ok = [o for o in options if o.est.route == "skip_p" and o.est.meets(slo)]
    decoding = [o for o in meets_pd if o.d_streams > 0]
    collocate = [o for o in whole_ok if o.sustains or (o.d_streams == 0 and not decoding)]
    if collocate:
        if pack:  # onto the worker already decoding the most: the others stay clean
            return max(collocate, key=lambda o: (o.d_streams, o.d is preferred,
                                                 o.est.headroom(slo)))
        return max(collocate, key=lambda o: (o.d is preferred, o.est.headroom(slo)))
    if meets_pd:
        return max(meets_pd, key=lambda o: (o.d_streams, o.est.headroom(slo)))
    # a late first token costs this request, a long step every stream of the worker that
    # runs it: the soonest first token among the placements whose steps keep the ITL bound
    # (a whole request beside streams only where a full chunk beside them does: a short
    # prompt's estimate misses what a mixed step costs beyond its tokens)
    keep = [o for o in options if (o.est.itl_s is None or o.est.itl_s <= slo.itl_s)
            and (o.est.route == "pd" or o.sustains or o.d_streams == 0)]
    if keep:
        return min(keep, key=lambda o: (o.est.ttft_s, o.est.route != "pd"))
    if pds:
        return min(pds, key=lambda o: (o.est.streams, -o.d_streams, o.est.ttft_s))
    return min(options, key=lambda o: o.est.ttft_s)
