"""P's side of the KV transfer: offers its blocks of a request to the D that reserved room.

The prefill worker calls `offer(rid, d_address, block_ids, num_tokens, timeout)` once the
prompt's KV writes have completed (on GPU: after their CUDA event), then drains `events()`:
RELEASED (D has the data) or FAILED / CANCELLED (refused, cancelled, deadline passed). After
any of these P frees the blocks. Until then they must not be reused: D may still read them.

One DEALER socket per D, handshaken once (HELLO with the compatibility record and the pool
registration; D answers WELCOME with the transport, or REFUSE with the reason, which is kept
for `/health`). Over tcp, P pushes each block as one zero-copy frame when D asks (SEND).
Over cuda_ipc (a GPU pool; exported once, at construction) D pulls by itself and P only
waits for DONE; each HELLO carries a canary checksum of blocks D reads back through its
mapping. If D downgrades the transport, WELCOME says so and `stats()` shows it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import zmq

from pdserve.engine.kv_pool import KVPool
from pdserve.kv_transfer import cuda_ipc, metrics
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
from pdserve.kv_transfer.shm import dtype_name
from pdserve.kv_transfer.states import EventKind, Offer, OfferState, TransferEvent

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
REFUSAL_MEMORY_S = 5.0  # after a refusal, new offers to that D fail fast for this long


@dataclass(eq=False)
class _Dest:
    address: str
    sock: zmq.Socket
    state: str = "connecting"  # connecting | ready | refused
    transport: str = ""
    peer_epoch: int | None = None
    reason: str = ""
    since: float = field(default_factory=time.monotonic)


class KVSender(IOThread):
    """P's transfer endpoint. Thread-safe API: offer, cancel, events, stats, close."""

    def __init__(self, pool: KVPool, compat: CompatRecord, *, name: str,
                 internal_token: str = "", transfer_timeout: float = 30.0):
        super().__init__("kv-sender")
        self.pool = pool
        self.compat = compat
        self.name = name
        self.epoch = new_epoch()
        self.token = internal_token
        self.transfer_timeout = transfer_timeout
        self.block_bytes = pool.spec.bytes_per_block
        self._dests: dict[str, _Dest] = {}
        self._by_sock: dict[zmq.Socket, _Dest] = {}
        self._offers: dict[str, Offer] = {}
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
        offer = Offer(rid, address, list(block_ids), num_tokens, deadline)
        self.submit(lambda: self._offer(offer))

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
               "block_bytes": self.block_bytes}
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

    def _dest(self, address: str, offer: Offer | None = None) -> _Dest:
        d = self._dests.get(address)
        now = time.monotonic()
        if d is not None and d.state == "refused" and now - d.since > REFUSAL_MEMORY_S:
            self._close_dest(d)
            d = None
        if d is None:
            sock = self.ctx.socket(zmq.DEALER)
            configure(sock, MAX_CONTROL_BYTES + 4096)
            sock.setsockopt(zmq.IDENTITY, f"{self.name}|{self.epoch:x}".encode())
            sock.connect(address)
            d = _Dest(address, sock)
            self._dests[address] = d
            self._by_sock[sock] = d
            self.poller.register(sock, zmq.POLLIN)
            # the canary: blocks of an offer to this D, which P keeps until D answers it
            offer = offer or next((o for o in self._offers.values() if o.address == address),
                                  None)
            sock.send(encode(Kind.HELLO, self.epoch, v=PROTOCOL_VERSION, name=self.name,
                             token=self.token, compat=self.compat.to_dict(),
                             pool=self._pool_registration(offer.block_ids if offer else [])))
            self._stats[address] = {"state": "connecting", "transport": "", "reason": ""}
        return d

    def _close_dest(self, d: _Dest) -> None:
        self.poller.unregister(d.sock)
        self._by_sock.pop(d.sock, None)
        self._dests.pop(d.address, None)
        d.sock.close(0)

    def _offer(self, offer: Offer) -> None:
        if offer.rid in self._offers:
            return self._release(offer, EventKind.FAILED, f"duplicate offer for {offer.rid}")
        self._offers[offer.rid] = offer
        d = self._dest(offer.address, offer)
        if d.state == "refused":
            return self._release(offer, EventKind.FAILED, f"D refused: {d.reason}")
        if d.state == "ready":
            self._send_offer(d, offer)

    def _send_offer(self, d: _Dest, offer: Offer) -> None:
        offer.state = OfferState.OFFERED
        d.sock.send(encode(Kind.OFFER, self.epoch, rid=offer.rid, blocks=offer.block_ids,
                           num_tokens=offer.num_tokens))

    def _cancel(self, rid: str, reason: str) -> None:
        offer = self._offers.get(rid)
        if offer is None:
            return
        d = self._dests.get(offer.address)
        if d is not None and d.state == "ready":
            d.sock.send(encode(Kind.CANCEL, self.epoch, rid=rid, reason=reason))
        self._release(offer, EventKind.CANCELLED, reason)

    def _release(self, offer: Offer, kind: EventKind, reason: str = "") -> None:
        offer.state = OfferState.RELEASED
        self._offers.pop(offer.rid, None)
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
        while d is not None:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._dispatch(d, decode(frame))
            except ProtocolError as e:
                metrics.MALFORMED.inc()
                logger.warning("malformed message from D %s: %s", d.address, e)

    def _dispatch(self, d: _Dest, msg: dict) -> None:
        kind = msg["k"]
        if kind is Kind.WELCOME:
            d.state, d.transport, d.peer_epoch = "ready", msg["transport"], msg["e"]
            self._stats[d.address] = {"state": "ready", "transport": d.transport, "reason": ""}
            if msg.get("downgraded_from"):  # D counted it; shown here for /health and /load
                self._stats[d.address].update(downgraded_from=str(msg["downgraded_from"]),
                                              downgrade_reason=str(msg.get("downgrade_reason")))
                logger.warning("D %s downgraded the transport from %s to %s: %s", d.address,
                               msg["downgraded_from"], d.transport, msg.get("downgrade_reason"))
            logger.info("D %s accepted; transport %s", d.address, d.transport)
            for offer in list(self._offers.values()):
                if offer.address == d.address and offer.state is OfferState.CONNECTING:
                    self._send_offer(d, offer)
            return
        if kind is Kind.REFUSE:
            d.state, d.reason, d.since = "refused", msg["reason"], time.monotonic()
            self._stats[d.address] = {"state": "refused", "transport": "", "reason": d.reason}
            logger.error("D %s refused this P: %s", d.address, d.reason)
            for offer in list(self._offers.values()):
                if offer.address == d.address:
                    self._release(offer, EventKind.FAILED, f"D refused: {d.reason}")
            return
        if kind is Kind.ERROR:
            logger.warning("D %s reported an error: %s", d.address, msg["reason"])
            if msg.get("code") == "handshake" and d.state == "ready":
                # D restarted and lost us: shake hands again; offers it never saw time out
                self._close_dest(d)
                self._dest(d.address)
            return
        if msg["e"] != d.peer_epoch:
            return  # from an incarnation of D we no longer talk to
        offer = self._offers.get(msg["rid"])
        if offer is None or offer.address != d.address:
            return  # already released (cancelled or timed out here)
        if kind is Kind.DONE:
            self._release(offer, EventKind.RELEASED)
        elif kind is Kind.CANCEL:
            self._release(offer, EventKind.CANCELLED, msg["reason"])
        elif kind is Kind.SEND:
            self._push(d, offer)
        else:
            raise ProtocolError(f"unexpected {kind.value} on P")

    def _push(self, d: _Dest, offer: Offer) -> None:
        """tcp: one frame per block, zero-copy from the pool (CPU) or via a staging copy
        (GPU pools are copied block by block to host memory first)."""
        offer.state = OfferState.SENDING
        for i, b in enumerate(offer.block_ids):
            block = self.pool.tensor[b]
            if block.device.type != "cpu":
                block = block.to("cpu", non_blocking=False)
            payload = block.contiguous().view(-1).view(torch.uint8).numpy()
            d.sock.send_multipart([encode(Kind.DATA, self.epoch, rid=offer.rid, i=i), payload],
                                  copy=False)

    def next_timeout_ms(self) -> int:
        if not self._offers:
            return 100
        nearest = min(o.deadline for o in self._offers.values())
        return max(1, min(100, int((nearest - time.monotonic()) * 1000) + 1))

    def tick(self, now: float) -> None:
        for offer in list(self._offers.values()):
            if now >= offer.deadline:
                d = self._dests.get(offer.address)
                if d is not None and d.state == "ready":
                    d.sock.send(encode(Kind.CANCEL, self.epoch, rid=offer.rid,
                                       reason="P's transfer deadline passed"))
                self._release(offer, EventKind.FAILED, "no confirmation from D before the deadline")
        for d in list(self._dests.values()):
            if d.state == "connecting" and now - d.since > HANDSHAKE_TIMEOUT_S:
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
