"""The step loops wake on their inputs, never on a timer, and warm up before serving; in one
process over the built-in model (real engines, real sockets, no proxy).

- an idle loop sleeps in one poll until something comes: over a second it iterates at most
  once, and a stop request wakes it at once;
- a transfer event (D's receiver) wakes an idle D's loop, which would otherwise sleep on;
- P offers a prompt's KV in the step that prefilled it, before the first token goes out;
- under --prefill-first, D holds for P's prefill, but not a just-joined request's token 2;
- during the warm-up /health answers 503 "warming" with the reason; 200 after.
"""

from __future__ import annotations

import threading
import time

import pytest
from starlette.testclient import TestClient

from pdserve.common.params import SamplingParams
from pdserve.common.wire import Prefill, RequestRecord
from pdserve.decode_worker.server import BothLoop, DecodeLoop
from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.setup import build_engine
from pdserve.kv_transfer.protocol import new_epoch
from pdserve.kv_transfer.states import EventKind, TransferEvent
from pdserve.prefill_worker.server import PrefillLoop
from pdserve.service.config import WorkerConfig
from pdserve.service.ops_http import create_ops_app
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.timeout(120)


def make_loop(cls, role: str, **kw):
    port = free_port_block()
    cfg = WorkerConfig(model=str(builtin_model_path()), device="cpu", role=role, port=port,
                       num_gpu_blocks_override=128, torch_threads=1, insecure_no_token=True,
                       **kw)
    # P's CPU pool lives in /dev/shm, as in a real worker (pdserve/worker.py)
    epoch = new_epoch() if role == "prefill" else None
    return cls(cfg, build_engine(cfg, progress=False, pool_shm_epoch=epoch))


class Counting:
    """Runs a loop in a thread and counts its iterations (each ends with `publish`)."""

    def __init__(self, loop):
        self.loop, self.iterations = loop, 0
        publish = loop.publish

        def counted():
            self.iterations += 1
            publish()
        loop.publish = counted
        self.thread = threading.Thread(target=loop.run, daemon=True)
        self.thread.start()

    def settle(self, timeout: float = 10.0) -> int:
        """The count once it stopped changing for 0.5 s."""
        end = time.monotonic() + timeout
        last = -1
        while self.iterations != last and time.monotonic() < end:
            last = self.iterations
            time.sleep(0.5)
        return self.iterations

    def stop(self) -> float:
        t0 = time.monotonic()
        self.loop.stop_event.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return time.monotonic() - t0


def test_an_idle_loop_sleeps_until_woken_and_stops_at_once():
    c = Counting(make_loop(BothLoop, "both"))
    try:
        before = c.settle()
        time.sleep(1.0)
        assert c.iterations - before == 0  # it used to wake every 20 ms (50 a second)
    finally:
        took = c.stop()
    assert took < 1.0  # the stop woke the poll; no timer had to expire


def test_a_transfer_event_wakes_an_idle_decode_loop():
    c = Counting(make_loop(DecodeLoop, "decode"))
    try:
        before = c.settle()
        c.loop.receiver.emit(TransferEvent("nobody", EventKind.ARRIVED))
        end = time.monotonic() + 5
        while c.iterations == before and time.monotonic() < end:
            time.sleep(0.01)
        assert c.iterations > before  # the event's pipe woke the poll (no timer would)
        after = c.settle()
        time.sleep(0.5)
        assert c.iterations == after  # and the drained pipe lets it sleep again
    finally:
        c.stop()


def test_an_idle_d_reads_ps_turn_datagrams_and_sleeps_again(tmp_path):
    """A D with nothing to decode while its P announces prefill work (--prefill-first) wakes
    once per datagram and sleeps again: an unread datagram would keep its poll spinning
    (it did, on an H100: the spinning loop took the GIL from D's KV I/O thread and a 1.6 ms
    pull took 28 ms)."""
    from pdserve.service.gpu_turns import TurnAnnouncer

    sock = str(tmp_path / "turns.sock")
    c = Counting(make_loop(DecodeLoop, "decode", gpu_turns_socket=sock))
    p = TurnAnnouncer([sock], "P0")
    try:
        before = c.settle()
        p.set(True)  # P busy, D idle
        after = c.settle()
        assert 1 <= after - before <= 3
        time.sleep(0.5)
        assert c.iterations == after
        assert c.loop.turns_in.busy == {b"P0"}
    finally:
        p.close()
        c.stop()


