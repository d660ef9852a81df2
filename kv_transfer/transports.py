"""How one P's KV reaches this D: a small strategy object per P, chosen at handshake.

`choose` tries D's transports best first (`--kv-transports`): `cuda_ipc` when both pools are
on GPUs of this host (D maps P's pool once; each transfer is one gather launch on a stream
of D's device), `shm` when P's pool is a /dev/shm file on this host (one gather), `tcp` (P
pushes the blocks over a few plain TCP connections per session, which D receives straight
into the reserved blocks: `tcp_recv.py`, `tcp_send.py`). One that applies but fails to open
(a refused IPC handle, a wrong canary, a failed attach, a P without data sockets) is a
downgrade: logged, counted, returned for the receiver's stats.
`start(rx, r)` moves reservation r's offered blocks into `r.dst_blocks` and ends it through
`rx.done(r)` / `rx.fail(r, why)`, at once or later (cuda_ipc: when the copy's event completes
in the receiver's tick; tcp: when a reader landed the last block).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import torch

from pdserve.kv_transfer import cuda_ipc, metrics, shm
from pdserve.kv_transfer.protocol import DATA_VERSION, Send, boot_id

if TYPE_CHECKING:
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.kv_transfer.states import Reservation
    from pdserve.kv_transfer.tcp_recv import DataPlane

logger = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """A transport that applies to this P could not be opened; the text says why."""


class Transport:
    """None (an empty --kv-transports): every offer fails and D recomputes."""

    name = "none"

    @classmethod
    def open(cls, reg: dict[str, Any], rx: KVReceiver) -> Transport | None:
        """For P's pool registration `reg`: the transport, None if it does not apply here,
        or TransportError if it applies but cannot be opened."""
        return cls()

    def welcome(self) -> dict[str, Any]:
        """Fields of the Welcome that this transport adds (tcp: where the data goes)."""
        return {}

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        rx.fail(r, "this D accepts no KV transport (it recomputes prompts)")

    def close(self) -> None:
        """P is gone or shook hands again (its reservations ended first): drop any mapping."""


class TcpPush(Transport):
    """P pushes the blocks over its data connections when D asks (Send with a transfer id);
    D's readers receive them straight into the reserved blocks (`tcp_recv.py`)."""

    name = "tcp"

    def __init__(self, data: DataPlane, key: str):
        self.data, self.key = data, key

    @classmethod
    def open(cls, reg: dict[str, Any], rx: KVReceiver) -> Transport | None:
        if rx.data is None:
            return None
        if reg.get("tcp_data") != DATA_VERSION:
            raise TransportError(f"P opens no tcp data sockets of version {DATA_VERSION} "
                                 f"(it registered {reg.get('tcp_data')!r}: another pdserve "
                                 "version)")
        key = secrets.token_hex(16)  # what P's data connections must present
        rx.data.add_session(key)
        return cls(rx.data, key)

    def welcome(self) -> dict[str, Any]:
        return {"data_port": self.data.port, "data_key": self.key}

    def start(self, rx: KVReceiver, r: Reservation) -> None:
        dst = r.dst_blocks
        if (dst and max(dst) >= rx.pool.tensor.shape[0]) or len(set(dst)) != len(dst):
            return rx.fail(r, "reserved block ids are out of range or repeated")
        if not dst:
            return rx.done(r)
        # the readers may write into dst from now on: the receiver closes the transfer
        # (close_transfer) before r's blocks go back to the scheduler
        r.xid = self.data.open_transfer(self.key, r.rid, dst)
        rx.send(r.peer, Send(e=rx.epoch, rid=r.rid, x=r.xid))

    def close(self) -> None:
        self.data.drop_session(self.key)


class ShmPull(Transport):
    """D maps P's /dev/shm pool file once and copies each offer with one gather."""

    name = "shm"

    def __init__(self, src: torch.Tensor):
        self.src = src

    @classmethod
    def open(cls, reg: dict[str, Any], rx: KVReceiver) -> Transport | None:
        info, pool = reg.get("shm"), rx.pool
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
    def open(cls, reg: dict[str, Any], rx: KVReceiver) -> Transport | None:
        pool, puller = rx.pool, rx.puller
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


def choose(names: tuple[str, ...], reg: dict[str, Any], rx: KVReceiver, peer: str
           ) -> tuple[Transport, dict | None]:
    """The first of `names` that applies and opens, and the downgrade record {from, to,
    reason} if a better one applied but failed (None otherwise)."""
    failed, chosen = None, Transport()
    for name in names:
        try:
            t = TRANSPORTS[name].open(reg, rx)
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
