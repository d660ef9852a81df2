"""cuda_ipc between real P and D processes with pools on GPUs: bit-exact pulls on one GPU and
across two, a restarted P remapped (the old mapping closed), P poisoning its blocks the
moment D releases them never reaching D's copy, tcp between GPU pools through pinned
buffers, and a broken registration downgraded to tcp, loudly. All gpu-marked
(tests/conftest.py skips them without CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.kv_transfer.harness import all_free, move, wait_for

pytestmark = pytest.mark.gpu

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
GPU_PAIRS = [pytest.param("cuda:0", "cuda:0", id="same-gpu"),
             pytest.param("cuda:0", "cuda:1", id="cross-gpu", marks=needs_two_gpus)]
IPC = ["cuda_ipc", "tcp"]


@pytest.mark.parametrize("p_dev,d_dev", GPU_PAIRS)
def test_32_concurrent_requests_move_bit_exact(procs, p_dev, d_dev):
    d = procs("D", device=d_dev, transports=IPC)
    p = procs("P", device=p_dev)
    addr = d.call("address")
    move(d, p, addr, {f"r{i}": random.Random(i).randrange(1, 200) for i in range(32)}, 1000)
    stats = d.call("stats")
    assert stats["peers"] == {"P0": "cuda_ipc"}, stats
    assert stats["num_downgrades"] == 0 and stats["cuda_ipc_mappings"] == 1, stats
    assert p.call("stats")[addr] == {"state": "ready", "transport": "cuda_ipc", "reason": "",
                                     "session": 1}
    wait_for(lambda: all_free(p))
    assert all_free(d)


def test_pulls_beside_a_busy_engine_run_on_few_programs_bit_exact(procs):
    """`--kv-pull-programs`: while D's engine runs steps, each cuda_ipc copy runs on that
    many programs of the gather (a bounded grid striding over every tile), same bytes."""
    d = procs("D", device="cuda:0", transports=IPC, busy=True, pull_programs=3)
    p = procs("P", device="cuda:0")
    move(d, p, d.call("address"), {f"r{i}": random.Random(i).randrange(1, 200)
                                    for i in range(12)}, 2000)
    assert d.call("stats")["peers"] == {"P0": "cuda_ipc"}
    assert d.call("bounded_copies") == 12
    wait_for(lambda: all_free(p))
    assert all_free(d)


def test_restarted_p_is_remapped_and_the_old_mapping_closed(procs):
    d = procs("D", device="cuda:0", transports=IPC)
    addr = d.call("address")
    p1 = procs("P", device="cuda:0", name="P-a")
    move(d, p1, addr, {"r1": 50}, 7)
    p1.kill()
    p2 = procs("P", device="cuda:0", name="P-a")
    move(d, p2, addr, {"r2": 70, "r3": 33}, 8)  # read through the new mapping
    stats = d.call("stats")
    assert stats["peers"] == {"P-a": "cuda_ipc"}, stats
    assert stats["cuda_ipc_mappings"] == 1, stats  # the dead P's handle was closed
    wait_for(lambda: all_free(p2))
    assert all_free(d)


def test_a_frozen_d_gets_a_fresh_session_and_one_mapping(procs):
    """D SIGSTOPped past the heartbeat timeout: P opens a new session; D maps P's pool for
    it and closes the old session's mapping; pulls are bit-exact again at once."""
    import os
    import signal
    import time

    d = procs("D", device="cuda:0", transports=IPC)
    p = procs("P", device="cuda:0")
    addr = d.call("address")
    move(d, p, addr, {"r1": 50}, 1)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: p.call("stats")[addr]["session"] >= 2, timeout=8)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    move(d, p, addr, {"r2": 70, "r3": 33}, 2)
    assert time.monotonic() - resumed < 5.0
    stats = d.call("stats")
    assert stats["peers"] == {"P0": "cuda_ipc"} and stats["cuda_ipc_mappings"] == 1, stats
    wait_for(lambda: all_free(p))
    assert all_free(d)


