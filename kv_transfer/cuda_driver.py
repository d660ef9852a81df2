"""Copies between pinned host memory and GPU memory, and events, through the CUDA driver
API (ctypes over libcuda.so.1), for the tcp plane's staging (`staging.py`).

Why not torch: a non-blocking `copy_` of a slice costs tens of microseconds of the GIL
(slicing, dispatch, the pinned-memory bookkeeping, a new Event), and the tcp plane has a
thread per connection in each process, so at 1-2 MiB chunks the copies' launches, not the
sockets, set the rate (bench/tcp_staging_probe.py, BENCHMARKS.md issue 24). A ctypes call
takes a few microseconds and releases the GIL while the driver runs. Events are made with
blocking sync: a thread waiting for a copy sleeps instead of spinning on a core that the
sockets' copies need.

Every function raises DriverError with the driver's error name. The copies need the
device's context current in the calling thread: `make_current(index)` does it (once per
thread); an Event makes its device's context current itself where a thread has none (D's
I/O thread waits for a transfer's copies).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

_EVENT_FLAGS = 0x1 | 0x2  # CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING
_lib: Any = None
_lock = threading.Lock()
_tls = threading.local()  # .index: the GPU whose primary context this thread made current


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


def _load() -> Any:
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise DriverError(f"the CUDA driver library (libcuda.so.1) cannot be loaded: "
                                  f"{e}") from e
            vp, u64, sz, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint
            sigs = {
                "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
                "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
                "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), ctypes.c_int],
                "cuCtxSetCurrent": [vp],
                "cuMemcpyDtoHAsync_v2": [vp, u64, sz, vp],
                "cuMemcpyHtoDAsync_v2": [u64, vp, sz, vp],
                "cuEventCreate": [ctypes.POINTER(vp), u32],
                "cuEventRecord": [vp, vp],
                "cuEventSynchronize": [vp],
                "cuEventDestroy_v2": [vp],
            }
            for name, args in sigs.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            _lib = lib
    return _lib


def _check(rc: int, what: str) -> None:
    if rc:
        name = ctypes.c_char_p()
        _lib.cuGetErrorName(rc, ctypes.byref(name))
        raise DriverError(f"{what}: {name.value.decode() if name.value else f'error {rc}'}")


def make_current(index: int) -> None:
    """Make GPU `index`'s primary context (the one torch uses) current in this thread. Each
    call retains the context once and nothing releases it: it lives as long as the process
    (torch holds it too); one call per thread that copies or waits (the data connections'
    threads and D's I/O thread), so the count only grows with connections made."""
    lib = _load()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _tls.index = index


def copy_to_host(host_ptr: int, device_ptr: int, nbytes: int, stream: int) -> None:
    """Launch a copy of `nbytes` from GPU memory to pinned host memory on `stream`."""
    _check(_lib.cuMemcpyDtoHAsync_v2(host_ptr, device_ptr, nbytes, stream),
           "cuMemcpyDtoHAsync")


def copy_to_device(device_ptr: int, host_ptr: int, nbytes: int, stream: int) -> None:
    """Launch a copy of `nbytes` from pinned host memory to GPU memory on `stream`."""
    _check(_lib.cuMemcpyHtoDAsync_v2(device_ptr, host_ptr, nbytes, stream),
           "cuMemcpyHtoDAsync")


class Event:
    """A CUDA event on GPU `index` (blocking sync, no timing), recorded again and again;
    destroyed with its last reference (nobody can be waiting on it then)."""

    def __init__(self, index: int) -> None:
        lib = _load()
        self.index = index
        self._current()
        self._ev = ctypes.c_void_p()
        _check(lib.cuEventCreate(ctypes.byref(self._ev), _EVENT_FLAGS), "cuEventCreate")

    def _current(self) -> None:
        if getattr(_tls, "index", None) != self.index:
            make_current(self.index)

    def record(self, stream: int) -> None:
        _check(_lib.cuEventRecord(self._ev, stream), "cuEventRecord")

    def synchronize(self) -> None:
        """Until the work before the last record has finished (at once if never recorded)."""
        self._current()
        _check(_lib.cuEventSynchronize(self._ev), "cuEventSynchronize")

    def __del__(self) -> None:
        ev = getattr(self, "_ev", None)
        if ev and _lib is not None:
            try:
                _lib.cuEventDestroy_v2(ev)
            except Exception:  # interpreter shutdown: the driver may be gone already
                pass
