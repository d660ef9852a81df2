"""The tcp data plane between real P and D processes (CPU pools): several data connections
per session, bit-exact; and the faults of a P stalled or dead in the middle of a block,
where D must stop the reader writing into the reserved blocks before it frees them."""

from __future__ import annotations

import random
import time

import pytest

from tests.kv_transfer.harness import all_free, move, wait_for

pytestmark = pytest.mark.timeout(120)


def kinds(p, rid):
    return [k for r, k, _ in p.call("log") if r == rid]


def reason(p, rid):
    return next(why for r, k, why in p.call("log") if r == rid)


def num_threads(p, name: str) -> int:
    return sum(t.startswith(name) for t in p.call("threads"))


def readers(d) -> int:
    return num_threads(d, "kv-tcp-reader")


@pytest.mark.parametrize("conns", [1, 3])
def test_blocks_move_bit_exact_over_several_connections_in_many_batches(procs, conns):
    """32 concurrent transfers, each split over the session's connections and sent in
    batches of 2 blocks (so batches interleave on every connection)."""
    d = procs("D", transports=["tcp"])
    p = procs("P", tcp_connections=conns, batch_bytes=2 * 8192)
    addr = d.call("address")
    move(d, p, addr, {f"r{i}": random.Random(i).randrange(1, 200) for i in range(32)}, 100)
    assert p.call("stats")[addr]["data_connections"] == conns
    assert d.call("stats")["tcp_connections"] == conns
    assert num_threads(p, "kv-tcp-sender") == conns and readers(d) == conns
    wait_for(lambda: all_free(p))
    assert all_free(d)


