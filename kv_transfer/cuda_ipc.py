"""The CUDA IPC data plane (GPU pools on one host): P exports its pool once, D maps it once
per P incarnation and pulls each transfer with ONE gather launch on its own device.

P side, at `KVSender` construction: `export_pool(pool)` takes the pool's cudaIpcMemHandle
(torch's `_share_cuda_()` handle is [version][type 'c'][64-byte cudaIpcMemHandle_t] for a
plain cudaMalloc segment; the handle covers the whole segment the caching allocator put the
pool in, so `offset` locates the pool inside it). At each HELLO P adds a canary: the
checksum of a few of its blocks that cannot change before D answers (the blocks of the
offer that triggered the handshake; P frees them only after D's DONE).

D side, at HELLO: `open_peer_pool(info, device)` opens the handle in D's OWN device context
with lazy peer access (through CuPy's runtime bindings) and wraps the span [offset,
offset + nbytes) as a torch tensor on D's device via DLPack. (torch's own rebuild of a shared
CUDA tensor maps it in the *source* device's context, and Triton then refuses the pointer:
DESIGN.md §2.) `verify_canary` reads the canary blocks through the mapping with the gather
kernel and compares checksums. Any failure downgrades the peer to tcp, loudly (receiver).
`close_peer_pool` unmaps it when P restarts (new epoch) or D closes.

A handle may be opened only once per process and device context, so opened handles are
kept in a process-wide, reference-counted table (`_OPENED`): a second receiver in the same
process (e.g. a benchmark) shares the mapping instead of failing.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.engine.kv_pool import DTYPES, KVPool, dtype_name
from pdserve.kv_transfer.protocol import boot_id

logger = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_TORCH_HANDLE_CUDA_MALLOC = ord("c")  # torch's type byte for a plain cudaMalloc segment
_TORCH_HANDLE_EXPANDABLE = ord("e")
CANARY_BLOCKS = 2
CANARY_RETRY_S = 0.05

def gpu_uuid(index: int) -> str:
    """The GPU's UUID: identifies a device across processes whatever CUDA_VISIBLE_DEVICES."""
    return str(torch.cuda.get_device_properties(index).uuid)


