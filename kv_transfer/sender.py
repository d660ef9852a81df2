"""P's side of the KV transfer: offers its blocks of a request to the D that reserved room.

The prefill worker calls `offer(rid, d_address, block_ids, num_tokens, timeout)` once the
prompt's KV writes have completed (on GPU: after their CUDA event), then drains `events()`:
RELEASED (D has the data) or FAILED / CANCELLED (refused, cancelled, deadline passed). After
any of these P frees the blocks. Until then they must not be reused: D may still read them.

One session per D: a DEALER socket with its own identity and epoch, handshaken once (HELLO
with the compatibility record and the pool registration; D answers WELCOME with the transport
and the session key every later message carries, or REFUSE with the reason, which is kept
for `/health`). A socket monitor watches the connection: when it drops (D frozen past the
heartbeat timeout, D restarted) the session ends and a new one starts at once, so the link
heals and `stats()` says what it is, never "ready" over a dead connection. Offers already
sent in the lost session keep their blocks until their deadline over cuda_ipc and shm (D
may still be reading them) and fail at once over tcp; offers still waiting for the
handshake go out in the new session.

Over tcp, WELCOME names D's data port: P opens a few plain connections to it (a
`tcp_send.DataLink` per session) and pushes the blocks over them when D asks (SEND), with
no copy from a CPU pool. An offer released while sender threads still read its blocks
(cancel, deadline) waits in STOPPING until they let go; its event comes only then. Over
cuda_ipc (a GPU pool; exported once, at construction) D pulls by itself and P only waits
for DONE; each HELLO carries a canary checksum of blocks D reads back through its mapping.
If D downgrades the transport, WELCOME says so and `stats()` shows it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.common.compat import PROTOCOL_VERSION, CompatRecord
from pdserve.common.logs import Throttled
from pdserve.engine.kv_pool import KVPool, dtype_name
from pdserve.kv_transfer import cuda_ipc, metrics
from pdserve.kv_transfer import protocol as proto
from pdserve.kv_transfer.channel import IOThread, configure
from pdserve.kv_transfer.protocol import (
    DATA_VERSION,
    MAX_CONTROL_BYTES,
    ProtocolError,
    boot_id,
    decode,
    encode,
)
from pdserve.kv_transfer.states import DestState, EventKind, OfferState, PendingOffer, TransferEvent
from pdserve.kv_transfer.tcp_send import DataLink, default_connections

logger = logging.getLogger(__name__)
flood = Throttled(logger)

HANDSHAKE_TIMEOUT_S = 10.0
REFUSAL_MEMORY_S = 5.0  # after a refusal, new offers to that D fail fast for this long
STOP_GRACE_S = 0.5  # a released offer's tcp sends still running this long: shut them down


@dataclass(eq=False)
class _Dest:
    """One session with one D."""

    address: str
    sock: zmq.Socket
    monitor: zmq.Socket  # the socket's connection events
    epoch: int  # this session's
    state: DestState = DestState.CONNECTING
    transport: str = ""
    peer_epoch: int | None = None
    key: str = ""  # from Welcome
    reason: str = ""
    since: float = field(default_factory=time.monotonic)
    data: DataLink | None = None  # tcp: the data connections


class KVSender(IOThread):
    """P's transfer endpoint. Thread-safe API: offer, cancel, events, stats, close."""

    def __init__(self, pool: KVPool, compat: CompatRecord, *, name: str,
                 internal_token: str = "", transfer_timeout: float = 30.0,
                 canary_block: int | None = None, tcp_connections: int | None = None):
        """`tcp_connections`: data connections per D session over tcp (default:
        `tcp_send.default_connections()`, min(8, cores))."""
        super().__init__("kv-sender")
        self.pool = pool
        self.compat = compat
        self.name = name
        self.epoch = proto.new_epoch()
        self.token = internal_token
        self.transfer_timeout = transfer_timeout
        self.block_bytes = pool.spec.bytes_per_block
        # a block the caller never writes after filling it with random bytes: every HELLO's
        # canary (else the blocks of the offer that opened the session, kept until D answers)
        self.canary_block = canary_block
        self._dests: dict[str, _Dest] = {}
        self._sessions = 0  # sessions opened so far (numbers them: Hello.s)
        self._by_sock: dict[zmq.Socket, _Dest] = {}
        self._offers: dict[str, PendingOffer] = {}
        # released offers whose tcp parts still run: (event kind, reason, grace end, link)
        self._stopping: dict[PendingOffer, tuple[EventKind, str, float, DataLink | None]] = {}
        self.tcp_connections = tcp_connections or default_connections()
        self._stats: dict[str, dict] = {}
        self._ipc: dict | None = None  # cuda_ipc registration of a GPU pool
        self._ipc_error = ""
        self._canary_stream = None
        if pool.device.type == "cuda":
            try:  # here, on the owner's thread, before any transfer (see export_pool)
                self._ipc = cuda_ipc.export_pool(pool)["cuda_ipc"]
                self._canary_stream = torch.cuda.Stream(device=pool.device)
            except Exception as e:  # noqa: BLE001 - D then downgrades to tcp, loudly
                self._ipc_error = f"P could not export its pool: {type(e).__name__}: {e}"
                logger.warning("cuda_ipc unavailable: %s", self._ipc_error)
        self.start()

    # ---- API (any thread) ----------------------------------------------------------------

    def offer(self, rid: str, address: str, block_ids: list[int], num_tokens: int,
              timeout: float | None = None) -> None:
        """Offer the KV of `rid` (its first `num_tokens` tokens, in `block_ids`) to the D at
        `address`. The blocks stay untouched until this rid's event arrives.

        The caller guarantees the KV is complete in those blocks: on a GPU pool, the CUDA
        event recorded after the prompt's KV writes has completed (D may read them over
        cuda_ipc from another stream, another process, as soon as the OFFER arrives)."""
        deadline = time.monotonic() + (timeout or self.transfer_timeout)
        offer = PendingOffer(rid, address, list(block_ids), num_tokens, deadline)
        self.submit(lambda: self._offer(offer))

    def connect(self, address: str) -> None:
        """Open a session to the D at `address` now, ahead of any offer (a no-op if one is
        open or opening), so the first transfer finds the handshake done."""
        self.submit(lambda: self._dest(address))

    def cancel(self, rid: str, reason: str = "cancelled by P") -> None:
        """Withdraw an offer; D frees its reservation. An event (CANCELLED) still follows,
        after which the blocks are free to reuse."""
        self.submit(lambda: self._cancel(rid, reason))

    def stats(self) -> dict[str, dict]:
        """Per D address: state (connecting/ready/refused), transport, refusal reason."""
        return {a: dict(s) for a, s in self._stats.items()}

    # ---- I/O thread ----------------------------------------------------------------------

    def _pool_registration(self, canary_blocks: list[int]) -> dict:
        reg = {"device": self.pool.device.type, "boot_id": boot_id(),
               "block_bytes": self.block_bytes, "tcp_data": DATA_VERSION}
        if self._ipc is not None:
            try:  # blocks that stay unchanged until D has answered (see _dest)
                canary = cuda_ipc.canary(self.pool, canary_blocks, self._canary_stream)
                reg["cuda_ipc"] = {**self._ipc, "canary": canary}
            except Exception as e:  # noqa: BLE001 - D then downgrades to tcp, loudly
                reg["cuda_ipc_error"] = f"P's canary failed: {type(e).__name__}: {e}"
        elif self._ipc_error:
            reg["cuda_ipc_error"] = self._ipc_error
        if self.pool.shm_path is not None:
            reg["shm"] = {"path": str(self.pool.shm_path), "shape": list(self.pool.tensor.shape),
                          "dtype": dtype_name(self.pool.spec.dtype)}
        return reg

    def _dest(self, address: str, offer: PendingOffer | None = None) -> _Dest:
        d = self._dests.get(address)
        now = time.monotonic()
        if d is not None and d.state is DestState.REFUSED and now - d.since > REFUSAL_MEMORY_S:
            self._close_dest(d)
            d = None
        if d is None:
            self._sessions += 1
            epoch = proto.new_epoch()
            sock = self.ctx.socket(zmq.DEALER)
            configure(sock, MAX_CONTROL_BYTES + 4096)
            sock.setsockopt(zmq.IDENTITY, f"{self.name}|{self.epoch:x}|{epoch:x}".encode())
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(address)
            d = _Dest(address, sock, monitor, epoch)
            self._dests[address] = d
            self._by_sock[sock] = self._by_sock[monitor] = d
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(monitor, zmq.POLLIN)
            # the canary: P's canary block, or the blocks of an offer to this D, which P
            # keeps until D answers it
            offer = offer or next((o for o in self._offers.values() if o.address == address),
                                  None)
            blocks = [self.canary_block] if self.canary_block is not None else \
                offer.block_ids if offer else []
            sock.send(encode(proto.Hello(e=epoch, v=PROTOCOL_VERSION, name=self.name,
                                         token=self.token, compat=self.compat.to_dict(),
                                         pool=self._pool_registration(blocks), pe=self.epoch,
                                         s=self._sessions)))
            self._stats[address] = {"state": "connecting", "transport": "", "reason": "",
                                    "session": self._sessions}
        return d

    def _close_dest(self, d: _Dest) -> None:
        if d.data is not None:
            d.data.close()
        self.poller.unregister(d.sock)
        self.poller.unregister(d.monitor)
        self._by_sock.pop(d.sock, None)
        self._by_sock.pop(d.monitor, None)
        if self._dests.get(d.address) is d:
            del self._dests[d.address]
        d.sock.disable_monitor()
        d.monitor.close(0)
        d.sock.close(0)

    def _session_lost(self, d: _Dest, why: str = "") -> None:
        """The session's connection dropped (or D lost it): end it, start a new one at once.
        Its tcp offers fail now (only its senders read their blocks, and they stop)."""
        metrics.SESSIONS_LOST.inc()
        logger.warning("lost the connection to D %s (transport %s%s): new session", d.address,
                       d.transport or "none", f": {why}" if why else "")
        self._close_dest(d)
        if d.data is not None:
            why = f"the session with D was lost mid-transfer ({why or 'connection dropped'})"
            for offer in list(self._offers.values()):
                if offer.address == d.address and offer.session == d.epoch:
                    self._release(offer, EventKind.FAILED, why)
        self._dest(d.address)
        self._stats[d.address]["reason"] = "reconnecting: the previous session's connection " \
                                           "was lost"

    def _offer(self, offer: PendingOffer) -> None:
        if offer.rid in self._offers:
            return self._release(offer, EventKind.FAILED, f"duplicate offer for {offer.rid}")
        self._offers[offer.rid] = offer
        d = self._dest(offer.address, offer)
        if d.state is DestState.REFUSED:
            return self._release(offer, EventKind.FAILED, f"D refused: {d.reason}")
        if d.state is DestState.READY:
            self._send_offer(d, offer)

    def _send_offer(self, d: _Dest, offer: PendingOffer) -> None:
        offer.state, offer.session = OfferState.OFFERED, d.epoch
        self._send(d, proto.Offer(e=d.epoch, rid=offer.rid, blocks=offer.block_ids,
                                  num_tokens=offer.num_tokens))

    def _send(self, d: _Dest, msg: proto.KVMessage) -> None:
        if d.state is DestState.READY:
            msg.a = d.key
            d.sock.send(encode(msg))

    def _session_of(self, offer: PendingOffer) -> _Dest | None:
        """The live session `offer` went out in (None: not sent, or that session ended)."""
        d = self._dests.get(offer.address)
        return d if d is not None and d.epoch == offer.session else None

    def _cancel(self, rid: str, reason: str) -> None:
        offer = self._offers.get(rid)
        if offer is None:
            return
        d = self._session_of(offer)
        if d is not None:
            self._send(d, proto.Cancel(e=d.epoch, rid=rid, reason=reason))
        self._release(offer, EventKind.CANCELLED, reason)

    def _release(self, offer: PendingOffer, kind: EventKind, reason: str = "") -> None:
        if self._offers.get(offer.rid) is offer:
            del self._offers[offer.rid]
        if offer.num_parts:  # tcp senders still read its blocks: the event waits for them
            offer.state = OfferState.STOPPING
            d = self._session_of(offer)
            self._stopping[offer] = (kind, reason, time.monotonic() + STOP_GRACE_S,
                                     d.data if d else None)
            return
        offer.state = OfferState.RELEASED
        d = self._dests.get(offer.address)
        transport = d.transport if d else ""
        ok = kind is EventKind.RELEASED
        nbytes = len(offer.block_ids) * self.block_bytes if ok else 0
        secs = time.monotonic() - offer.created
        metrics.TRANSFERS.labels("prefill", transport or "none",
                                 "done" if ok else kind.value).inc()
        if ok:
            metrics.BYTES.labels("prefill", transport).inc(nbytes)
        self.emit(TransferEvent(offer.rid, kind, reason, transport, nbytes, secs))

    def handle(self, sock: zmq.Socket) -> None:
        d = self._by_sock.get(sock)
        if d is not None and sock is d.monitor:
            return self._on_monitor(d)
        while d is not None:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._dispatch(d, decode(frame))
            except ProtocolError as e:
                metrics.MALFORMED.inc()
                flood.warning("malformed", "malformed message from D %s: %s", d.address, e)

    def _on_monitor(self, d: _Dest) -> None:
        while True:
            try:
                event = recv_monitor_message(d.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._dests.get(d.address) is d \
                    and d.state is not DestState.REFUSED:  # a Hello in flight is lost too
                return self._session_lost(d)

    def _dispatch(self, d: _Dest, msg: proto.KVMessage) -> None:
        if isinstance(msg, proto.Error):  # unsigned: a restarted D does not know the session
            flood.warning("error", "D %s reported an error: %s", d.address, msg.reason)
            if msg.code == "handshake" and d.state is DestState.READY:
                self._session_lost(d)  # D restarted and lost us; offers it never saw time out
            return
        if d.state is DestState.READY and (msg.e != d.peer_epoch or msg.a != d.key):
            raise ProtocolError(f"{msg.__struct_config__.tag} without this session's key")
        if isinstance(msg, proto.Welcome):
            if d.state is not DestState.CONNECTING:
                raise ProtocolError("a second welcome in one session")
            if msg.transport == "tcp" and not (msg.data_port and msg.data_key):
                return self._on_refuse(d, "D's tcp transport names no data port (another "
                                          "pdserve version)")
            d.state, d.transport, d.peer_epoch = DestState.READY, msg.transport, msg.e
            d.key = msg.key
            self._stats[d.address] = {"state": "ready", "transport": d.transport, "reason": "",
                                      "session": self._stats[d.address].get("session")}
            if msg.transport == "tcp":
                d.data = self._open_data(d, msg)
            if msg.downgraded_from:  # D counted it; shown here for /health and /load
                self._stats[d.address].update(downgraded_from=msg.downgraded_from,
                                              downgrade_reason=msg.downgrade_reason)
                logger.warning("D %s downgraded the transport from %s to %s: %s", d.address,
                               msg.downgraded_from, d.transport, msg.downgrade_reason)
            logger.info("D %s accepted; transport %s", d.address, d.transport)
            for offer in list(self._offers.values()):
                if offer.address == d.address and offer.state is OfferState.CONNECTING:
                    self._send_offer(d, offer)
            return
        if isinstance(msg, proto.Refuse):
            return self._on_refuse(d, msg.reason)
        if not isinstance(msg, proto.Done | proto.Cancel | proto.Send):
            raise ProtocolError(f"unexpected {msg.__struct_config__.tag} on P")
        offer = self._offers.get(msg.rid)
        if offer is None or self._session_of(offer) is not d:
            return  # another session's, or already released (cancelled, timed out)
        if isinstance(msg, proto.Done):
            self._release(offer, EventKind.RELEASED)
        elif isinstance(msg, proto.Cancel):
            self._release(offer, EventKind.CANCELLED, msg.reason)
        elif offer.state is OfferState.OFFERED:
            self._push(d, offer, msg.x)

    def _on_refuse(self, d: _Dest, reason: str) -> None:
        d.state, d.reason, d.since = DestState.REFUSED, reason, time.monotonic()
        self._stats[d.address] = {"state": "refused", "transport": "", "reason": d.reason}
        logger.error("D %s refused this P: %s", d.address, d.reason)
        for offer in list(self._offers.values()):
            if offer.address == d.address:
                self._release(offer, EventKind.FAILED, f"D refused: {d.reason}")

    def _open_data(self, d: _Dest, msg: proto.Welcome) -> DataLink:
        """tcp: the session's data connections, to D's data port at the host P reaches D at
        (the address D advertised)."""
        host = d.address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        link = DataLink(self.pool, host, msg.data_port, msg.data_key, self.tcp_connections,
                        on_part_ended=lambda o: self.submit(lambda: self._part_ended(o)),
                        on_lost=lambda lk, why: self.submit(lambda: self._data_lost(lk, why)))
        self._stats[d.address]["data_connections"] = len(link.senders)
        return link

    def _push(self, d: _Dest, offer: PendingOffer, xid: int) -> None:
        """tcp: D asked for the data (transfer id `xid`): one part per data connection."""
        if d.data is None:
            return self._release(offer, EventKind.FAILED, "D asked for tcp data in a session "
                                                          "without data connections")
        offer.state = OfferState.SENDING
        offer.num_parts += d.data.push(offer, xid)

    def _part_ended(self, offer: PendingOffer) -> None:
        """(I/O thread) a sender finished, or gave up, one part of the offer."""
        offer.num_parts -= 1
        if offer.num_parts == 0 and offer in self._stopping:
            kind, reason, _, _ = self._stopping.pop(offer)
            self._release(offer, kind, reason)

    def _data_lost(self, link: DataLink, why: str) -> None:
        d = next((d for d in self._dests.values() if d.data is link), None)
        if d is not None:
            self._session_lost(d, f"data connection: {why}")

    def next_timeout_ms(self) -> int:
        if not self._offers and not self._stopping:
            return 100
        nearest = min([o.deadline for o in self._offers.values()]
                      + [min(until, time.monotonic() + 1) for _, _, until, _ in
                         self._stopping.values()])
        return max(1, min(100, int((nearest - time.monotonic()) * 1000) + 1))

    def tick(self, now: float) -> None:
        for offer, (kind, reason, until, link) in list(self._stopping.items()):
            if now >= until:  # a send blocked on D (frozen, full buffers): unblock it
                logger.warning("offer %s released but its tcp sends still run after %.1f s: "
                               "closing the data connections", offer.rid, STOP_GRACE_S)
                self._stopping[offer] = (kind, reason, float("inf"), link)
                if link is not None:
                    link.kill()
        for offer in list(self._offers.values()):
            if now >= offer.deadline:
                d = self._session_of(offer)
                if d is not None:
                    self._send(d, proto.Cancel(e=d.epoch, rid=offer.rid,
                                               reason="P's transfer deadline passed"))
                self._release(offer, EventKind.FAILED, "no confirmation from D before the deadline")
        for d in list(self._dests.values()):
            if d.state is DestState.CONNECTING and now - d.since > HANDSHAKE_TIMEOUT_S:
                # D unreachable: forget the socket so a later offer reconnects from scratch
                for offer in list(self._offers.values()):
                    if offer.address == d.address:
                        self._release(offer, EventKind.FAILED, "D did not answer the handshake")
                self._stats[d.address] = {"state": "unreachable", "transport": "", "reason":
                                          "no answer to the handshake"}
                self._close_dest(d)

    def on_close(self) -> None:
        for d in list(self._dests.values()):
            self._close_dest(d)