@pytest.mark.parametrize("p_dev,d_dev", GPU_PAIRS)
def test_p_poisoning_its_blocks_on_release_never_reaches_d(procs, p_dev, d_dev):
    d = procs("D", device=d_dev, transports=IPC)
    p = procs("P", device=p_dev, poison_on_release=True)
    addr = d.call("address")
    lengths = {f"r{i}": random.Random(50 + i).randrange(100, 200) for i in range(16)}
    move(d, p, addr, lengths, 500)  # P overwrote each one's blocks with NaN at RELEASED
    wait_for(lambda: all_free(p))
    released = {r for r, k, _ in p.call("log") if k == "released"}
    assert released == set(lengths)


@pytest.mark.parametrize("transport", ["cuda_ipc", "tcp"])
def test_cancels_racing_pulls_leak_nothing(procs, transport):
    """Cancels from either side racing transfers between GPU pools: every block freed on
    both sides. tcp: through rings of 3 pinned buffers of 2.4 blocks, so a cancel lands
    inside a batch, between chunks (D drains the rest, P stops at a batch boundary)."""
    ring = dict(staging_bytes=int(2.4 * 8192), staging_depth=3) if transport == "tcp" else {}
    d = procs("D", device="cuda:0", transports=IPC if transport == "cuda_ipc" else ["tcp"],
              transfer_timeout=5.0, **ring)
    p = procs("P", device="cuda:0", transfer_timeout=5.0, **ring)
    addr = d.call("address")
    rng = random.Random(5)
    for i in range(40):
        n = rng.randrange(1, 64)
        wait_for(lambda: d.call("drain") >= 0 and d.call("free")[0] >= 8, timeout=10)
        d.call("reserve", f"r{i}", n, 10.0)
        p.call("fill", f"r{i}", n, i)
        p.call("offer", f"r{i}", addr, n, 10.0)
        if rng.random() < 0.4:
            (d if rng.random() < 0.5 else p).call("cancel", f"r{i}")
    wait_for(lambda: d.call("drain") >= 0 and all_free(d) and all_free(p), timeout=30,
             interval=0.2)
    assert d.call("stats")["peers"] == {"P0": transport}


@pytest.mark.parametrize("p_dev,d_dev", GPU_PAIRS)
def test_tcp_between_gpu_pools_through_many_pinned_batches(procs, p_dev, d_dev):
    """tcp with GPU pools on both sides: P gathers into a ring of pinned buffers on a copy
    stream, D receives into its ring and copies each chunk into its pool. Buffers of 2.4
    blocks, so chunks end inside blocks and each transfer goes round each ring many
    times."""
    opts = dict(staging_bytes=int(2.4 * 8192), staging_depth=3)
    d = procs("D", device=d_dev, transports=["tcp"], **opts)
    p = procs("P", device=p_dev, tcp_connections=2, **opts)
    addr = d.call("address")
    move(d, p, addr, {f"r{i}": random.Random(i).randrange(1, 200) for i in range(16)}, 300)
    assert d.call("stats")["peers"] == {"P0": "tcp"}
    assert d.call("stats")["tcp_connections"] == 2
    wait_for(lambda: all_free(p))
    assert all_free(d)


@pytest.mark.parametrize("corrupt", ["handle", "canary"])
def test_broken_registration_downgrades_to_tcp_loudly(procs, corrupt):
    d = procs("D", device="cuda:0", transports=IPC)
    p = procs("P", device="cuda:0", corrupt_cuda_ipc=corrupt)
    addr = d.call("address")
    move(d, p, addr, {"r1": 40, "r2": 90}, 3)  # still moves, over tcp
    stats = d.call("stats")
    assert stats["peers"] == {"P0": "tcp"}, stats
    assert stats["num_downgrades"] == 1 and stats["cuda_ipc_mappings"] == 0, stats
    assert stats["downgrades"]["P0"]["from"] == "cuda_ipc", stats
    mine = p.call("stats")[addr]
    assert mine["transport"] == "tcp" and mine["downgraded_from"] == "cuda_ipc", mine
    assert ("canary" if corrupt == "canary" else "open") in mine["downgrade_reason"], mine