def _local_index_of(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if gpu_uuid(i) == uuid:
            return i
    return None


# ---- P side --------------------------------------------------------------------------------

_EXPORTED: dict[tuple[int, int], dict] = {}  # (device, data_ptr) -> registration
_EXPORT_LOCK = threading.Lock()


def ipc_handle_from_torch(handle: bytes) -> bytes:
    """The 64-byte cudaIpcMemHandle_t inside torch's shareable handle, or ValueError."""
    if len(handle) == IPC_HANDLE_BYTES:  # torch before handle versioning
        return bytes(handle)
    if len(handle) == IPC_HANDLE_BYTES + 2:
        if handle[1] == _TORCH_HANDLE_CUDA_MALLOC:
            return bytes(handle[2:])
        if handle[1] == _TORCH_HANDLE_EXPANDABLE:
            raise ValueError("the pool lives in an expandable segment (PYTORCH_CUDA_ALLOC_CONF="
                             "expandable_segments:True), which cudaIpc cannot export")
    raise ValueError(f"unknown torch CUDA IPC handle format ({len(handle)} bytes, "
                     f"type byte {handle[1:2]!r})")


def export_pool(pool: KVPool) -> dict:
    """P: the registration D needs to map `pool` (once per process; the same dict after).

    Returns {"cuda_ipc": {handle, offset, nbytes, shape, dtype, gpu_uuid, device_index},
    "boot_id"}. Call it on the thread that owns the pool before transfers start: torch's
    `_share_cuda_` swaps the storage's deleter (the pool then stays allocated until the
    process exits, which it does anyway). Raises ValueError/RuntimeError if the pool cannot
    be exported (not CUDA, expandable segments)."""
    t = pool.tensor
    if t.device.type != "cuda":
        raise ValueError(f"a cuda_ipc pool must be on a CUDA device, not {t.device}")
    if not t.is_contiguous():
        raise ValueError("the pool tensor must be contiguous")
    key = (t.device.index, t.data_ptr())
    with _EXPORT_LOCK:
        if key not in _EXPORTED:
            shared = t.untyped_storage()._share_cuda_()
            # (device, handle, storage bytes, storage offset in the segment, ref counter, ...)
            handle = ipc_handle_from_torch(shared[1])
            offset = int(shared[3]) + t.storage_offset() * t.element_size()
            _EXPORTED[key] = {
                "handle": handle, "offset": offset, "nbytes": t.numel() * t.element_size(),
                "shape": list(t.shape), "dtype": dtype_name(t.dtype),
                "gpu_uuid": gpu_uuid(t.device.index), "device_index": t.device.index,
            }
    return {"cuda_ipc": dict(_EXPORTED[key]), "boot_id": boot_id()}


def checksum(blocks: torch.Tensor) -> int:
    """Position-weighted sum of a few blocks' 32-bit words, exact in int64 (any reduction
    order gives the same value), so P and D compute it identically on different GPUs."""
    flat = blocks.contiguous().view(-1)
    words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 \
        else flat.view(torch.uint8)
    w = words.to(torch.int64)
    weights = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % 251 + 1
    return int((w * weights).sum().item())  # |w| < 2**31, weight <= 251: no overflow


def canary(pool: KVPool, block_ids: list[int], stream: torch.cuda.Stream | None = None) -> dict:
    """P, at each HELLO: the checksum of `block_ids` (pass blocks that stay unchanged until
    D has answered, e.g. those of the offer that triggered the handshake)."""
    n = pool.tensor.shape[0]
    ids = [b for b in block_ids if 0 <= b < n][:CANARY_BLOCKS] or [0]
    with torch.cuda.device(pool.device), torch.cuda.stream(stream or torch.cuda.current_stream()):
        idx = torch.tensor(ids, dtype=torch.int64, device=pool.device)
        return {"blocks": ids, "checksum": checksum(pool.tensor.index_select(0, idx))}


# ---- D side --------------------------------------------------------------------------------

@dataclass(eq=False)
class _Mapping:
    base: int  # device pointer returned by cudaIpcOpenMemHandle (the segment's base)
    device: int
    refs: int = 0
    tensors: set[int] = field(default_factory=set)  # data_ptrs handed out


_OPENED: dict[tuple[bytes, int], _Mapping] = {}  # (handle, D's device index) -> mapping
_BY_PTR: dict[tuple[int, int], tuple[bytes, int]] = {}  # (device, data_ptr) -> _OPENED key
_OPEN_LOCK = threading.Lock()


def _cupy():
    try:
        import cupy
    except ImportError as e:  # the GPU image has it; a CPU-only box does not
        raise RuntimeError(f"CuPy is needed to open CUDA IPC handles ({e})") from e
    return cupy


def _allocation_range(ptr: int) -> tuple[int, int] | None:
    """(base, size) of the allocation holding `ptr` in the current context, if cuda-python
    is there to ask (cuMemGetAddressRange); None when it cannot tell."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return None
    try:
        err, base, size = cu.cuMemGetAddressRange(ptr)
        if err != cu.CUresult.CUDA_SUCCESS:
            return None
        return int(base), int(size)
    except Exception:  # noqa: BLE001 - a best-effort check, never a reason to fail
        return None


def _check_info(info: dict) -> tuple[bytes, int, int, list[int], torch.dtype]:
    try:
        handle, offset, nbytes = info["handle"], int(info["offset"]), int(info["nbytes"])
        shape, dtype = [int(s) for s in info["shape"]], DTYPES[info["dtype"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad cuda_ipc registration: {type(e).__name__}: {e}") from e
    if not isinstance(handle, bytes) or len(handle) != IPC_HANDLE_BYTES:
        raise ValueError("bad cuda_ipc registration: handle must be 64 bytes")
    if offset < 0 or nbytes != math.prod(shape) * dtype.itemsize or nbytes <= 0:
        raise ValueError(f"bad cuda_ipc registration: {nbytes} bytes at offset {offset} for "
                         f"shape {shape} {info['dtype']}")
    return handle, offset, nbytes, shape, dtype


def open_peer_pool(info: dict, device: torch.device) -> torch.Tensor:
    """D: map P's pool (`info` = P's registration["cuda_ipc"]) into `device`'s context and
    return it as a tensor of P's pool shape and dtype on `device`. Open once per P
    incarnation, never per request (an open costs ~10 ms); `close_peer_pool` when done.
    Raises RuntimeError/ValueError (CUDA's or CuPy's errors are wrapped) on failure."""
    handle, offset, nbytes, shape, dtype = _check_info(info)
    if device.type != "cuda":
        raise ValueError(f"cuda_ipc needs D's pool on a CUDA device, not {device}")
    d = device.index if device.index is not None else torch.cuda.current_device()
    cp = _cupy()
    src_index = _local_index_of(str(info.get("gpu_uuid", "")))
    key = (handle, d)
    with _OPEN_LOCK, cp.cuda.Device(d):
        if src_index is not None and src_index != d \
                and not cp.cuda.runtime.deviceCanAccessPeer(d, src_index):
            raise RuntimeError(f"GPU {d} cannot access peer GPU {src_index}")
        m = _OPENED.get(key)
        if m is None:
            try:
                base = int(cp.cuda.runtime.ipcOpenMemHandle(
                    handle, cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess))
            except cp.cuda.runtime.CUDARuntimeError as e:
                raise RuntimeError(f"cudaIpcOpenMemHandle failed: {e}") from e
            m = _Mapping(base, d)
            rng = _allocation_range(base)
            if rng is not None and offset + nbytes > rng[0] + rng[1] - base:
                cp.cuda.runtime.ipcCloseMemHandle(base)
                raise ValueError(f"P's pool span [{offset}, {offset + nbytes}) exceeds the "
                                 f"mapped allocation of {rng[1]} bytes")
            _OPENED[key] = m
        ptr = m.base + offset
        try:
            mem = cp.cuda.UnownedMemory(ptr, nbytes, m, device_id=d)
            arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
            # DLPack carries D's device index explicitly (the pointer's attributes name P's)
            flat = torch.from_dlpack(arr)
            if flat.device != torch.device("cuda", d) or flat.data_ptr() != ptr:
                raise RuntimeError(f"DLPack wrapped the mapping as {flat.device}:"
                                   f"{flat.data_ptr():#x}, not cuda:{d}:{ptr:#x}")
        except Exception:
            if m.refs == 0:
                del _OPENED[key]
                cp.cuda.runtime.ipcCloseMemHandle(m.base)
            raise
        m.refs += 1
        m.tensors.add(ptr)
        _BY_PTR[(d, ptr)] = key
    return flat.view(dtype).view(shape)


def close_peer_pool(t: torch.Tensor) -> None:
    """D: drop a tensor from `open_peer_pool`; the handle is closed (cudaIpcCloseMemHandle)
    when its last user drops it. No copy may still be reading it: callers wait for their
    pulls' events first. Never raises (logs)."""
    _release((t.device.index, t.data_ptr()))


