"""The control plane in one process: message checks, malformed input, stale pool files."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import zmq
from msgspec.msgpack import encode as packb

from pdserve.common import shm_files
from pdserve.common.compat import PROTOCOL_VERSION
from pdserve.common.shm_files import SHM_DIR, SHM_PREFIX
from pdserve.engine.kv_pool import KVPool, KVPoolSpec
from pdserve.kv_transfer import shm
from pdserve.kv_transfer.protocol import (
    DATA_BATCH,
    DATA_HELLO,
    DATA_MAGIC,
    DATA_VERSION,
    Cancel,
    Done,
    Error,
    Hello,
    Offer,
    ProtocolError,
    Refuse,
    Send,
    Welcome,
    decode,
    encode,
)
from pdserve.kv_transfer.receiver import KVReceiver
from tests.kv_transfer.harness import SPEC, compat

SPEC_BLOCK_BYTES = KVPoolSpec(**SPEC, dtype=torch.float32).bytes_per_block
POOL_REG = {"tcp_data": DATA_VERSION}  # what a P's registration needs for tcp


def data_connection(rx, key: str) -> socket.socket:
    """A tcp data connection to D, past its hello (as P's senders open them)."""
    sock = socket.create_connection(("127.0.0.1", rx.data.port), timeout=5)
    sock.sendall(DATA_HELLO.pack(DATA_MAGIC, DATA_VERSION, key.encode(), 0))
    return sock


def push(sock: socket.socket, xid: int, first: int, blocks: list[bytes]) -> None:
    sock.sendall(DATA_BATCH.pack(DATA_MAGIC, first, len(blocks), xid) + b"".join(blocks))


def closed_by_d(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # D closed it with our bytes unread
        return True


@pytest.mark.parametrize("frame, needle", [
    (b"\xc1garbage", "not a msgpack"),
    (packb([1, 2]), "must be a map"),
    (packb({"k": "nope", "e": 1}), "unknown message kind"),
    (packb({"k": "offer", "e": 1, "rid": "r", "blocks": [-1], "num_tokens": 3}),
     r"offer: Expected `int` >= 0 - at `\$.blocks\[0\]`"),
    (packb({"k": "offer", "e": 1, "rid": "r", "num_tokens": 3}), "missing required field `blocks`"),
    (packb({"k": "done", "rid": "r"}), "missing required field `e`"),
    (packb({"k": "done", "e": "1", "rid": "r"}), r"done: Expected `int`, got `str` - at `\$.e`"),
    (b"\x00" * (2 << 20), "exceeds"),
])
def test_decode_refuses_bad_frames(frame, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode(frame)


def test_round_trip():
    msg = decode(encode(Offer(e=7, rid="x", blocks=[1, 2], num_tokens=20)))
    assert msg == Offer(e=7, rid="x", blocks=[1, 2], num_tokens=20)


def test_d_answers_malformed_and_unknown_messages_and_keeps_serving():
    pool = KVPool(KVPoolSpec(**SPEC, dtype=torch.float32), torch.device("cpu"))
    rx = KVReceiver(pool, compat(), internal_token="tok")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(rx.address)
    try:
        sock.send(b"\xc1garbage")
        err = decode(sock.recv())
        assert isinstance(err, Error) and "msgpack" in err.reason
        sock.send(encode(Offer(e=1, rid="r", blocks=[0], num_tokens=5)))
        err = decode(sock.recv())
        assert isinstance(err, Error) and err.code == "handshake"
        sock.send(encode(Hello(e=1, v=PROTOCOL_VERSION, name="p", token="tok",
                               compat=compat(head_dim=64).to_dict(), pool=POOL_REG)))
        refuse = decode(sock.recv())
        assert isinstance(refuse, Refuse) and "head_dim differs" in refuse.reason
        sock.send(encode(Hello(e=1, v=PROTOCOL_VERSION, name="p", token="tok",
                               compat=compat().to_dict(), pool=POOL_REG)))
        welcome = decode(sock.recv())
        assert isinstance(welcome, Welcome) and welcome.transport == "tcp"
        assert welcome.data_port == rx.data.port and len(welcome.data_key) == 32
        assert len(welcome.key) == 32 and welcome.a == welcome.key
        # after the handshake every message must carry the session's key
        sock.send(encode(Offer(e=1, rid="r", blocks=[0], num_tokens=5, a="guess")))
        err = decode(sock.recv())
        assert isinstance(err, Error) and "without the session's key" in err.reason
        sock.send(encode(Offer(e=1, rid="r", blocks=[0], num_tokens=5)))
        assert "without the session's key" in decode(sock.recv()).reason
    finally:
        sock.close()
        ctx.term()
        rx.close()


def _handshake(ctx, rx, name: str, epoch: int, pool=None) -> tuple[zmq.Socket, Welcome]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(rx.address)
    sock.send(encode(Hello(e=epoch, v=PROTOCOL_VERSION, name=name, token="tok",
                           compat=compat().to_dict(), pool=POOL_REG if pool is None else pool)))
    welcome = decode(sock.recv())
    assert isinstance(welcome, Welcome), welcome
    return sock, welcome


def _events(rx, rid, timeout=5.0):
    import time

    end, seen = time.monotonic() + timeout, []
    while time.monotonic() < end and not seen:
        seen = [e.kind.value for e in rx.events() if e.rid == rid]
        time.sleep(0.02)
    return seen


def test_a_second_connection_cannot_cancel_anothers_offer():
    """P1 offers; another connection (one that shook hands with the token, and one with P1's
    session epoch but not its key) sends Cancel for P1's request: D ignores both, and the
    transfer completes. Before per-session keys and owner checks, the first cancelled it."""
    pool = KVPool(KVPoolSpec(**SPEC, dtype=torch.float32), torch.device("cpu"))
    rx = KVReceiver(pool, compat(), internal_token="tok", transports=("tcp",))
    ctx = zmq.Context()
    socks = []
    try:
        p1, w1 = _handshake(ctx, rx, "p1", 11)
        intruder, w2 = _handshake(ctx, rx, "intruder", 22)
        key1, key2 = w1.key, w2.key
        socks += [p1, intruder]
        assert key1 != key2
        rx.reserve("r", [3, 4], 10.0)  # not offered yet: no owner
        intruder.send(encode(Cancel(e=22, rid="r", reason="x", a=key2)))
        anon = ctx.socket(zmq.DEALER)
        anon.setsockopt(zmq.LINGER, 0)
        anon.setsockopt(zmq.RCVTIMEO, 5000)
        anon.connect(rx.address)
        socks.append(anon)
        anon.send(encode(Cancel(e=11, rid="r", reason="x", a="")))
        assert decode(anon.recv()).code == "handshake"  # no session on that connection
        assert _events(rx, "r", timeout=0.5) == []  # still reserved
        p1.send(encode(Offer(e=11, rid="r", blocks=[7, 8], num_tokens=20, a=key1)))
        send = decode(p1.recv())
        assert isinstance(send, Send) and send.a == key1
        intruder.send(encode(Cancel(e=22, rid="r", reason="x", a=key2)))  # now P1's offer
        data = data_connection(rx, w1.data_key)
        socks.append(data)
        push(data, send.x, 0, [bytes(SPEC_BLOCK_BYTES)] * 2)
        done = decode(p1.recv())
        assert isinstance(done, Done) and done.rid == "r" and done.a == key1
        assert _events(rx, "r") == ["arrived"]
    finally:
        for s in socks:
            s.close()
        ctx.term()
        rx.close()


def _wait_events(rx, rid, timeout=5.0):
    import time

    end, seen = time.monotonic() + timeout, []
    while time.monotonic() < end and not seen:
        seen = [e for e in rx.events() if e.rid == rid]
        time.sleep(0.02)
    return seen


def _wait(fn, timeout=5.0):
    import time

    end = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_tcp_data_connections_are_checked():
    """D's data port: a connection with a wrong key is closed before it can write; one of
    P1's connections writing into P2's transfer is closed (P1's transfer in flight fails,
    P2's is untouched); a batch outside the offer or repeating a block fails its transfer
    with the reason; the session's own blocks land bit-exact."""
    pool = KVPool(KVPoolSpec(**SPEC, dtype=torch.float32), torch.device("cpu"))
    rx = KVReceiver(pool, compat(), internal_token="tok", transports=("tcp",))
    ctx = zmq.Context()
    socks = []
    bb = SPEC_BLOCK_BYTES

    def offer(sock, w, epoch, rid, blocks):
        rx.reserve(rid, blocks, 10.0)
        sock.send(encode(Offer(e=epoch, rid=rid, blocks=[0] * len(blocks),
                               num_tokens=16 * len(blocks), a=w.key)))
        while not isinstance(send := decode(sock.recv()), Send):  # skip earlier Cancels
            assert isinstance(send, Cancel), send
        assert send.rid == rid and send.x
        return send.x

    def reason(rid):
        (ev,) = [e for e in _wait_events(rx, rid)]
        return ev.kind.value, ev.reason

    try:
        p1, w1 = _handshake(ctx, rx, "p1", 11)
        p2, w2 = _handshake(ctx, rx, "p2", 22)
        socks += [p1, p2]
        stranger = data_connection(rx, "0" * 32)
        socks.append(stranger)
        assert closed_by_d(stranger)
        x1 = offer(p1, w1, 11, "r1", [10, 11])
        x2 = offer(p2, w2, 22, "r2", [20])
        wrong = data_connection(rx, w1.data_key)
        socks.append(wrong)
        push(wrong, x2, 0, [b"\x07" * bb])  # P1 writing into P2's transfer
        assert closed_by_d(wrong)
        kind, why = reason("r1")
        assert kind == "failed" and "another session" in why, why
        assert not torch.any(pool.tensor[20].view(-1).view(torch.uint8) == 7)
        x3 = offer(p1, w1, 11, "r3", [30, 31])
        c1 = data_connection(rx, w1.data_key)
        socks.append(c1)
        push(c1, x3, 1, [b"\x01" * bb, b"\x02" * bb])  # index 2 of a 2-block offer
        kind, why = reason("r3")
        assert kind == "failed" and "outside the offer's 2 blocks" in why, why
        x4 = offer(p1, w1, 11, "r4", [40, 41])
        c2 = data_connection(rx, w1.data_key)
        socks.append(c2)
        push(c2, x4, 0, [b"\x03" * bb])
        push(c2, x4, 0, [b"\x04" * bb])
        kind, why = reason("r4")
        assert kind == "failed" and "sent twice" in why, why
        c3 = data_connection(rx, w2.data_key)
        socks.append(c3)
        blocks = [os.urandom(bb)]
        push(c3, x2, 0, blocks)
        assert reason("r2") == ("arrived", "")
        assert pool.tensor[20].view(-1).view(torch.uint8).numpy().tobytes() == blocks[0]
        assert x1 not in (x2, x3, x4)
        _wait(lambda: rx.stats()["tcp_connections"] == 1)  # c3; D closed the others
    finally:
        for s in socks:
            s.close()
        ctx.term()
        rx.close()


def test_a_p_without_tcp_data_sockets_is_downgraded_with_the_reason():
    """A P of an older version (no data sockets in its registration): D does not take its
    KV over tcp and says why at handshake, never a transfer that times out."""
    pool = KVPool(KVPoolSpec(**SPEC, dtype=torch.float32), torch.device("cpu"))
    rx = KVReceiver(pool, compat(), internal_token="tok", transports=("tcp",))
    ctx = zmq.Context()
    try:
        sock, welcome = _handshake(ctx, rx, "old", 5, pool={})
        sock.close()
        assert welcome.transport == "none" and welcome.downgraded_from == "tcp"
        assert "tcp data sockets" in welcome.downgrade_reason
    finally:
        ctx.term()
        rx.close()


def test_stale_pool_files_are_swept(tmp_path):
    dead = 2**22 + 12345  # above pid_max on this kind of machine: no such process
    stale = SHM_DIR / f"{SHM_PREFIX}-{dead}-abc.pool"
    live = SHM_DIR / f"{SHM_PREFIX}-{os.getpid()}-abd.pool"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        removed = shm_files.sweep_stale()
        assert stale in removed and not stale.exists()
        assert live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_shm_pool_file_lives_until_close():
    spec = KVPoolSpec(**SPEC, dtype=torch.float32)
    pool = KVPool(spec, torch.device("cpu"), shm_epoch=99)
    path = pool.shm_path
    assert path.exists() and path.stat().st_size == spec.num_blocks * spec.bytes_per_block
    pool.tensor[3] = 1.5
    peer = shm.attach(str(path), list(spec.shape), "float32")
    assert torch.equal(peer[3], pool.tensor[3])
    pool.close()
    assert not path.exists()