def test_a_joined_requests_token_2_does_not_wait_for_ps_prefill(tmp_path):
    """--prefill-first: while P on D's GPU prefills, D holds its decode steps, but not the
    step that carries a just-joined request's first D token (its token 2): that step runs
    beside the prefill, once; then D holds again."""
    from pdserve.common.wire import Generate, Join, Reserve, TokenRow
    from pdserve.service import metrics
    from pdserve.service.gpu_turns import TurnAnnouncer

    sock = str(tmp_path / "turns.sock")
    loop = make_loop(DecodeLoop, "decode", gpu_turns_socket=sock, gpu_turns_max_hold_ms=60_000)
    p = TurnAnnouncer([sock], "P0")
    urgent = metrics.GPU_TURN_URGENT_STEPS._value.get()
    try:
        long = SamplingParams(max_tokens=50, ignore_eos=True, seed=1)
        loop.on_message(b"proxy", Generate(rec=RequestRecord("a", list(range(5, 25)), long)))
        loop.step()  # "a" prefilled here, now decoding
        assert not loop._holding()  # no P busy
        p.set(True)
        end = time.monotonic() + 5
        while not loop._holding():
            assert time.monotonic() < end, "D never saw P's busy datagram"
            time.sleep(0.005)
        loop.on_message(b"proxy", Reserve(rec=RequestRecord("b", list(range(7, 27)), long)))
        loop.receiver.emit(TransferEvent("b", EventKind.ARRIVED))  # (its KV: no matter here)
        loop.tick()
        loop.on_message(b"proxy", Join(rid="b", first=[TokenRow("b", 0, 11, None, None)]))
        assert loop.urgent_step()
        assert not loop._holding() and loop._wait_ms() == 0  # P still busy: D steps anyway
        loop.step()
        assert len(loop.reqs["b"].req.seqs[0].output_token_ids) == 2  # "b" got token 2
        assert metrics.GPU_TURN_URGENT_STEPS._value.get() == urgent + 1
        assert not loop.urgent_step() and loop._holding()  # and D holds again
        p.set(False)
        end = time.monotonic() + 5
        while loop._holding():
            assert time.monotonic() < end, "D never saw P's idle datagram"
            time.sleep(0.005)
    finally:
        p.close()
        loop.shutdown()


def test_ps_turn_lasts_until_its_kv_has_left_for_at_most_the_grace(tmp_path):
    """--prefill-first: P stays busy after the prefill while the KV moves to D, so D starts
    no decode step during the pull; a transfer that does not end within the grace (here: no
    D at all) frees D's turn anyway, by a deadline of P's loop, not a poll."""
    from pdserve.service.prefill_half import TURN_KV_GRACE_S

    loop = make_loop(PrefillLoop, "prefill", gpu_turns_notify=[str(tmp_path / "d.sock")])
    try:
        assert loop.next_deadline() is None and not loop.turn_busy(time.monotonic())
        rec = RequestRecord("r1", list(range(5, 45)), SamplingParams(max_tokens=4, seed=1))
        loop.on_message(b"proxy", Prefill(rec=rec, kv="tcp://127.0.0.1:9"))
        assert loop.turn_busy(time.monotonic())  # the prompt to prefill
        while loop.has_work():
            loop.step()
        prefilled = loop.reqs["r1"].prefilled
        assert loop.turn_busy(prefilled)  # prefilled, its KV not yet at D
        assert loop.next_deadline() == pytest.approx(prefilled + TURN_KV_GRACE_S)
        assert not loop.turn_busy(prefilled + TURN_KV_GRACE_S)  # the grace ran out
        loop.reqs.pop("r1")  # (as the transfer's end does: then P's turn is over at once)
        assert not loop.turn_busy(prefilled) and loop.next_deadline() is None
    finally:
        loop.shutdown()


