"""The control plane in one process: message checks, malformed input, stale pool files."""

from __future__ import annotations

import os

import pytest
import torch
import zmq
from msgspec.msgpack import encode as packb

from pdserve.common.compat import PROTOCOL_VERSION
from pdserve.engine.kv_pool import SHM_DIR, SHM_PREFIX, KVPool, KVPoolSpec
from pdserve.kv_transfer import shm
from pdserve.kv_transfer.protocol import (
    Error,
    Hello,
    Offer,
    ProtocolError,
    Refuse,
    Welcome,
    decode,
    encode,
)
from pdserve.kv_transfer.receiver import KVReceiver
from tests.kv_transfer.harness import SPEC, compat


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
                               compat=compat(head_dim=64).to_dict(), pool={})))
        refuse = decode(sock.recv())
        assert isinstance(refuse, Refuse) and "head_dim differs" in refuse.reason
        sock.send(encode(Hello(e=1, v=PROTOCOL_VERSION, name="p", token="tok",
                               compat=compat().to_dict(), pool={})))
        assert decode(sock.recv()) == Welcome(e=rx.epoch, transport="tcp")
    finally:
        sock.close()
        ctx.term()
        rx.close()


def test_stale_pool_files_are_swept(tmp_path):
    dead = 2**22 + 12345  # above pid_max on this kind of machine: no such process
    stale = SHM_DIR / f"{SHM_PREFIX}-{dead}-abc.pool"
    live = SHM_DIR / f"{SHM_PREFIX}-{os.getpid()}-abd.pool"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        removed = shm.sweep_stale()
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
