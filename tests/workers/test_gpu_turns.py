"""Prefill first on a shared GPU (service/gpu_turns.py): P's busy/idle datagrams over a real
Unix socket and D's holds; then real P and D worker processes taking turns (on CPU: the
mechanism is device-free) still give exactly the offline engine's tokens, and D held."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.common.params import SamplingParams
from pdserve.common.wire import RequestRecord
from pdserve.service.gpu_turns import TurnAnnouncer, TurnListener
from tests.workers.cluster import start_worker, stop_workers, wait_healthy

pytestmark = pytest.mark.timeout(300)


def settle(listener: TurnListener, now: float, want: bool) -> float | None:
    """hold_until once the datagrams sent so far have arrived (local, so within ms)."""
    end = time.monotonic() + 5
    while True:
        hold = listener.hold_until(now)
        if (hold is not None) == want or time.monotonic() > end:
            return hold
        time.sleep(0.005)


def test_d_holds_while_p_is_busy_for_at_most_max_hold(tmp_path: Path) -> None:
    sock = str(tmp_path / "d.sock")
    d = TurnListener(sock, max_hold_s=0.25)
    p = TurnAnnouncer([sock], "P0")
    try:
        assert d.hold_until(100.0) is None  # nobody busy
        p.set(True)
        assert settle(d, 100.0, True) == pytest.approx(100.25)  # the hold ends at most here
        assert d.hold_until(100.1) == pytest.approx(100.25)  # the same hold
        assert d.hold_until(100.3) is None  # it ran out: one step is due
        d.stepped(100.3)
        assert d.hold_until(100.31) == pytest.approx(100.56)  # then a new hold
        p.set(True)  # no change: no datagram
        assert p.sent == 1
        p.set(False)
        assert settle(d, 100.4, False) is None  # P idle: D steps at once
        assert d.holds == 2
    finally:
        p.close()
        d.close()
    assert not Path(sock).exists()


def test_d_follows_each_p_and_a_missing_d_is_no_error(tmp_path: Path) -> None:
    sock = str(tmp_path / "d.sock")
    lone = TurnAnnouncer([str(tmp_path / "nobody.sock")], "Px")
    lone.set(True)  # D not there (yet): nothing sent, nothing raised
    assert lone.sent == 0
    d = TurnListener(sock, max_hold_s=10)
    a, b = TurnAnnouncer([sock], "PA"), TurnAnnouncer([sock], "PB")
    try:
        a.set(True)
        b.set(True)
        settle(d, 0.0, True)
        a.set(False)
        time.sleep(0.05)
        assert d.hold_until(0.1) is not None  # PB still busy
        b.close()  # closing says idle
        assert settle(d, 0.2, False) is None
    finally:
        for x in (a, lone, d):
            x.close()


def test_pd_taking_turns_equals_offline(tmp_path: Path) -> None:
    from pdserve import LLM
    from tests.workers.test_pd_workers import collect, expected, workload

    env = {"PDSERVE_CACHE_DIR": str(tmp_path / "cache")}
    sock = str(tmp_path / "turns.sock")
    d = start_worker("decode", tmp_path, "--gpu-turns-socket", sock,
                     "--gpu-turns-max-hold-ms", "100", env=env)
    p = start_worker("prefill", tmp_path, "--gpu-turns-notify", sock, env=env)
    try:
        wait_healthy([d, p])
        import os

        os.environ["PDSERVE_CACHE_DIR"] = env["PDSERVE_CACHE_DIR"]
        llm = LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=400)
        first, later = workload(12, seed=5), workload(12, seed=6)
        later = [replace(r, request_id=r.request_id + "-later") for r in later]
        # two long streams, so D still decodes when the later prompts reach P
        first += [RequestRecord(f"long-{i}", list(range(9 + i, 60 + i)),
                                SamplingParams(max_tokens=200, ignore_eos=True, seed=i))
                  for i in range(2)]

        async def decoding() -> None:
            end = time.monotonic() + 60
            while (await asyncio.to_thread(d.load))["num_requests_running"] == 0:
                assert time.monotonic() < end, "D never started decoding the first wave"
                await asyncio.sleep(0.01)

        async def waves():  # the later prompts reach P while D decodes the first ones
            a = asyncio.create_task(collect(first, p, d))
            await decoding()
            return {**await collect(later, p, d), **await a}

        got = asyncio.run(waves())
        assert got == expected(llm, first + later)
        holds = re.search(r"^pdserve_gpu_turn_holds_total (\S+)", d.get("/metrics").text, re.M)
        assert holds and float(holds.group(1)) > 0  # D did hold for P's prefills
    finally:
        stop_workers([p, d])
