"""Helpers shared by the Triton launchers: where a kernel may run and how a launcher refuses
bad input with a clear message instead of a fault inside a kernel.

Triton runs on CUDA tensors; on the CPU only under its interpreter (`TRITON_INTERPRET=1`,
set before triton is imported), which the CPU test suite uses.

Triton is an install-time choice: CUDA builds of torch bring it, `pip install 'pdserve[gpu]'`
(and the `test` extra) name it, and a plain CPU install goes without (~1 GB less). The kernel
modules take `triton` and `tl` from here: without triton they are stand-ins that let the
modules import (`@triton.jit`, `tl.constexpr`), so the torch references run, while anything
that would launch a kernel raises `TritonMissingError` with what to install.
"""

from __future__ import annotations

import os
from typing import Any

import torch

TRITON_MISSING = ("Triton is not installed: the GPU kernels need it (CUDA builds of torch "
                  "bring it; or pip install 'pdserve[gpu]'); the CPU path (kernel backend "
                  "'torch') runs without it")


class TritonMissingError(ModuleNotFoundError):
    def __init__(self) -> None:
        super().__init__(TRITON_MISSING, name="triton")


class _NoKernel:
    """What `@triton.jit` gives without triton: importable, never launchable."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid: Any) -> Any:
        raise TritonMissingError()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TritonMissingError()


class _NoTriton:
    """Stands in for `triton` and `triton.language` when triton is not installed."""

    @staticmethod
    def constexpr(value: Any = None) -> Any:
        return value

    def jit(self, fn: Any = None, **_: Any) -> Any:
        return self.jit if fn is None else _NoKernel(fn)

    def __getattr__(self, name: str) -> Any:
        raise TritonMissingError()


try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # a CPU install without the gpu extra
    triton = tl = _NoTriton()  # type: ignore[assignment]
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when triton runs kernels in its (CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton installed, all tensors on one device, and that device one Triton can launch on."""
    if not HAVE_TRITON:
        raise TritonMissingError()
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"tensors on different devices: {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); on the CPU set "
                         "TRITON_INTERPRET=1 before triton is imported")


def check_power_of_two(name: str, value: int, minimum: int = 16) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


def check_index(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a {ndim}-d int32/int64 tensor, got {tuple(t.shape)} "
                         f"{t.dtype}")


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """The device's multiprocessors (cached per CUDA device); 4 elsewhere (the interpreter:
    any small grid), for launchers that size grids by the SMs."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_COUNTERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def zeroed_counters(kernel: str, n: int, device: torch.device) -> torch.Tensor:
    """int32 zeros (at least n): the per-tile arrival counters of a kernel whose programs
    count in with an atomic and whose last one folds the others' partials, then zeroes the
    counter again. The kernel leaves them zero, so one buffer per (kernel, device) serves
    every launch (the engine's forwards run one launch at a time on one stream). A buffer
    that must grow inside a CUDA graph capture is made per launch (a memset in the graph)
    instead of kept."""
    buf = _COUNTERS.get((kernel, device))
    if buf is None or buf.numel() < n:
        fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        buf = _COUNTERS[(kernel, device)] = fresh
    return buf