def _release(key_ptr: tuple[int, int]) -> None:
    with _OPEN_LOCK:
        key = _BY_PTR.get(key_ptr)
        m = _OPENED.get(key) if key is not None else None
        if m is None:
            return
        m.refs -= 1
        if m.refs > 0:
            return
        for ptr in m.tensors:
            _BY_PTR.pop((m.device, ptr), None)
        del _OPENED[key]
        try:
            cp = _cupy()
            with cp.cuda.Device(m.device):
                cp.cuda.runtime.ipcCloseMemHandle(m.base)
        except Exception as e:  # noqa: BLE001 - unmapping is best effort
            logger.warning("cudaIpcCloseMemHandle failed: %s", e)


def num_open_mappings() -> int:
    """Handles this process holds open (for stats and tests)."""
    with _OPEN_LOCK:
        return len(_OPENED)


def read_blocks(src: torch.Tensor, block_ids: list[int], stream: torch.cuda.Stream,
                max_programs: int | None = None) -> torch.Tensor:
    """Copy whole blocks of a (mapped) pool into a fresh tensor on its device with the
    gather kernel, synchronously on `stream` (handshake-time use and warm-up only)."""
    from pdserve.kernels.block_copy import gather_blocks

    dev = src.device
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        out = torch.empty((len(block_ids), *src.shape[1:]), dtype=src.dtype, device=dev)
        # int32 ids, as the pulls use: one compiled kernel for both
        src_ids = torch.tensor(block_ids, dtype=torch.int32, device=dev)
        dst_ids = torch.arange(len(block_ids), dtype=torch.int32, device=dev)
        gather_blocks(src, src_ids, out, dst_ids, max_programs=max_programs)
        stream.synchronize()
    return out


