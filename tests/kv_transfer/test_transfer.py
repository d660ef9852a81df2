"""KV transfer between real P and D processes (CPU pools): bit-exact moves over shm and tcp,
and every fault ending with both pools all free (and, over tcp, no thread left behind).
The tcp data plane's own faults are in test_tcp.py."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.kv_transfer.harness import all_free, wait_for


def kinds(p, rid):
    return [k for r, k, _ in p.call("log") if r == rid]


def threads(p, prefix: str) -> int:
    return sum(t.startswith(prefix) for t in p.call("threads"))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_32_concurrent_requests_move_bit_exact(procs, transport):
    d = procs("D", transports=[transport])
    p = procs("P", shm=True)
    addr = d.call("address")
    lengths = [random.Random(i).randrange(1, 200) for i in range(32)]
    want = {}
    for i, n in enumerate(lengths):
        d.call("reserve", f"r{i}", n, 30.0)
        want[f"r{i}"] = p.call("fill", f"r{i}", n, 1000 + i)
    for i, n in enumerate(lengths):
        p.call("offer", f"r{i}", addr, n, 30.0)
    wait_for(lambda: len(d.call("arrived")) == 32)
    for rid, digest in want.items():
        assert d.call("read", rid) == digest, rid
    assert p.call("stats")[addr]["transport"] == transport
    wait_for(lambda: all_free(p))
    assert all_free(d)


def test_p_killed_mid_transfer_fails_on_d_within_its_deadline(procs):
    d = procs("D", transports=["tcp"], transfer_timeout=1.0)
    p = procs("P", stall_push=True)  # P accepts D's SEND but never pushes
    addr = d.call("address")
    d.call("reserve", "r", 40, 30.0)
    p.call("fill", "r", 40, 1)
    p.call("offer", "r", addr, 40, 30.0)
    time.sleep(0.3)
    p.kill()
    t0 = time.monotonic()
    wait_for(lambda: "failed" in kinds(d, "r"), timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert all_free(d)


def test_d_killed_after_reserving_p_frees(procs):
    d = procs("D")
    p = procs("P", transfer_timeout=1.0)
    addr = d.call("address")
    d.call("reserve", "r", 40, 30.0)
    d.kill()
    p.call("fill", "r", 40, 1)
    p.call("offer", "r", addr, 40, 1.0)
    wait_for(lambda: "failed" in kinds(p, "r"), timeout=5)
    assert all_free(p)


@pytest.mark.parametrize("side", ["D", "P"])
def test_cancel_mid_transfer_frees_both_sides(procs, side):
    d = procs("D", transports=["tcp"])
    p = procs("P", stall_push=True)
    addr = d.call("address")
    d.call("reserve", "r", 40, 30.0)
    p.call("fill", "r", 40, 1)
    p.call("offer", "r", addr, 40, 30.0)
    time.sleep(0.3)  # the offer is in flight: D has asked for the data
    (d if side == "D" else p).call("cancel", "r")
    wait_for(lambda: all_free(d) and all_free(p), timeout=5)
    if side == "P":
        assert "cancelled" in kinds(d, "r")
    else:
        assert "cancelled" in kinds(p, "r")


def test_reservation_never_filled_expires(procs):
    d = procs("D")
    d.call("reserve", "r", 40, 0.5)
    wait_for(lambda: "expired" in kinds(d, "r"), timeout=5)
    assert all_free(d)


def test_mismatched_layout_refused_with_the_reason(procs):
    d = procs("D")
    p = procs("P", compat={"block_size": 32})
    addr = d.call("address")
    d.call("reserve", "r", 40, 30.0)
    p.call("fill", "r", 40, 1)
    p.call("offer", "r", addr, 40, 30.0)
    wait_for(lambda: "failed" in kinds(p, "r"), timeout=5)
    reason = [why for r, k, why in p.call("log") if r == "r"][0]
    assert "block_size differs" in reason
    assert p.call("stats")[addr] == {"state": "refused", "transport": "",
                                     "reason": reason.removeprefix("D refused: ")}
    assert all_free(p)
    d.call("cancel", "r")
    wait_for(lambda: all_free(d), timeout=5)


def test_wrong_internal_token_refused(procs):
    d = procs("D", token="secret")
    p = procs("P", token="guess")
    addr = d.call("address")
    p.call("fill", "r", 20, 1)
    p.call("offer", "r", addr, 20, 30.0)
    wait_for(lambda: "failed" in kinds(p, "r"), timeout=5)
    assert "wrong internal token" in p.call("log")[0][2]
    assert all_free(p)


def test_restarted_p_is_remapped(procs):
    d = procs("D")
    addr = d.call("address")
    p1 = procs("P", shm=True, name="P-a")
    d.call("reserve", "r1", 50, 30.0)
    want = p1.call("fill", "r1", 50, 7)
    p1.call("offer", "r1", addr, 50, 30.0)
    wait_for(lambda: "r1" in d.call("arrived"))
    assert d.call("read", "r1") == want
    p1.kill()  # its pool file stays behind until swept; D still maps the old one
    p2 = procs("P", shm=True, name="P-a")
    d.call("reserve", "r2", 70, 30.0)
    want2 = p2.call("fill", "r2", 70, 8)
    p2.call("offer", "r2", addr, 70, 30.0)
    wait_for(lambda: "r2" in d.call("arrived"))
    assert d.call("read", "r2") == want2  # read through the new mapping, not the old one
    assert d.call("stats")["peers"] == {"P-a": "shm"}
    assert all_free(d)


def test_200_transfers_racing_with_cancels_leak_nothing(procs):
    d = procs("D", transports=["tcp"], transfer_timeout=5.0)
    p = procs("P", transfer_timeout=5.0)
    addr = d.call("address")
    rng = random.Random(3)
    for i in range(200):
        n = rng.randrange(1, 64)
        wait_for(lambda: d.call("drain") >= 0 and d.call("free")[0] >= 8, timeout=10)
        d.call("reserve", f"r{i}", n, 10.0)
        p.call("fill", f"r{i}", n, i)
        p.call("offer", f"r{i}", addr, n, 10.0)
        if rng.random() < 0.3:
            (d if rng.random() < 0.5 else p).call("cancel", f"r{i}")
    # every reservation resolves: arrived (then drained) or cancelled/failed (freed)
    wait_for(lambda: d.call("drain") >= 0 and all_free(d) and all_free(p), timeout=30,
             interval=0.2)
    outcomes = [k for _, k, _ in d.call("log")]
    assert outcomes.count("arrived") > 100  # most moved; cancels raced the rest
    # tcp threads: one sender on P and one reader on D per data connection, none leaked
    conns = p.call("stats")[addr]["data_connections"]
    wait_for(lambda: threads(p, "kv-tcp-sender") == conns == threads(d, "kv-tcp-reader"))
    assert d.call("stats")["tcp_connections"] == conns


def test_a_d_frozen_past_the_heartbeat_timeout_gets_a_fresh_session(procs):
    """D is SIGSTOPped for 5 s (past the 3 s heartbeat timeout), then continued: P notices
    the lost connection, opens a new session, and transfers to D work again at once. With
    one fixed identity per P the ROUTER ignored the reconnection and every later transfer
    waited for its deadline (`../shared/reference/zmq_stall_repro.py`)."""
    d = procs("D", transports=["tcp"])
    p = procs("P", transfer_timeout=3.0)
    addr = d.call("address")
    d.call("reserve", "r1", 40, 30.0)
    want1 = p.call("fill", "r1", 40, 1)
    p.call("offer", "r1", addr, 40, 30.0)
    wait_for(lambda: "r1" in d.call("arrived"))
    assert d.call("read", "r1") == want1
    assert p.call("stats")[addr]["session"] == 1
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        p.call("fill", "r2", 40, 2)
        p.call("offer", "r2", addr, 40, 3.0)  # sent into the frozen D: fails at its deadline
        time.sleep(5)
        pass
        time.sleep(2.0)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    d.call("reserve", "r3", 40, 30.0)
    want3 = p.call("fill", "r3", 40, 3)
    p.call("offer", "r3", addr, 40, 10.0)
    wait_for(lambda: "r3" in d.call("arrived"), timeout=10)
    assert time.monotonic() - resumed < 5.0
    assert d.call("read", "r3") == want3
    assert p.call("stats")[addr]["state"] == "ready"
    wait_for(lambda: "failed" in kinds(p, "r2"), timeout=10)
    wait_for(lambda: all_free(p) and all_free(d), timeout=10)