def test_sigterm_drains_then_stops_and_a_stuck_request_waits_at_most_the_drain_timeout():
    """begin_drain (the SIGTERM handler): /health says "draining" with what is left; an idle
    worker stops once its 1 s linger is over; one holding a request that never ends (a
    reservation whose Join never comes) stops when --drain-timeout runs out."""
    from pdserve.common.wire import Reserve
    from pdserve.service.loop import DRAIN_LINGER_S

    idle = Counting(make_loop(BothLoop, "both", drain_timeout=30))
    t0 = time.monotonic()
    idle.loop.begin_drain()
    idle.thread.join(10)
    assert not idle.thread.is_alive()
    assert DRAIN_LINGER_S <= time.monotonic() - t0 < DRAIN_LINGER_S + 2

    loop = make_loop(DecodeLoop, "decode", drain_timeout=2.0, reservation_timeout=60)
    rec = RequestRecord("stuck", list(range(5, 25)), SamplingParams(max_tokens=4, seed=1))
    loop.on_message(b"proxy", Reserve(rec=rec))  # reserved: waits for a KV and a Join
    c = Counting(loop)
    t0 = time.monotonic()
    loop.begin_drain()
    end = time.monotonic() + 5
    while loop.snapshot["health"]["status"] != "draining":
        assert time.monotonic() < end
        time.sleep(0.01)
    assert "1 request(s) to finish" in loop.snapshot["health"]["reason"]
    c.thread.join(10)
    assert not c.thread.is_alive()
    assert 2.0 <= time.monotonic() - t0 < 4.0  # the drain timeout, not the reservation's


def test_p_offers_the_kv_in_the_step_that_prefilled_it():
    loop = make_loop(PrefillLoop, "prefill")
    order = []
    loop.sender.offer = lambda rid, *a, **k: order.append(("offer", rid))
    send = loop.send
    loop.send = lambda identity, msg: (order.append((type(msg).__name__, msg.rid)),
                                       send(identity, msg))
    try:
        rec = RequestRecord("r1", list(range(5, 45)), SamplingParams(max_tokens=4, seed=1))
        loop.on_message(b"proxy", Prefill(rec=rec, kv="tcp://127.0.0.1:9"))
        while loop.has_work():
            loop.step()
        assert order[:2] == [("offer", "r1"), ("First", "r1")]  # no tick in between
    finally:
        loop.shutdown()


def test_health_says_warming_with_the_reason_until_the_warm_up_ends():
    loop = make_loop(BothLoop, "both")
    client = TestClient(create_ops_app(loop))
    seen = []
    step = loop.engine.step

    def observed_step():
        r = client.get("/health")
        seen.append((r.status_code, r.json()))
        return step()
    loop.engine.step = observed_step
    try:
        took = loop.warm_up()
        loop.engine.step = step
        assert seen, "the warm-up ran no step"
        for code, body in seen:
            assert code == 503 and body["status"] == "warming"
            assert "warming up" in body["reason"] and body["role"] == "both"
        assert not loop.engine.has_unfinished() and loop.engine.bm.usage == 0.0
        loop.publish()
        r = client.get("/health")
        assert r.status_code == 200 and r.json()["warmup_s"] == pytest.approx(took)
    finally:
        loop.shutdown()


def test_connect_opens_ps_kv_session_to_d_before_any_offer():
    """The proxy's Connect (sent when a P or D becomes usable) has P shake hands with D at
    once, so the first request's transfer finds the session ready; a Connect naming
    anything but tcp:// addresses is refused."""
    from pdserve.common.wire import Connect, WireError

    d = make_loop(DecodeLoop, "decode")
    p = make_loop(PrefillLoop, "prefill")
    try:
        p.on_message(b"proxy", Connect(kv=[d.receiver.address]))
        end = time.monotonic() + 10
        while p.sender.stats().get(d.receiver.address, {}).get("state") != "ready":
            assert time.monotonic() < end, p.sender.stats()
            time.sleep(0.02)
        assert p.sender.stats()[d.receiver.address]["transport"] == "shm"
        with pytest.raises(WireError, match="tcp://"):
            p.on_message(b"proxy", Connect(kv=["ipc:///tmp/elsewhere"]))
    finally:
        p.shutdown()
        d.shutdown()


def test_sigterm_taken_by_another_thread_still_stops_the_idle_loop():
    """A process-directed SIGTERM may land on any thread (the KV I/O thread, the HTTP
    thread); the main thread sleeps in the poll with no timeout, so the signal must wake it
    (signal.set_wakeup_fd on the loop's Waker): once, under load, a decode worker slept on
    through its SIGTERM and needed SIGKILL."""
    import signal

    loop = make_loop(BothLoop, "both")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    fired = threading.Event()

    def elsewhere():
        time.sleep(0.5)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread only
        fired.set()
        time.sleep(5)
        loop.stop_event.set()  # the fallback that keeps a broken loop from hanging the test
    threading.Thread(target=elsewhere, daemon=True).start()
    try:
        t0 = time.monotonic()
        loop.run()  # in the main thread, like a worker
        took = time.monotonic() - t0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert fired.is_set() and took < 3.0, took
