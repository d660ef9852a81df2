"""D's side of the KV transfer: reservations, the handshake with each P, pulls and pushes.

The decode scheduler allocates blocks and calls `reserve(rid, block_ids, timeout)`; later it
drains `events()`: ARRIVED (the KV is in those blocks: the sequence may join the batch),
EXPIRED (no offer in time), FAILED (peer gone, bad data) or CANCELLED (P cancelled). After
any of these the blocks are the scheduler's again. `cancel(rid)` frees nothing itself: P is
told to free its copy, and the caller reuses the blocks after the CANCELLED event.

Transport per P, chosen at handshake: `cuda_ipc` when both pools are on GPUs of this host
(D maps P's pool once and pulls each transfer with one gather launch on a stream of its
own device; DONE and ARRIVED follow only once that copy's event has completed), `shm` when
P's pool is a /dev/shm file on this host (D pulls with one gather), else `tcp` (P pushes
block frames). A failed cuda_ipc open or canary, or a failed shm attach, is a downgrade:
logged, counted (`kv_transfer_transport_downgrade`), and shown in `stats()`, never silent.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field

import torch
import zmq

from pdserve.engine.kv_pool import KVPool
from pdserve.kv_transfer import cuda_ipc, metrics, shm
from pdserve.kv_transfer.channel import IOThread, configure
from pdserve.kv_transfer.protocol import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    CompatRecord,
    Kind,
    ProtocolError,
    boot_id,
    decode,
    encode,
    new_epoch,
)
from pdserve.kv_transfer.states import EventKind, Reservation, ReservationState, TransferEvent

logger = logging.getLogger(__name__)

EARLY_OFFER_GRACE_S = 5.0  # an offer may overtake its reservation; hold it this long


class HandshakeRequired(ProtocolError):
    """A message from a P this D has no handshake with (e.g. D restarted): P re-handshakes."""


@dataclass(eq=False)
class _Peer:
    name: str
    epoch: int
    identity: bytes
    transport: str
    src_pool: torch.Tensor | None = None  # shm or cuda_ipc mapping of P's pool
    rids: set[str] = field(default_factory=set)


class KVReceiver(IOThread):
    """D's transfer endpoint. Thread-safe API: reserve, cancel, events, stats, close."""

    def __init__(self, pool: KVPool, compat: CompatRecord, *, host: str = "127.0.0.1",
                 port: int = 0, internal_token: str = "", transfer_timeout: float = 30.0,
                 transports: tuple[str, ...] = ("cuda_ipc", "shm", "tcp")):
        super().__init__("kv-receiver")
        self.pool = pool
        self.compat = compat
        self.epoch = new_epoch()
        self.token = internal_token
        self.transfer_timeout = transfer_timeout
        self.transports = transports
        self.block_bytes = pool.spec.bytes_per_block
        self.router = self.ctx.socket(zmq.ROUTER)
        configure(self.router, max(MAX_CONTROL_BYTES, self.block_bytes) + 4096)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if port:
            self.router.bind(f"tcp://{host}:{port}")
        else:
            port = self.router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.poller.register(self.router, zmq.POLLIN)
        self._res: dict[str, Reservation] = {}
        self._early: dict[str, tuple[bytes, dict, float]] = {}  # rid -> (peer, offer, until)
        self._peers: dict[bytes, _Peer] = {}
        self._stats = {"peers": {}, "active": 0, "downgrades": {}, "num_downgrades": 0}
        # cuda_ipc pulls run on a stream of D's device; made here, used by the I/O thread
        self._puller = cuda_ipc.Puller(pool.device, pool.tensor) \
            if pool.device.type == "cuda" else None
        self.start()

    # ---- API (any thread) ----------------------------------------------------------------

    def reserve(self, rid: str, block_ids: list[int], timeout: float) -> None:
        """Expect P's offer for `rid` into `block_ids` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self.submit(lambda: self._reserve(rid, list(block_ids), deadline))

    def cancel(self, rid: str, reason: str = "cancelled by D") -> None:
        """Drop the reservation; P is told to free its copy. A CANCELLED event follows once
        no data can land in the blocks any more: only then may the caller reuse them."""
        self.submit(lambda: self._cancel(rid, reason))

    def stats(self) -> dict:
        """A snapshot: peers (P name -> transport), active reservations, downgrades (P name
        -> {from, to, reason}) with their count, and CUDA IPC mappings held open."""
        return {"peers": dict(self._stats["peers"]), "active": self._stats["active"],
                "downgrades": dict(self._stats["downgrades"]),
                "num_downgrades": self._stats["num_downgrades"],
                "cuda_ipc_mappings": cuda_ipc.num_open_mappings()}

    # ---- I/O thread ----------------------------------------------------------------------

    def _send(self, identity: bytes, kind: Kind, **fields) -> None:
        try:
            self.router.send_multipart([identity, encode(kind, self.epoch, **fields)],
                                       zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as e:  # peer gone or slow: deadlines handle it
            logger.debug("send %s to %r failed: %s", kind.value, identity, e)

    def _reserve(self, rid: str, block_ids: list[int], deadline: float) -> None:
        if rid in self._res:
            logger.warning("reservation %s already exists; replaced", rid)
        self._res[rid] = Reservation(rid, block_ids, deadline)
        self._update_active()
        early = self._early.pop(rid, None)
        if early is not None:
            self._on_offer(early[0], early[1])

    def _cancel(self, rid: str, reason: str) -> None:
        r = self._res.get(rid)
        self._early.pop(rid, None)
        if r is None:
            return self.emit(TransferEvent(rid, EventKind.CANCELLED, reason))
        if r.peer is not None:
            self._send(r.peer, Kind.CANCEL, rid=rid, reason=reason)
        self._finish(r, ReservationState.CANCELLED, EventKind.CANCELLED, reason,
                     notify_peer=False)

    def _finish(self, r: Reservation, state: ReservationState, kind: EventKind,
                reason: str = "", notify_peer: bool = True) -> None:
        if self._puller is not None:
            self._puller.discard(r.rid)  # a copy into r's blocks has finished past here
        r.state = state
        self._res.pop(r.rid, None)
        peer = self._peers.get(r.peer) if r.peer is not None else None
        transport = peer.transport if peer else ""
        if notify_peer and r.peer is not None and kind is not EventKind.CANCELLED:
            if state is ReservationState.DONE:
                self._send(r.peer, Kind.DONE, rid=r.rid)
            else:
                self._send(r.peer, Kind.CANCEL, rid=r.rid, reason=reason or state.value)
        nbytes = len(r.src_blocks) * self.block_bytes if kind is EventKind.ARRIVED else 0
        secs = time.monotonic() - r.offered_at if r.offered_at else 0.0
        metrics.TRANSFERS.labels("decode", transport or "none", state.value).inc()
        if kind is EventKind.ARRIVED:
            metrics.BYTES.labels("decode", transport).inc(nbytes)
            metrics.SECONDS.labels(transport).observe(secs)
        if kind is EventKind.EXPIRED:
            metrics.RESERVATIONS_EXPIRED.inc()
        self.emit(TransferEvent(r.rid, kind, reason, transport, nbytes, secs))
        self._update_active()

    def _update_active(self) -> None:
        self._stats["active"] = len(self._res)
        metrics.RESERVATIONS_ACTIVE.set(len(self._res))

    def handle(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                msg = decode(frames[1].bytes)
                self._dispatch(identity, msg, frames[2:])
            except HandshakeRequired as e:
                self._send(identity, Kind.ERROR, reason=str(e), code="handshake")
            except ProtocolError as e:
                metrics.MALFORMED.inc()
                logger.warning("malformed message from %r: %s", identity, e)
                self._send(identity, Kind.ERROR, reason=str(e), code="malformed")

    def _dispatch(self, identity: bytes, msg: dict, rest: list) -> None:
        kind = msg["k"]
        if kind is Kind.HELLO:
            return self._on_hello(identity, msg)
        peer = self._peers.get(identity)
        if peer is None or msg["e"] != peer.epoch:
            raise HandshakeRequired(f"{kind.value} before a handshake (or from an old epoch)")
        if kind is Kind.OFFER:
            self._on_offer(identity, msg)
        elif kind is Kind.DATA:
            self._on_data(identity, msg, rest)
        elif kind is Kind.CANCEL:
            r = self._res.get(msg["rid"])
            self._early.pop(msg["rid"], None)
            if r is not None and r.peer in (None, identity):
                self._finish(r, ReservationState.CANCELLED, EventKind.CANCELLED, msg["reason"])
        else:
            raise ProtocolError(f"unexpected {kind.value} on D")

    def _on_hello(self, identity: bytes, msg: dict) -> None:
        def refuse(reason: str, label: str) -> None:
            metrics.HANDSHAKE_REFUSALS.labels(label).inc()
            logger.warning("refused P %s: %s", msg.get("name"), reason)
            self._send(identity, Kind.REFUSE, reason=reason)

        if msg["v"] != PROTOCOL_VERSION:
            return refuse(f"protocol version {msg['v']} != {PROTOCOL_VERSION}", "version")
        if not hmac.compare_digest(msg["token"].encode(), self.token.encode()):
            return refuse("wrong internal token", "token")
        why = self.compat.mismatch(msg["compat"])
        if why:
            return refuse(f"incompatible engines: {why}", "compat")
        # a new epoch from a P of the same name is a restart: drop the old incarnation
        for old_id, old in list(self._peers.items()):
            if old.name == msg["name"] and (old.epoch != msg["e"] or old_id != identity):
                self._drop_peer(old_id, "P restarted (new epoch)")
        transport, mapping, downgrade = self._choose_transport(msg)
        old = self._peers.get(identity)  # the same incarnation shaking hands again
        if old is not None and old.transport == "cuda_ipc" and old.src_pool is not None:
            cuda_ipc.close_peer_pool(old.src_pool)  # one reference; the new one stays open
        self._peers[identity] = _Peer(msg["name"], msg["e"], identity, transport, mapping)
        self._stats["peers"][msg["name"]] = transport
        extra = {}
        if downgrade is not None:
            self._stats["downgrades"][msg["name"]] = downgrade
            self._stats["num_downgrades"] += 1
            extra = {"downgraded_from": downgrade["from"], "downgrade_reason": downgrade["reason"]}
        else:
            self._stats["downgrades"].pop(msg["name"], None)
        self._send(identity, Kind.WELCOME, transport=transport, **extra)
        logger.info("P %s (epoch %x) connected over %s", msg["name"], msg["e"], transport)

    def _choose_transport(self, msg: dict) -> tuple[str, torch.Tensor | None, dict | None]:
        """(transport, mapping of P's pool or None, downgrade record or None)."""
        pool = msg["pool"]
        downgrade = None
        if "cuda_ipc" in self.transports and self.pool.device.type == "cuda" \
                and pool.get("boot_id") == boot_id() and pool.get("device") == "cuda":
            src, why = self._open_cuda_ipc(msg["name"], pool)
            if src is not None:
                return "cuda_ipc", src, None
            to = "tcp" if "tcp" in self.transports else "none"
            metrics.DOWNGRADES.labels("cuda_ipc", to).inc()
            logger.warning("cuda_ipc with P %s refused (%s): downgraded to %s",
                           msg["name"], why, to)
            downgrade = {"from": "cuda_ipc", "to": to, "reason": why}
        info = pool.get("shm")
        if "shm" in self.transports and info and pool.get("boot_id") == boot_id() \
                and self.pool.device.type == "cpu":
            try:
                src = shm.attach(info["path"], info["shape"], info["dtype"])
                if list(src.shape[1:]) != list(self.pool.tensor.shape[1:]):
                    raise ValueError(f"block shape {list(src.shape[1:])} differs")
                return "shm", src, None
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                metrics.DOWNGRADES.labels("shm", "tcp").inc()
                logger.warning("shm attach of P %s failed (%s): downgraded to tcp",
                               msg["name"], e)
        if "tcp" not in self.transports:
            return "none", None, downgrade
        return "tcp", None, downgrade

    def _open_cuda_ipc(self, name: str, pool: dict) -> tuple[torch.Tensor | None, str]:
        """Map P's pool into D's device and check the canary: (mapping, '') or (None, why)."""
        info = pool.get("cuda_ipc")
        if not isinstance(info, dict):
            return None, pool.get("cuda_ipc_error") or "P sent no cuda_ipc registration"
        t0 = time.monotonic()
        try:
            src = cuda_ipc.open_peer_pool(info, self.pool.device)
        except Exception as e:  # noqa: BLE001 - CuPy, CUDA or a bad registration: downgrade
            return None, f"opening P's handle failed: {type(e).__name__}: {e}"
        why = ""
        if tuple(src.shape[1:]) != tuple(self.pool.tensor.shape[1:]) \
                or src.dtype != self.pool.tensor.dtype:
            why = f"P's pool {list(src.shape)} {src.dtype} differs per block from D's"
        else:
            try:
                why = cuda_ipc.verify_canary(src, info.get("canary"), self._puller.stream)
            except Exception as e:  # noqa: BLE001 - e.g. Triton refusing the pointer
                why = f"canary read failed: {type(e).__name__}: {e}"
        if why:
            cuda_ipc.close_peer_pool(src)
            return None, why
        logger.info("mapped P %s's pool (GPU %s) into %s in %.1f ms", name,
                    info.get("gpu_uuid"), self.pool.device, (time.monotonic() - t0) * 1e3)
        return src, ""

    def _drop_peer(self, identity: bytes, reason: str) -> None:
        peer = self._peers.pop(identity, None)
        if peer is None:
            return
        for r in list(self._res.values()):
            if r.peer == identity:
                self._finish(r, ReservationState.FAILED, EventKind.FAILED, reason,
                             notify_peer=False)
        for rid, (pid, _, _) in list(self._early.items()):
            if pid == identity:
                del self._early[rid]
        if peer.transport == "cuda_ipc" and peer.src_pool is not None:
            # its reservations were finished above, each after its copy completed
            cuda_ipc.close_peer_pool(peer.src_pool)
        peer.src_pool = None  # unmap

    def _on_offer(self, identity: bytes, msg: dict) -> None:
        rid = msg["rid"]
        r = self._res.get(rid)
        if r is None:
            self._early[rid] = (identity, msg, time.monotonic() + EARLY_OFFER_GRACE_S)
            return
        if r.state is not ReservationState.RESERVED:
            raise ProtocolError(f"offer for {rid} in state {r.state.value}")
        r.peer = identity
        r.offered_at = time.monotonic()
        bs = self.pool.spec.block_size
        need = -(-msg["num_tokens"] // bs)
        src = msg["blocks"]
        if len(src) != need or need > len(r.block_ids) or max(src, default=0) >= 2**31:
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                f"offer of {len(src)} blocks for {msg['num_tokens']} tokens "
                                f"does not fit a reservation of {len(r.block_ids)} blocks")
        r.src_blocks = src
        r.state = ReservationState.PULLING
        r.deadline = time.monotonic() + self.transfer_timeout
        peer = self._peers[identity]
        if peer.transport == "none":
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                "this D accepts no KV transport (it recomputes prompts)")
        if peer.transport == "shm":
            try:
                shm.copy_blocks(self.pool.tensor, r.block_ids[:need], peer.src_pool, src)
            except (IndexError, RuntimeError) as e:
                return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                    f"shm pull failed: {e}")
            self._finish(r, ReservationState.DONE, EventKind.ARRIVED)
        elif peer.transport == "cuda_ipc":
            self._start_pull(r, peer, src, r.block_ids[:need])
        else:
            self._send(identity, Kind.SEND, rid=rid)

    def _start_pull(self, r: Reservation, peer: _Peer, src: list[int], dst: list[int]) -> None:
        """cuda_ipc: one gather launch; DONE and ARRIVED wait for its event (`tick`)."""
        # an out-of-range id would read past the mapping and fault D's whole CUDA context
        if src and max(src) >= peer.src_pool.shape[0]:
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                f"offered block {max(src)} is outside P's pool of "
                                f"{peer.src_pool.shape[0]} blocks")
        if (dst and max(dst) >= self.pool.tensor.shape[0]) or len(set(dst)) != len(dst):
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                "reserved block ids are out of range or repeated")
        if not src:
            return self._finish(r, ReservationState.DONE, EventKind.ARRIVED)
        try:
            self._puller.start(r.rid, peer.src_pool, src, self.pool.tensor, dst)
        except (RuntimeError, ValueError) as e:
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                f"cuda_ipc pull failed: {e}")

    def _on_data(self, identity: bytes, msg: dict, rest: list) -> None:
        r = self._res.get(msg["rid"])
        if r is None or r.peer != identity or r.state is not ReservationState.PULLING:
            return  # cancelled or expired meanwhile: drop the frame
        i = msg["i"]
        if not (0 <= i < len(r.src_blocks)) or len(rest) != 1 or len(rest[0]) != self.block_bytes:
            return self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                f"bad data frame {i} for {r.rid}")
        dst = self.pool.tensor[r.block_ids[i]].view(-1).view(torch.uint8)
        dst.copy_(torch.frombuffer(rest[0].buffer, dtype=torch.uint8))
        r.received.add(i)
        if len(r.received) == len(r.src_blocks):
            self._finish(r, ReservationState.DONE, EventKind.ARRIVED)

    def next_timeout_ms(self) -> int:
        if self._puller is not None and len(self._puller):
            return 1  # copies in flight: poll their events often (latency of DONE/ARRIVED)
        if not self._res and not self._early:
            return 100
        now = time.monotonic()
        nearest = min([r.deadline for r in self._res.values()]
                      + [until for _, _, until in self._early.values()])
        return max(1, min(100, int((nearest - now) * 1000) + 1))

    def tick(self, now: float) -> None:
        if self._puller is not None and len(self._puller):
            for rid in self._puller.poll():
                r = self._res.get(rid)
                if r is not None and r.state is ReservationState.PULLING:
                    self._finish(r, ReservationState.DONE, EventKind.ARRIVED)
        for r in list(self._res.values()):
            if now >= r.deadline:
                if r.state is ReservationState.RESERVED:
                    self._finish(r, ReservationState.EXPIRED, EventKind.EXPIRED,
                                 "no offer before the reservation's deadline")
                else:
                    self._finish(r, ReservationState.FAILED, EventKind.FAILED,
                                 "the data did not arrive before the transfer deadline")
        for rid, (identity, _, until) in list(self._early.items()):
            if now >= until:
                del self._early[rid]
                self._send(identity, Kind.CANCEL, rid=rid, reason="no reservation on D")

    def on_close(self) -> None:
        if self._puller is not None:
            self._puller.wait_all()
        for identity in list(self._peers):
            self._drop_peer(identity, "D closing")
        self.router.close(0)
