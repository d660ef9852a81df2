"""The local cluster's supervisor over real processes (a stand-in worker command): a dead
worker is restarted after a doubling backoff, given up on after 5 crashes within 60 s, and
dead workers' /dev/shm pool files are swept when it acts. `tests/e2e/test_faults.py` runs
it for real under `pdserve serve`."""

from __future__ import annotations

import os
import sys
import time

from pdserve.common.shm_files import SHM_DIR, SHM_PREFIX
from pdserve.supervisor import MAX_CRASHES, Managed, Supervisor


def crasher(tmp_path, code: int = 3) -> Managed:
    cmd = [sys.executable, "-c", f"import sys; print('starting, then failing'); sys.exit({code})"]
    return Managed("decode", 1, cmd, dict(os.environ), tmp_path / "w.log")


def wait_exit(w: Managed) -> None:
    w.proc.wait(30)


def test_restarts_with_backoff_then_gives_up(tmp_path):
    w = crasher(tmp_path)
    sup = Supervisor([w])
    w.start()
    now, delays = 1000.0, []
    for _ in range(MAX_CRASHES - 1):
        wait_exit(w)
        sup.check(w, now)  # the death is noticed
        assert w.state == "restarting" and w.last_exit == 3
        delays.append(w.next_start - now)
        sup.check(w, now + delays[-1] / 2)  # not before its backoff
        assert w.state == "restarting"
        now = w.next_start
        sup.check(w, now)
        assert w.state == "running"
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert w.restarts == MAX_CRASHES - 1
    wait_exit(w)
    sup.check(w, now + 1)  # the 5th crash within 60 s
    assert w.state == "gave up"
    sup.check(w, now + 100)
    assert w.state == "gave up" and w.restarts == MAX_CRASHES - 1
    snap = sup.snapshot()[0]
    assert snap["state"] == "gave up" and snap["last_exit_code"] == 3
    assert w.log_path.read_text().count("starting, then failing") == MAX_CRASHES


def test_crashes_spread_over_time_are_forgiven(tmp_path):
    w = crasher(tmp_path)
    sup = Supervisor([w])
    w.start()
    now = 0.0
    for _ in range(MAX_CRASHES + 2):  # one crash every 30 s: never 5 within 60 s
        wait_exit(w)
        sup.check(w, now)
        assert w.state == "restarting"
        sup.check(w, w.next_start)
        now += 30.0
    assert w.restarts == MAX_CRASHES + 2


def test_a_death_sweeps_dead_workers_pool_files(tmp_path):
    dead = 2**22 + 4321  # above pid_max here: no such process
    stale = SHM_DIR / f"{SHM_PREFIX}-{dead}-abc.pool"
    stale.write_bytes(b"x")
    try:
        w = crasher(tmp_path)
        w.start()
        wait_exit(w)
        Supervisor([w]).check(w, time.monotonic())
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_output_goes_to_the_log_and_prefixed_to_the_console(tmp_path):
    """`pdserve serve` echoes each local worker's output, prefixed with its role and port (as
    docker compose does), and keeps the whole of it in the worker's log file; the end of
    the log of a worker that died holds its last line."""
    import io

    console = io.StringIO()
    cmd = [sys.executable, "-c", "print('loading'); import sys; "
           "print('pdserve worker: error: no such model', file=sys.stderr); sys.exit(1)"]
    w = Managed("prefill", 8100, cmd, dict(os.environ), tmp_path / "p.log", echo=console)
    w.start()
    w.proc.wait(30)
    assert w.log_end().splitlines() == ["loading", "pdserve worker: error: no such model"]
    assert console.getvalue().splitlines() == [
        "prefill-8100 | loading", "prefill-8100 | pdserve worker: error: no such model"]