def verify_canary(src: torch.Tensor, canary_info: dict | None, stream: torch.cuda.Stream) -> str:
    """D: '' if the canary blocks read through the mapping match P's checksum, else why not.
    A mismatch is retried once after 50 ms (P may have been writing a block just then)."""
    if not isinstance(canary_info, dict):
        return "P sent no canary"
    blocks, want = canary_info.get("blocks"), canary_info.get("checksum")
    if not isinstance(blocks, list) or not blocks or not isinstance(want, int) or not all(
            isinstance(b, int) and 0 <= b < src.shape[0] for b in blocks):
        return f"bad canary {canary_info!r}"
    got = None
    for attempt in range(2):
        with torch.cuda.device(src.device), torch.cuda.stream(stream):
            got = checksum(read_blocks(src, blocks, stream))
        if got == want:
            return ""
        if attempt == 0:
            time.sleep(CANARY_RETRY_S)
    return f"canary checksum mismatch over blocks {blocks}: P {want}, read {got}"


@dataclass(eq=False)
class _Pending:
    event: torch.cuda.Event
    serial: int  # tells this copy from an earlier one of the same rid
    keep: tuple  # the id tensors and source pool: alive until the copy has run


class Puller:
    """D: runs each transfer as ONE gather launch on a dedicated stream of D's device, and
    a waiter thread that blocks on each copy's CUDA event in launch order and calls
    `on_done(rid, serial)` the moment it completed (the receiver then ends the
    reservation: no polling). Calls other than the waiter's come from the receiver's I/O
    thread.

    Blocks a copy writes are never handed back while it runs: `finished` is true only after
    its event completed, and `discard` (every other way a reservation ends: cancel,
    failure, P gone) waits for a running copy before the receiver emits the event after
    which the scheduler may reuse the blocks."""

    def __init__(self, device: torch.device, pool: torch.Tensor | None = None,
                 on_done: Callable[[str, int], None] | None = None,
                 busy: Callable[[], bool] | None = None, busy_programs: int = 0):
        """`busy()`: whether D's engine is running steps; while it is, a copy runs on at most
        `busy_programs` programs of the gather (so SMs: a full-grid gather's small blocks
        keep a decode step's kernels from finding whole SMs free: +3,100% step time beside
        back-to-back 16k-token pulls on an H100, +11..13% with 8 programs, BENCHMARKS.md).
        0: the full grid always."""
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.on_done = on_done
        self.busy, self.busy_programs = busy, busy_programs
        self.bounded_copies = 0  # copies run on busy_programs (D's engine was busy)
        self._pending: dict[str, _Pending] = {}
        # a BlockGather per (peer pool, own pool): their checks and word views once, not
        # on every pull's critical path (a 4k-token pull is ~0.3 ms of copying on an H200)
        self._gathers: dict[tuple, Any] = {}
        self._serials = itertools.count(1)
        self._waits: queue.SimpleQueue = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._wait_loop, name="kv-pull-waiter",
                                        daemon=True)
        self._waiter.start()
        try:  # import CuPy now (it opens P's handles), not inside the first handshake
            _cupy()
        except RuntimeError as e:
            logger.warning("%s: cuda_ipc handshakes will downgrade", e)
        if pool is not None:  # compile the gather now, not inside a P's handshake
            try:
                read_blocks(pool, [0], self.stream)
                if busy_programs:
                    read_blocks(pool, [0], self.stream, busy_programs)
            except Exception as e:  # noqa: BLE001 - the handshake will report it
                logger.warning("gather kernel warm-up on %s failed: %s", device, e)

    def start(self, rid: str, src_pool: torch.Tensor, src_ids: list[int],
              dst_pool: torch.Tensor, dst_ids: list[int]) -> int:
        """Launch the copy dst_pool[dst_ids] = src_pool[src_ids]; returns its serial. Ids
        must be in range (checked by the caller: a read past a mapping faults D's whole
        CUDA context)."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            gather = self._gather_for(src_pool, dst_pool)
            # pinned staging: a pageable copy could wait for the stream's earlier copies
            # rows padded to 4 ids: both start 16-byte aligned, as in the warm-up's gather
            # (Triton compiles a variant per pointer alignment)
            n = len(src_ids)
            pad = [0] * (-n % 4)
            ids = torch.tensor([src_ids + pad, dst_ids + pad], dtype=torch.int32).pin_memory()
            ids = ids.to(self.device, non_blocking=True)
            bounded = self.busy_programs and self.busy is not None and self.busy()
            gather(ids[0, :n], ids[1, :n], max_programs=self.busy_programs if bounded else None)
            self.bounded_copies += bool(bounded)
            event = torch.cuda.Event()
            event.record(self.stream)
        serial = next(self._serials)
        self._pending[rid] = _Pending(event, serial, (ids, src_pool))
        self._waits.put((rid, serial, event))
        return serial

    def _gather_for(self, src_pool: torch.Tensor, dst_pool: torch.Tensor):
        from pdserve.kernels.block_copy import BlockGather

        # keyed by geometry, not identity: a pool re-mapped at the same address with the
        # same shape has the same views
        key = tuple((t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                    for t in (src_pool, dst_pool))
        gather = self._gathers.get(key)
        if gather is None:
            if len(self._gathers) >= 32:  # peers come and go: never grow without bound
                self._gathers.clear()
            gather = self._gathers[key] = BlockGather(src_pool, dst_pool)
        return gather

    def _wait_loop(self) -> None:
        while True:
            item = self._waits.get()
            if item is None:
                return
            rid, serial, event = item
            try:
                event.synchronize()  # releases the GIL; copies complete in launch order
            except Exception:  # noqa: BLE001 - a faulted context: deadlines end the transfer
                logger.exception("waiting for the KV copy of %s failed", rid)
                continue
            if self.on_done is not None:
                try:
                    self.on_done(rid, serial)
                except Exception:  # noqa: BLE001 - the receiver closed meanwhile
                    logger.debug("KV copy of %s completed after the receiver closed", rid)

    def finished(self, rid: str, serial: int) -> bool:
        """True (and the copy forgotten) if `rid`'s copy `serial` is the one pending: the
        waiter saw its event complete. False for a copy discarded meanwhile."""
        p = self._pending.get(rid)
        if p is None or p.serial != serial:
            return False
        del self._pending[rid]
        return True

    def discard(self, rid: str) -> None:
        """Wait for rid's copy if one is running, then forget it."""
        p = self._pending.pop(rid, None)
        if p is not None:
            p.event.synchronize()

    def wait_all(self) -> None:
        for p in self._pending.values():
            p.event.synchronize()

    def close(self) -> None:
        """End the waiter thread (after the copies queued before)."""
        self._waits.put(None)
