"""Per-request placement (`--placement slo`, proxy/placement.py) on synthetic load reports:
the estimates, the decision, and the route `ClusterBackend` takes from them; without
measurements the prompt-length rule still decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pdserve.common.params import SamplingParams
from pdserve.common.wire import RequestRecord
from pdserve.proxy import metrics, placement
from pdserve.proxy.cluster_backend import HOLD_TTFTS, ClusterBackend
from pdserve.proxy.placement import SLO, Estimate
from pdserve.proxy.registry import Registry, Worker

STRICT = SLO(ttft_s=1.0, itl_s=0.025)
RATE = 40_000.0  # prompt tokens/s, about an H200's on Llama-3-8B shapes (BENCHMARKS.md)


def test_estimates_follow_the_queues_and_the_step_budget() -> None:
    p = placement.on_p({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 8000}, 2000,
                       4000)
    assert p is not None and p.ttft_s == pytest.approx(14000 / RATE + placement.TRANSFER_S)
    d = placement.on_d({"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,
                        "num_requests_running": 10}, 0, 4000, step_budget=2048)
    # two chunked steps of 6 ms + 2048 tokens' prefill; running decodes see that step's time
    assert d is not None and d.itl_s == pytest.approx(0.006 + 2048 / RATE)
    assert d.ttft_s == pytest.approx(2 * d.itl_s)
    idle = placement.on_d({"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}, 0, 100, 2048)
    assert idle is not None and idle.itl_s is None  # nothing running there: no gap to keep
    assert placement.on_p({}, 0, 100) is None
    assert placement.on_d({"prefill_tokens_per_s": RATE}, 0, 100, 2048) is None


@pytest.mark.parametrize("p_load, d_load, tokens, want", [
    # a long prompt on a D with running decodes would stretch their gaps past 25 ms: P
    ({"prefill_tokens_per_s": RATE}, {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,
                                      "num_requests_running": 32}, 4000, "pd"),
    # P's queue holds 3 s of prompts; an idle D prefills it at once: D
    ({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 120_000},
     {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}, 4000, "skip_p"),
    # a short prompt beside running decodes: one step of 6 ms + 0.8 ms, within the ITL SLO,
    # and P is busy for 0.5 s: D has more headroom
    ({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 20_000},
     {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 8}, 32,
     "skip_p"),
    # neither meets the SLO (P 5 s behind, D 10 s): the smaller TTFT, P's
    ({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 200_000},
     {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,
      "pending_prefill_tokens": 400_000}, 4000, "pd"),
    # neither meets it (P 5 s behind; D would be quicker but its steps would stretch its 8
    # streams' gaps past 25 ms): P, whose lateness costs this request alone
    ({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 200_000},
     {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 8}, 4000,
     "pd"),
    # neither meets it, D has no streams to hurt: the smaller TTFT, D's
    ({"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 200_000},
     {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "pending_prefill_tokens": 60_000},
     4000, "skip_p"),
])
def test_the_decision_meets_the_slo_with_the_most_headroom(p_load: dict, d_load: dict,
                                                            tokens: int, want: str) -> None:
    chosen = placement.decide(placement.on_p(p_load, 0, tokens),
                              placement.on_d(d_load, 0, tokens, 2048), STRICT)
    assert chosen is not None and chosen.route == want, chosen


def test_no_decision_without_both_estimates() -> None:
    est = Estimate("pd", 0.1, None)
    assert placement.decide(est, None, STRICT) is None
    assert placement.decide(None, est, STRICT) is None


# ---- the route ClusterBackend takes ---------------------------------------------------------


@dataclass(eq=False)
class StubLink:
    """What routing reads of a WorkerLink: its load report and what is on its way."""

    load: dict[str, Any]
    busy: bool = False
    unacked: int = 0
    alive: bool = True
    routed: dict[str, int] = field(default_factory=dict)

    def in_flight(self) -> tuple[int, int]:
        return len(self.routed), sum(self.routed.values())


class StubRegistry:
    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.reference = {"block_size": 16}
        self.on_transfer = self.on_report = None
        self.flexible_roles = False

    def usable(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role and w.usable]

    prefillers = Registry.prefillers


def worker(url: str, role: str, load: dict[str, Any]) -> Worker:
    info: dict[str, Any] = {"limits": {"max_num_seqs": 256, "max_num_batched_tokens": 2048}}
    if role == "both":  # as a both-role worker's /info says it
        info.update(kv_address=url.replace("http", "tcp"), acts_as_prefill=True)
    return Worker(url, role, info=info, link=StubLink(load), healthy=True)  # type: ignore[arg-type]


def route_of(backend: ClusterBackend, num_tokens: int) -> str:
    rec = RequestRecord(f"r{num_tokens}", list(range(5, 5 + num_tokens)),
                        SamplingParams(max_tokens=16, seed=1))
    route = backend._route(rec, set(), [])
    assert route is not None
    backend._release(route, rec.request_id)
    return route[0]


def test_cluster_backend_routes_by_the_estimates_under_slo_placement() -> None:
    busy_d = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 32}
    p = worker("http://p", "prefill", {"prefill_tokens_per_s": RATE})
    d = worker("http://d", "decode", busy_d)
    slo = ClusterBackend(StubRegistry([p, d]), None, "m", placement="slo", slo=STRICT)  # type: ignore[arg-type]
    threshold = ClusterBackend(StubRegistry([p, d]), None, "m")  # type: ignore[arg-type]
    # a 4,000-token prompt: both rules send it to P (it would stall D's 32 streams)
    assert route_of(slo, 4000) == route_of(threshold, 4000) == "pd"
    # P is 3 s behind and D idle: the estimates keep the prompt off P; the length rule
    # would queue it there
    p.link.load = {"prefill_tokens_per_s": RATE, "pending_prefill_tokens": 120_000}  # type: ignore[union-attr]
    d.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}  # type: ignore[union-attr]
    assert route_of(slo, 4000) == "skip_p"
    # a P with a queue has no room: the length rule waits for it (None)
    rec = RequestRecord("r", list(range(5, 4005)), SamplingParams(max_tokens=16, seed=1))
    assert threshold._route(rec, set(), []) is None
    # not measured yet: the prompt-length rule, under either setting
    p.link.load, d.link.load = {}, {}  # type: ignore[union-attr]
    assert route_of(slo, 4000) == "pd" and route_of(slo, 8) == "skip_p"


def test_a_d_that_never_prefilled_borrows_the_p_rate() -> None:
    load = {"decode_step_ms": 6.0, "num_requests_running": 4}
    assert placement.on_d(load, 0, 100, 2048) is None
    est = placement.on_d(load, 0, 100, 2048, fallback_rate=RATE)
    assert est is not None and est.ttft_s == pytest.approx(0.006 + 100 / RATE)


def test_a_both_role_p_prefills_beside_its_own_decodes() -> None:
    load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 4,
            "pending_prefill_tokens": 1000}
    shared = placement.on_shared_p(load, 500, 4000, 2048)
    itself = placement.on_d(load, 500, 4000, 2048)
    assert shared is not None and itself is not None and shared.route == "pd"
    # the same chunked steps beside its decodes, then the transfer; its streams see the gap
    assert shared.ttft_s == pytest.approx(itself.ttft_s + placement.TRANSFER_S)
    assert shared.itl_s == itself.itl_s and shared.itl_s is not None
    # a both-role P only when it meets the SLOs and D itself does not: an idle both-role P
    # with more headroom than a D that meets them anyway leaves the prompt on D
    idle = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}
    even = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 10}
    p_est = placement.on_shared_p(idle, 0, 32, 2048)
    d_est = placement.on_d(even, 0, 32, 2048)
    assert p_est is not None and d_est is not None and d_est.meets(STRICT)
    assert p_est.headroom(STRICT) > d_est.headroom(STRICT)
    assert placement.decide(p_est, d_est, STRICT).route == "pd"  # a dedicated P: headroom
    chosen = placement.decide(p_est, d_est, STRICT, shared_p=True)
    assert chosen is not None and chosen.route == "skip_p"
    # D's steps would break its streams' bound and the both-role P meets the SLOs: paired
    long_d = placement.on_d(even, 0, 4000, 2048)
    long_p = placement.on_shared_p(idle, 0, 4000, 2048)
    assert long_d is not None and long_p is not None and not long_d.meets(STRICT)
    chosen = placement.decide(long_p, long_d, STRICT, shared_p=True)
    assert chosen is not None and chosen.route == "pd"
    # neither meets them, as many streams on each side: D serves it whole
    busy_p = placement.on_shared_p(even, 0, 4000, 2048)
    chosen = placement.decide(busy_p, long_d, STRICT, shared_p=True)
    assert chosen is not None and chosen.route == "skip_p"
    # neither meets them, fewer streams see P's prefill steps: P (its streams drain while it
    # prefills, as the proxy sends new decodes elsewhere)
    few = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0, "num_requests_running": 3,
           "pending_prefill_tokens": 200_000}
    fewer_p = placement.on_shared_p(few, 0, 4000, 2048)
    assert fewer_p is not None and not fewer_p.meets(STRICT) and fewer_p.streams == 3
    chosen = placement.decide(fewer_p, long_d, STRICT, shared_p=True)
    assert chosen is not None and chosen.route == "pd"


def test_two_both_role_workers_pair_up_only_when_it_pays() -> None:
    """Flexible roles: two both-role workers under --placement slo. Before anything is
    measured they pair up (one prefills for the other, held in P's role: no worker collects
    streams that would later make every step of a P mixed). Each serves a request whole
    while that meets the SLOs and its steps can take a full prompt chunk beside its streams
    within the ITL bound; otherwise P/D between them, and the worker chosen as P keeps that
    role (no new decodes) until a worker collocates where mixed steps were measured to
    pay. Without --placement slo they never pair."""
    a = worker("http://a", "both", {})
    b = worker("http://b", "both", {})
    flexible = ClusterBackend(StubRegistry([a, b]), None, "m", placement="slo", slo=STRICT)  # type: ignore[arg-type]
    fixed = ClusterBackend(StubRegistry([a, b]), None, "m")  # type: ignore[arg-type]
    assert flexible.registry.flexible_roles and not fixed.registry.flexible_roles
    now = [100.0]
    flexible.clock = lambda: now[0]
    assert route_of(fixed, 4000) == "both"
    # nothing measured: a (first by name, both idle) prefills for b and keeps P's role
    rec = RequestRecord("r0", list(range(5, 4005)), SamplingParams(max_tokens=16, seed=1))
    route = flexible._route(rec, set(), [])
    assert route is not None and route[0] == "pd" and route[1] is a and route[2] is b, route
    flexible._release(route, rec.request_id)
    assert flexible._held_p == {"http://a"}
    assert route_of(flexible, 8) == "both"  # too short to pair: served whole
    # a has no decodes but a queue of prompts (the busier by score: the decodes go to b);
    # b runs 20 streams, which a 4,000-token prompt's chunks (57 ms steps) would stall
    a.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,  # type: ignore[union-attr]
                   "pending_prefill_tokens": 12_000}
    b.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,  # type: ignore[union-attr]
                   "num_requests_running": 20}
    rec = RequestRecord("r", list(range(5, 4005)), SamplingParams(max_tokens=16, seed=1))
    route = flexible._route(rec, set(), [])
    assert route is not None and route[0] == "pd" and route[1] is a and route[2] is b, route
    flexible._release(route, rec.request_id)
    assert flexible._held_p == {"http://a"} and metrics.PLACEMENT_P_ROLE._value.get() == 1
    assert route_of(fixed, 4000) == "both"
    # a short prompt would fit one of b's steps, but b's steps cannot take a full chunk
    # beside its streams (6 ms + 2,048 tokens > 25 ms): a keeps P's role, b decodes
    assert route_of(flexible, 32) == "pd"
    # both run decodes alike, nothing meets the SLOs: a stays P (its streams drain), b D
    a.link.load = b.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,  # type: ignore[union-attr]
                                 "num_requests_running": 10}
    route = flexible._route(rec, set(), [])
    assert route is not None and route[0] == "pd" and route[1] is a and route[2] is b, route
    flexible._release(route, rec.request_id)
    assert route_of(fixed, 4000) == "both"  # without placement: served whole
    # a worker the request must avoid (a retry) is not its P either
    a.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}  # type: ignore[union-attr]
    b.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,  # type: ignore[union-attr]
                   "num_requests_running": 20}
    route = flexible._route(rec, {"http://a"}, [])
    assert route is not None and route[0] == "both" and route[1] is b, route
    flexible._release(route, rec.request_id)
    # mixed steps cheap again (256-token chunks fit beside b's streams): until a mixed step
    # was measured, whole requests gather on b (it runs the most streams) and a stays P
    for w in (a, b):
        w.info["limits"]["max_num_batched_tokens"] = 256
    route = flexible._route(rec, set(), [])
    assert route is not None and route[0] == "both" and route[1] is b, route
    flexible._release(route, rec.request_id)
    assert flexible._held_p == {"http://a"}
    # measured (b's mixed steps keep its streams' bound): the pool collocates, and once it
    # went HOLD_TTFTS TTFT bounds without pairing, a's P role ends and, idler, it takes the
    # next request whole
    b.link.load = {**b.link.load, "mixed_prefill_tokens_per_s": RATE}  # type: ignore[union-attr]
    assert route_of(flexible, 300) == "both" and flexible._held_p == {"http://a"}
    now[0] += HOLD_TTFTS * STRICT.ttft_s
    assert route_of(flexible, 300) == "both" and not flexible._held_p
    assert metrics.PLACEMENT_P_ROLE._value.get() == 0
    short = RequestRecord("s", list(range(5, 305)), SamplingParams(max_tokens=16, seed=1))
    route = flexible._route(short, set(), [])
    assert route is not None and route[0] == "both" and route[1] is a, route


def _opt(route: str, d: str, p: str | None, ttft: float, itl: float | None, p_streams: int,
         d_streams: int, sustains: bool = False) -> placement.Option:
    return placement.Option(Estimate(route, ttft, itl, p_streams if route == "pd" else d_streams),
                            d, p, d_streams, sustains)


def test_flexible_decisions_collocate_while_cheap_and_pair_up_when_not() -> None:
    """`decide_flexible` over both-role workers a and b (synthetic estimates)."""
    slo = STRICT
    # cheap mixed steps: whole, on the load-preferred worker first
    cheap = [_opt("skip_p", "a", None, 0.05, 0.015, 0, 12, sustains=True),
             _opt("skip_p", "b", None, 0.04, 0.014, 0, 10, sustains=True),
             _opt("pd", "a", "b", 0.03, 0.014, 10, 12, sustains=True)]
    assert placement.decide_flexible(cheap, slo, "a") is cheap[0]
    assert placement.decide_flexible(cheap, slo, "b") is cheap[1]
    # a decodes, b idle, mixed steps too dear for a's streams: b prefills for a (decodes
    # gather on a) rather than b taking the request whole
    dear = [_opt("skip_p", "a", None, 0.05, 0.031, 0, 30),
            _opt("skip_p", "b", None, 0.02, None, 0, 0),
            _opt("pd", "a", "b", 0.03, None, 0, 30),
            _opt("pd", "b", "a", 0.06, 0.031, 30, 0)]
    assert placement.decide_flexible(dear, slo, "b") is dear[2]
    # nobody decodes yet: whole on the preferred one
    cold = [_opt("skip_p", "a", None, 0.02, None, 0, 0), _opt("skip_p", "b", None, 0.02, None, 0, 0),
            _opt("pd", "a", "b", 0.03, None, 0, 0), _opt("pd", "b", "a", 0.03, None, 0, 0)]
    assert placement.decide_flexible(cold, slo, "b") is cold[1]
    # until mixed steps were measured (pack): whole onto the worker running the most
    # streams, whatever the load prefers, so the other stays clean for P's role
    assert placement.decide_flexible(cheap, slo, "b", pack=True) is cheap[0]
    # nothing meets the SLOs; a placement whose steps keep the ITL bound wins, soonest first
    late = [_opt("skip_p", "a", None, 3.0, 0.020, 0, 5, sustains=True),
            _opt("pd", "a", "b", 9.0, 0.030, 40, 5),
            _opt("skip_p", "b", None, 1.5, 0.040, 0, 40)]
    assert placement.decide_flexible(late, slo, "a") is late[0]
    # a whole request beside streams keeps the bound only where a full chunk would: a short
    # prompt's own estimate (20 ms) misses what a mixed step costs beyond its tokens
    late[0] = _opt("skip_p", "a", None, 3.0, 0.020, 0, 5, sustains=False)
    assert placement.decide_flexible(late, slo, "a") is late[1]
    # within the SLOs but not sustainable beside a's streams, and no P/D meets them: no
    # longer whole beside the streams (P/D, the soonest whose steps keep the bound)
    within = [_opt("skip_p", "a", None, 0.5, 0.020, 0, 5),
              _opt("pd", "a", "b", 1.2, None, 0, 5)]
    assert placement.decide_flexible(within, slo, "a") is within[1]
    # and when none does: P/D from the worker with the fewest streams to the one with most
    stuck = [_opt("skip_p", "a", None, 3.0, 0.05, 0, 50),
             _opt("skip_p", "b", None, 3.0, 0.05, 0, 20),
             _opt("pd", "a", "b", 4.0, 0.05, 20, 50),
             _opt("pd", "b", "a", 2.0, 0.05, 50, 20)]
    assert placement.decide_flexible(stuck, slo, "b") is stuck[2]
    assert placement.decide_flexible([], slo, "a") is None


def test_a_worker_reports_its_decoding_streams_apart_from_its_prefills() -> None:
    """`num_requests_decoding` is what a prompt chunk would slow down; a worker running only
    prompt chunks has none."""
    assert placement.streams({"num_requests_running": 7, "num_requests_decoding": 2}) == 2
    assert placement.streams({"num_requests_running": 7}) == 7  # older workers
    prefilling = {"prefill_tokens_per_s": RATE, "mixed_prefill_tokens_per_s": RATE / 4,
                  "decode_step_ms": 6.0, "num_requests_running": 3, "num_requests_decoding": 0}
    est = placement.on_d(prefilling, 0, 4000, 2048)
    assert est is not None and est.itl_s is None and est.streams == 0
    decoding = {**prefilling, "num_requests_decoding": 3}
    est = placement.on_d(decoding, 0, 512, 512)
    # beside decodes, a chunk costs what mixed steps measured
    assert est is not None and est.itl_s == pytest.approx(0.006 + 512 / (RATE / 4))
    assert placement.mixed_gap_s(decoding, 512) == pytest.approx(est.itl_s)
    assert placement.mixed_gap_s({"num_requests_running": 1}, 512) is None


def test_a_worker_gone_from_the_pool_is_no_longer_held_in_p_role() -> None:
    """The P-role hold names workers by URL: one that leaves the pool (ejected, scaled down)
    drops out of it at the next flexible decision."""
    a, b, c = (worker(f"http://{n}", "both", {}) for n in "abc")
    reg = StubRegistry([a, b, c])
    flexible = ClusterBackend(reg, None, "m", placement="slo", slo=STRICT)  # type: ignore[arg-type]
    a.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0}  # type: ignore[union-attr]
    for w in (b, c):
        w.link.load = {"prefill_tokens_per_s": RATE, "decode_step_ms": 6.0,  # type: ignore[union-attr]
                       "num_requests_running": 20}
    route = flexible._route(RequestRecord("r", list(range(5, 4005)),
                                          SamplingParams(max_tokens=16, seed=1)), set(), [])
    assert route is not None and route[0] == "pd" and route[1] is a, route
    flexible._release(route, "r")
    assert flexible._held_p == {"http://a"}
    reg.workers.remove(a)
    route_of(flexible, 4000)  # b and c alike: one of them becomes P
    assert "http://a" not in flexible._held_p and len(flexible._held_p) == 1
