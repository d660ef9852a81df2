"""D's side of the KV transfer: reservations, the handshake with each P, and the transfers.

The decode scheduler allocates blocks and calls `reserve(rid, block_ids, timeout)`; later it
drains `events()`: ARRIVED (the KV is in those blocks: the sequence may join the batch),
EXPIRED (no offer in time), FAILED (peer gone, bad data) or CANCELLED (P cancelled). After
any of these the blocks are the scheduler's again. `cancel(rid)` frees nothing itself: P is
told to free its copy, and the caller reuses the blocks after the CANCELLED event.

Each P's transport is a strategy object chosen at handshake (`transports.py`: cuda_ipc, shm
or tcp, best first; a failed better one is a downgrade, shown in `stats()`, never silent).
An offer is checked against its reservation here, then the transport moves the blocks and
ends the reservation through `done` or `fail`; DONE goes to P only once the data is in place.
With tcp among the transports D also listens on a data port (`tcp_recv.DataPlane`, on the
KV port's interface); whatever ends a reservation closes its tcp transfer first, which
returns only once no reader writes into its blocks.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from pdserve.common import UserError
from pdserve.common.compat import PROTOCOL_VERSION, CompatRecord
from pdserve.common.logs import Throttled
from pdserve.engine.kv_pool import KVPool
from pdserve.kv_transfer import cuda_ipc, metrics, transports
from pdserve.kv_transfer import protocol as proto
from pdserve.kv_transfer.channel import IOThread, configure
from pdserve.kv_transfer.protocol import MAX_CONTROL_BYTES, ProtocolError, decode, encode
from pdserve.kv_transfer.states import EventKind, Reservation, ReservationState, TransferEvent
from pdserve.kv_transfer.tcp_recv import DataPlane

logger = logging.getLogger(__name__)
flood = Throttled(logger)

EARLY_OFFER_GRACE_S = 5.0  # an offer may overtake its reservation; hold it this long
_EVENT = {ReservationState.DONE: EventKind.ARRIVED, ReservationState.FAILED: EventKind.FAILED,
          ReservationState.EXPIRED: EventKind.EXPIRED,
          ReservationState.CANCELLED: EventKind.CANCELLED}


class HandshakeRequired(ProtocolError):
    """A message from a P this D has no handshake with (e.g. D restarted): P re-handshakes."""


@dataclass(eq=False)
class _Peer:
    """One session of one P (a ROUTER identity)."""

    name: str
    epoch: int  # the session's
    transport: transports.Transport
    key: str  # what every message of the session carries (`a`)
    process: int = 0  # P's process epoch (Hello.pe) and the session's number in it (Hello.s)
    session: int = 0


class KVReceiver(IOThread):
    """D's transfer endpoint. Thread-safe API: reserve, cancel, events, stats, close."""

    def __init__(self, pool: KVPool, compat: CompatRecord, *, host: str = "127.0.0.1",
                 port: int = 0, internal_token: str = "", transfer_timeout: float = 30.0,
                 transports: tuple[str, ...] = ("cuda_ipc", "shm", "tcp"), data_port: int = 0,
                 busy: Callable[[], bool] | None = None, pull_programs: int = 0):
        super().__init__("kv-receiver")
        self.pool = pool
        self.compat = compat
        self.epoch = proto.new_epoch()
        self.token = internal_token
        self.transfer_timeout = transfer_timeout
        self.transports = transports
        self.block_bytes = pool.spec.bytes_per_block
        self.router = self.ctx.socket(zmq.ROUTER)
        configure(self.router, MAX_CONTROL_BYTES + 4096)  # the KV itself never rides on it
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            if port:
                self.router.bind(f"tcp://{host}:{port}")
            else:
                port = self.router.bind_to_random_port(f"tcp://{host}")
            # tcp: P's data connections land on this port (same interface as the router)
            self.data = DataPlane(pool, host, on_complete=self._on_landed,
                                  on_failed=self._on_data_failed, on_lost=self._on_data_lost,
                                  port=data_port) \
                if "tcp" in transports else None
        except (zmq.ZMQError, OSError) as e:
            self.ctx.destroy(linger=0)  # nothing started yet: no thread, no socket left
            self._events_waker.close()
            what = (f"the KV port {host}:{port} (--kv-port)" if isinstance(e, zmq.ZMQError)
                    else f"the tcp KV data port {host}:{data_port} (--kv-data-port)")
            raise UserError(f"cannot listen on {what}: {e}") from e
        self.address = f"tcp://{host}:{port}"
        self.poller.register(self.router, zmq.POLLIN)
        self._res: dict[str, Reservation] = {}
        self._early: dict[str, tuple[bytes, proto.Offer, float]] = {}  # rid -> (peer, offer, until)
        self._peers: dict[bytes, _Peer] = {}
        self._stats = {"peers": {}, "active": 0, "downgrades": {}, "num_downgrades": 0}
        # cuda_ipc pulls run on a stream of D's device; made here, used by the I/O thread
        # (`busy`/`pull_programs`: while D's engine runs steps, a pull uses at most that many
        # SMs' worth of programs: cuda_ipc.Puller)
        self.puller = cuda_ipc.Puller(pool.device, pool.tensor, on_done=self._on_copied,
                                      busy=busy, busy_programs=pull_programs) \
            if pool.device.type == "cuda" else None
        if self.data is not None:
            self.poller.register(self.data.fileno, zmq.POLLIN)
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
        -> {from, to, reason}) with their count, CUDA IPC mappings held open, and P's tcp
        data connections open."""
        return {"peers": dict(self._stats["peers"]), "active": self._stats["active"],
                "downgrades": dict(self._stats["downgrades"]),
                "num_downgrades": self._stats["num_downgrades"],
                "cuda_ipc_mappings": cuda_ipc.num_open_mappings(),
                "tcp_connections": self.data.num_connections() if self.data else 0}

    # ---- I/O thread: what transports call ------------------------------------------------

    def send(self, identity: bytes, msg: proto.KVMessage) -> None:
        peer = self._peers.get(identity)
        if peer is not None:
            msg.a = peer.key
        try:
            self.router.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as e:  # peer gone or slow: deadlines handle it
            logger.debug("send %s to %r failed: %s", type(msg).__name__, identity, e)

    def done(self, r: Reservation) -> None:
        """The offered blocks are in place: DONE to P, ARRIVED to the scheduler."""
        self._finish(r, ReservationState.DONE)

    def fail(self, r: Reservation, reason: str) -> None:
        self._finish(r, ReservationState.FAILED, reason)

    # ---- I/O thread ----------------------------------------------------------------------

    def _reserve(self, rid: str, block_ids: list[int], deadline: float) -> None:
        if rid in self._res:
            logger.warning("reservation %s already exists; replaced", rid)
        self._res[rid] = Reservation(rid, block_ids, deadline)
        self._update_active()
        early = self._early.pop(rid, None)
        if early is not None:
            metrics.EARLY_OFFERS.labels("matched").inc()
            self._on_offer(early[0], early[1])

    def _cancel(self, rid: str, reason: str) -> None:
        r = self._res.get(rid)
        self._early.pop(rid, None)
        if r is None:
            return self.emit(TransferEvent(rid, EventKind.CANCELLED, reason))
        if r.peer is not None:
            self.send(r.peer, proto.Cancel(e=self.epoch, rid=rid, reason=reason))
        self._finish(r, ReservationState.CANCELLED, reason, notify_peer=False)

    def _finish(self, r: Reservation, state: ReservationState, reason: str = "",
                notify_peer: bool = True) -> None:
        if self.puller is not None:
            self.puller.discard(r.rid)  # a copy into r's blocks has finished past here
        if r.xid and self.data is not None:
            self.data.close_transfer(r.xid)  # no tcp reader writes into r's blocks past here
        r.state, kind = state, _EVENT[state]
        self._res.pop(r.rid, None)
        peer = self._peers.get(r.peer) if r.peer is not None else None
        transport = peer.transport.name if peer else ""
        if notify_peer and r.peer is not None and state is not ReservationState.CANCELLED:
            done = state is ReservationState.DONE
            self.send(r.peer, proto.Done(e=self.epoch, rid=r.rid) if done
                      else proto.Cancel(e=self.epoch, rid=r.rid, reason=reason or state.value))
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

    def handle(self, sock: zmq.Socket | int) -> None:
        if self.data is not None and sock == self.data.fileno:
            return self.data.accept()
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                if len(frames) < 2:
                    raise ProtocolError("a message needs a body")
                self._dispatch(identity, decode(frames[1].bytes))
            except HandshakeRequired as e:
                metrics.UNAUTHENTICATED.inc()
                self.send(identity, proto.Error(e=self.epoch, reason=str(e), code="handshake"))
            except ProtocolError as e:
                metrics.MALFORMED.inc()
                flood.warning("malformed", "malformed message from %r: %s", identity, e)
                self.send(identity, proto.Error(e=self.epoch, reason=str(e), code="malformed"))

    def _dispatch(self, identity: bytes, msg: proto.KVMessage) -> None:
        if isinstance(msg, proto.Hello):
            return self._on_hello(identity, msg)
        peer = self._peers.get(identity)
        if peer is None or msg.e != peer.epoch:
            raise HandshakeRequired(f"{msg.__struct_config__.tag} before a handshake (or from "
                                    "an old epoch)")
        if not hmac.compare_digest(msg.a.encode(), peer.key.encode()):
            metrics.UNAUTHENTICATED.inc()
            raise ProtocolError(f"{msg.__struct_config__.tag} without the session's key")
        if isinstance(msg, proto.Offer):
            self._on_offer(identity, msg)
        elif isinstance(msg, proto.Cancel):  # a P cancels only what it offered
            r = self._res.get(msg.rid)
            if self._early.get(msg.rid, (None,))[0] == identity:
                del self._early[msg.rid]
            if r is not None and r.peer == identity:
                self._finish(r, ReservationState.CANCELLED, msg.reason)
        else:
            raise ProtocolError(f"unexpected {msg.__struct_config__.tag} on D")

    def _on_hello(self, identity: bytes, msg: proto.Hello) -> None:
        def refuse(reason: str, label: str) -> None:
            metrics.HANDSHAKE_REFUSALS.labels(label).inc()
            flood.warning("refused", "refused P %s: %s", msg.name, reason)
            self.send(identity, proto.Refuse(e=self.epoch, reason=reason))

        if msg.v != PROTOCOL_VERSION:
            return refuse(f"protocol version {msg.v} != {PROTOCOL_VERSION}", "version")
        if not hmac.compare_digest(msg.token.encode(), self.token.encode()):
            return refuse("wrong internal token", "token")
        why = self.compat.mismatch(msg.compat)
        if why:
            return refuse(f"incompatible engines: {why}", "compat")
        # a new session of a P replaces its earlier one (P lost the connection, or restarted);
        # a stale Hello (an earlier session's, delivered late) is ignored
        for old_id, old in list(self._peers.items()):
            if old.name != msg.name or (old.epoch == msg.e and old_id == identity):
                continue
            if old.process == msg.pe and old.session > msg.s:
                logger.info("ignored a stale handshake of P %s (session %d < %d)", msg.name,
                            msg.s, old.session)
                return
            self._drop_peer(old_id, "P opened a new session (lost connection or restart)")
        transport, downgrade = transports.choose(self.transports, msg.pool, self, msg.name)
        old = self._peers.get(identity)  # the same incarnation shaking hands again
        if old is not None:
            old.transport.close()  # its mapping's reference; the new transport holds its own
        self._peers[identity] = _Peer(msg.name, msg.e, transport, secrets.token_hex(16),
                                      msg.pe, msg.s)
        self._stats["peers"][msg.name] = transport.name
        self._stats["downgrades"].pop(msg.name, None)
        welcome = proto.Welcome(e=self.epoch, transport=transport.name,
                                key=self._peers[identity].key, **transport.welcome())
        if downgrade is not None:
            self._stats["downgrades"][msg.name] = downgrade
            self._stats["num_downgrades"] += 1
            welcome.downgraded_from, welcome.downgrade_reason = downgrade["from"], \
                downgrade["reason"]
        self.send(identity, welcome)
        logger.info("P %s (epoch %x) connected over %s", msg.name, msg.e, transport.name)

    def _drop_peer(self, identity: bytes, reason: str) -> None:
        peer = self._peers.pop(identity, None)
        if peer is None:
            return
        for r in list(self._res.values()):
            if r.peer == identity:
                self._finish(r, ReservationState.FAILED, reason, notify_peer=False)
        for rid, (pid, _, _) in list(self._early.items()):
            if pid == identity:
                del self._early[rid]
        peer.transport.close()  # its reservations were finished above, copies completed

    def _on_offer(self, identity: bytes, msg: proto.Offer) -> None:
        r = self._res.get(msg.rid)
        if r is None:
            self._early[msg.rid] = (identity, msg, time.monotonic() + EARLY_OFFER_GRACE_S)
            return
        if r.state is not ReservationState.RESERVED:
            raise ProtocolError(f"offer for {msg.rid} in state {r.state.value}")
        r.peer = identity
        r.offered_at = time.monotonic()
        need = -(-msg.num_tokens // self.pool.spec.block_size)
        src = msg.blocks
        if len(src) != need or need > len(r.block_ids) or max(src, default=0) >= 2**31:
            return self.fail(r, f"offer of {len(src)} blocks for {msg.num_tokens} tokens does "
                                f"not fit a reservation of {len(r.block_ids)} blocks")
        r.src_blocks, r.dst_blocks = src, r.block_ids[:need]
        r.state = ReservationState.PULLING
        r.deadline = time.monotonic() + self.transfer_timeout
        self._peers[identity].transport.start(self, r)

    def _on_copied(self, rid: str, serial: int) -> None:
        """(the puller's waiter thread) a cuda_ipc copy completed: end its reservation."""
        self.submit(lambda: self._copied(rid, serial))

    def _copied(self, rid: str, serial: int) -> None:
        if self.puller is not None and self.puller.finished(rid, serial):
            r = self._res.get(rid)
            if r is not None and r.state is ReservationState.PULLING:
                self.done(r)

    # tcp readers' news (reader threads), acted on in the I/O thread
    def _on_landed(self, xid: int, rid: str) -> None:
        self.submit(lambda: self._tcp_end(xid, rid, ""))

    def _on_data_failed(self, xid: int, rid: str, reason: str) -> None:
        self.submit(lambda: self._tcp_end(xid, rid, reason))

    def _on_data_lost(self, key: str, reason: str) -> None:
        def lost() -> None:
            for xid, rid in self.data.transfers_of(key) if self.data else []:
                self._tcp_end(xid, rid, f"P's tcp data connection closed: {reason}")
        self.submit(lost)

    def _tcp_end(self, xid: int, rid: str, failure: str) -> None:
        r = self._res.get(rid)
        if r is None or r.xid != xid or r.state is not ReservationState.PULLING:
            return  # ended meanwhile (cancel, deadline, another failure)
        if failure:
            self.fail(r, failure)
        else:
            self.done(r)

    def next_timeout_ms(self) -> int:
        if not self._res and not self._early:
            return 100
        now = time.monotonic()
        nearest = min([r.deadline for r in self._res.values()]
                      + [until for _, _, until in self._early.values()])
        return max(1, min(100, int((nearest - now) * 1000) + 1))

    def tick(self, now: float) -> None:
        for r in list(self._res.values()):
            if now >= r.deadline:
                if r.state is ReservationState.RESERVED:
                    self._finish(r, ReservationState.EXPIRED,
                                 "no offer before the reservation's deadline")
                else:
                    self.fail(r, "the data did not arrive before the transfer deadline")
        for rid, (identity, _, until) in list(self._early.items()):
            if now >= until:
                del self._early[rid]
                metrics.EARLY_OFFERS.labels("expired").inc()
                self.send(identity, proto.Cancel(e=self.epoch, rid=rid, reason="no reservation on D"))

    def on_close(self) -> None:
        if self.puller is not None:
            self.puller.wait_all()
            self.puller.close()
        for identity in list(self._peers):
            self._drop_peer(identity, "D closing")
        if self.data is not None:
            self.data.close()
        self.router.close(0)
