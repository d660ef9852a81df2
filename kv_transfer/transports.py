"""How one P's KV reaches this D: a small strategy object per P, chosen at handshake.

`choose` tries D's transports best first (`--kv-transports`): `cuda_ipc` when both pools are
on GPUs of this host (D maps P's pool once; each transfer is one gather launch on a stream
of D's device), `shm` when P's pool is a /dev/shm file on this host (one gather), `tcp` (P
pushes a frame per block). One that applies but fails to open (a refused IPC handle, a wrong
canary, a failed attach) is a downgrade: logged, counted, returned for the receiver's stats.
`start(rx, r)` moves reservation r's offered blocks into `r.dst_blocks` and ends it through
`rx.done(r)` / `rx.fail(r, why)`, at once or later (cuda_ipc: when the copy's event completes
in the receiver's tick; tcp: when the last frame arrived).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from pdserve.kv_transfer import cuda_ipc, metrics, shm
from pdserve.kv_transfer.protocol import Send, boot_id

if TYPE_CHECKING:
    from pdserve.engine.kv_pool import KVPool
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.states import Reservation

logger = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """A transport that applies to this P could not be opened; the text says why."""


class Transport:
    """None (an empty --kv-transports): every offer fails and D recomputes."""

    name = "none"

    @classmethod
    def open(cls, reg: dict[str, Any], pool: KVPool, puller: Any) -> Transport | None:
        """For P's pool registration `reg`: the transport, None if it does not apply here,
        or TransportError if it applies but cannot be opened."""
        return cls()

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        rx.fail(r, "this D accepts no KV transport (it recomputes prompts)")

    def on_data(self, rx: KVReceiver, r: Reservation, i: int, payload: memoryview) -> None:
        rx.fail(r, f"unexpected data frame over {self.name}")

    def close(self) -> None:
        """P is gone or shook hands again (its reservations ended first): drop any mapping."""


class TcpPush(Transport):
    """P pushes each block as one frame when D asks (Send); D copies it into place."""

    name = "tcp"

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        rx.send(r.peer, Send(e=rx.epoch, rid=r.rid))

    def on_data(self, rx: KVReceiver, r: Reservation, i: int, payload: memoryview) -> None:
        if not 0 <= i < len(r.src_blocks) or len(payload) != rx.block_bytes:
            return rx.fail(r, f"bad data frame {i} for {r.rid}")
        dst = rx.pool.tensor[r.dst_blocks[i]].view(-1).view(torch.uint8)
        dst.copy_(torch.frombuffer(payload, dtype=torch.uint8))
        r.received.add(i)
        if len(r.received) == len(r.src_blocks):
            rx.done(r)


class ShmPull(Transport):
    """D maps P's /dev/shm pool file once and copies each offer with one gather."""

    name = "shm"

    def __init__(self, src: torch.Tensor):
        self.src = src

    @classmethod
    def open(cls, reg: dict[str, Any], pool: KVPool, puller: Any) -> Transport | None:
        info = reg.get("shm")
        if not info or reg.get("boot_id") != boot_id() or pool.device.type != "cpu":
            return None
        try:
            src = shm.attach(info["path"], info["shape"], info["dtype"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TransportError(f"attaching P's pool file failed: {e}") from e
        if list(src.shape[1:]) != list(pool.tensor.shape[1:]):
            raise TransportError(f"P's block shape {list(src.shape[1:])} differs from D's")
        return cls(src)

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        try:
            shm.copy_blocks(rx.pool.tensor, r.dst_blocks, self.src, r.src_blocks)
        except (IndexError, ValueError, RuntimeError) as e:
            return rx.fail(r, f"shm pull failed: {e}")
        rx.done(r)


class CudaIpcPull(Transport):
    """D maps P's GPU pool once per P incarnation (checked against P's canary); each offer
    is one gather launch on the puller's stream."""

    name = "cuda_ipc"

    def __init__(self, src: torch.Tensor, puller: cuda_ipc.Puller):
        self.src, self.puller = src, puller

    @classmethod
    def open(cls, reg: dict[str, Any], pool: KVPool, puller: Any) -> Transport | None:
        if puller is None or reg.get("device") != "cuda" or reg.get("boot_id") != boot_id():
            return None
        info = reg.get("cuda_ipc")
        if not isinstance(info, dict):
            raise TransportError(reg.get("cuda_ipc_error") or "P sent no cuda_ipc registration")
        t0 = time.monotonic()
        try:
            src = cuda_ipc.open_peer_pool(info, pool.device)
        except Exception as e:  # noqa: BLE001 - CuPy, CUDA or a bad registration: downgrade
            raise TransportError(f"opening P's handle failed: {type(e).__name__}: {e}") from e
        if tuple(src.shape[1:]) != tuple(pool.tensor.shape[1:]) or src.dtype != pool.tensor.dtype:
            why = f"P's pool {list(src.shape)} {src.dtype} differs per block from D's"
        else:
            try:
                why = cuda_ipc.verify_canary(src, info.get("canary"), puller.stream)
            except Exception as e:  # noqa: BLE001 - e.g. Triton refusing the pointer
                why = f"canary read failed: {type(e).__name__}: {e}"
        if why:
            cuda_ipc.close_peer_pool(src)
            raise TransportError(why)
        logger.info("mapped a P pool (GPU %s) into %s in %.1f ms", info.get("gpu_uuid"),
                    pool.device, (time.monotonic() - t0) * 1e3)
        return cls(src, puller)

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        src, dst = r.src_blocks, r.dst_blocks
        # an out-of-range id would read past the mapping and fault D's whole CUDA context
        if src and max(src) >= self.src.shape[0]:
            return rx.fail(r, f"offered block {max(src)} is outside P's pool of "
                              f"{self.src.shape[0]} blocks")
        if (dst and max(dst) >= rx.pool.tensor.shape[0]) or len(set(dst)) != len(dst):
            return rx.fail(r, "reserved block ids are out of range or repeated")
        if not src:
            return rx.done(r)
        try:
            self.puller.start(r.rid, self.src, src, rx.pool.tensor, dst)
        except (RuntimeError, ValueError) as e:
            rx.fail(r, f"cuda_ipc pull failed: {e}")

    def close(self) -> None:
        cuda_ipc.close_peer_pool(self.src)  # one reference; other users keep theirs


TRANSPORTS = {t.name: t for t in (CudaIpcPull, ShmPull, TcpPush)}


def choose(names: tuple[str, ...], reg: dict[str, Any], pool: KVPool, puller: Any, peer: str
           ) -> tuple[Transport, dict | None]:
    """The first of `names` that applies and opens, and the downgrade record {from, to,
    reason} if a better one applied but failed (None otherwise)."""
    failed, chosen = None, Transport()
    for name in names:
        try:
            t = TRANSPORTS[name].open(reg, pool, puller)
        except TransportError as e:
            failed = failed or (name, str(e))
            continue
        if t is not None:
            chosen = t
            break
    if failed is None:
        return chosen, None
    metrics.DOWNGRADES.labels(failed[0], chosen.name).inc()
    logger.warning("%s with P %s refused (%s): downgraded to %s", failed[0], peer, failed[1],
                   chosen.name)
    return chosen, {"from": failed[0], "to": chosen.name, "reason": failed[1]}