def test_d_listens_for_kv_data_on_the_port_it_is_given(procs):
    """`--kv-data-port`: D's data plane binds that port (where a firewall opens only known
    ports) and P's connections land there; by default a free port, told in the handshake."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = procs("D", transports=["tcp"], data_port=port)
    assert d.call("data_port") == port
    p = procs("P", tcp_connections=2)
    move(d, p, d.call("address"), {"a": 40, "b": 7}, 7)
    assert d.call("stats")["tcp_connections"] == 2
    other = procs("D", transports=["tcp"])
    assert other.call("data_port") not in (None, 0, port)
    wait_for(lambda: all_free(p))


def test_d_cancel_while_p_stalls_mid_block_stops_the_reader_before_freeing(procs):
    """P sends half a block and hangs. D cancels: its reader is inside the reserved blocks,
    so D closes that connection and joins the reader before CANCELLED frees them (the
    reader count is read when the event is drained, after the blocks are freed). P's
    session is renewed and the next transfer is bit-exact."""
    d = procs("D", transports=["tcp"])
    p = procs("P", stall_push="mid_block", tcp_connections=1)
    addr = d.call("address")
    move(d, p, addr, {"warm": 20}, 1)
    (stalled,) = d.call("readers")
    d.call("reserve", "stall-1", 40, 30.0)
    p.call("fill", "stall-1", 40, 2)
    p.call("offer", "stall-1", addr, 40, 30.0)
    time.sleep(0.5)  # P is inside the first block
    d.call("cancel", "stall-1")
    wait_for(lambda: "cancelled" in kinds(d, "stall-1"), timeout=5)
    assert stalled not in d.call("readers_at", "stall-1")  # gone before the blocks were freed
    assert all_free(d)
    wait_for(lambda: readers(d) == 1 and p.call("stats")[addr]["session"] == 2, timeout=5)
    wait_for(lambda: all_free(p), timeout=5)
    move(d, p, addr, {"after": 30}, 3)
    wait_for(lambda: all_free(p) and all_free(d), timeout=5)


def test_transfer_deadline_while_p_stalls_mid_block(procs):
    d = procs("D", transports=["tcp"], transfer_timeout=1.0)
    p = procs("P", stall_push="mid_block", tcp_connections=2)
    addr = d.call("address")
    d.call("reserve", "stall-1", 60, 30.0)
    p.call("fill", "stall-1", 60, 2)
    t0 = time.monotonic()
    p.call("offer", "stall-1", addr, 60, 30.0)
    stalled = wait_for(lambda: (ids := d.call("readers")) and len(ids) == 2 and ids)
    wait_for(lambda: "failed" in kinds(d, "stall-1"), timeout=5)
    assert time.monotonic() - t0 < 2.5  # 1 s deadline, 0.2 s grace, at most 0.1 s a tick
    assert "before the transfer deadline" in reason(d, "stall-1")
    assert not set(stalled) & set(d.call("readers_at", "stall-1"))
    assert all_free(d)
    wait_for(lambda: "failed" in kinds(p, "stall-1") and all_free(p), timeout=5)


def test_p_killed_mid_block_fails_at_once_and_leaves_no_reader(procs):
    d = procs("D", transports=["tcp"], transfer_timeout=30.0)
    p = procs("P", stall_push="mid_block", tcp_connections=2)
    addr = d.call("address")
    d.call("reserve", "stall-1", 60, 30.0)
    p.call("fill", "stall-1", 60, 2)
    p.call("offer", "stall-1", addr, 60, 30.0)
    wait_for(lambda: readers(d) == 2, timeout=5)
    time.sleep(0.3)
    p.kill()
    t0 = time.monotonic()
    wait_for(lambda: "failed" in kinds(d, "stall-1"), timeout=5)
    assert time.monotonic() - t0 < 1.0  # not the 30 s deadline: the connections closed
    assert "data connection closed" in reason(d, "stall-1")
    assert all_free(d)
    wait_for(lambda: readers(d) == 0 and d.call("stats")["tcp_connections"] == 0, timeout=5)


def test_p_cancel_while_its_sender_is_stuck_holds_the_blocks_until_it_lets_go(procs):
    """P cancels an offer whose sender is stuck mid-block: the offer waits in STOPPING
    (its blocks still read) until the sender lets go (D closes the connection at its
    Cancel, or P shuts it past its grace); only then is CANCELLED emitted and the blocks
    freed. Both sides end free; the next transfer is bit-exact."""
    d = procs("D", transports=["tcp"])
    p = procs("P", stall_push="mid_block", tcp_connections=2)
    addr = d.call("address")
    d.call("reserve", "stall-1", 60, 30.0)
    p.call("fill", "stall-1", 60, 2)
    p.call("offer", "stall-1", addr, 60, 30.0)
    time.sleep(0.5)
    p.call("cancel", "stall-1")
    wait_for(lambda: "cancelled" in kinds(p, "stall-1"), timeout=5)
    wait_for(lambda: all_free(p) and "cancelled" in kinds(d, "stall-1") and all_free(d),
             timeout=5)
    move(d, p, addr, {"after": 50}, 3)
    wait_for(lambda: all_free(p) and all_free(d), timeout=5)


def test_a_data_port_in_use_is_a_clear_error_and_leaves_nothing_open():
    """`--kv-data-port` (or `--kv-port`) taken by another process: the receiver says which
    port and option in one line (UserError: the command line prints it without a
    traceback) and closes what it had opened, no thread started."""
    import os
    import socket
    import threading

    import torch

    from pdserve.common import UserError
    from pdserve.engine.kv_pool import KVPool, KVPoolSpec
    from pdserve.kv_transfer.receiver import KVReceiver
    from tests.kv_transfer.harness import SPEC, compat

    pool = KVPool(KVPoolSpec(**SPEC, dtype=torch.float32), torch.device("cpu"))
    holder = socket.create_server(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    try:
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        with pytest.raises(UserError, match=f"--kv-data-port.*{taken}|{taken}.*--kv-data-port"):
            KVReceiver(pool, compat(), transports=("tcp",), data_port=taken)
        with pytest.raises(UserError, match="--kv-port"):
            KVReceiver(pool, compat(), transports=("tcp",), port=taken)
        assert len(os.listdir("/proc/self/fd")) == fds and threading.active_count() == threads
        rx = KVReceiver(pool, compat(), transports=("tcp",))  # a free port still works
        rx.close()
    finally:
        holder.close()
        pool.close()
