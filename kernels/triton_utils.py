"""Helpers shared by the Triton launchers: where a kernel may run and how a launcher refuses
bad input with a clear message instead of a fault inside a kernel.

Triton runs on CUDA tensors; on the CPU only under its interpreter (`TRITON_INTERPRET=1`,
set before triton is imported), which the CPU test suite uses.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when triton runs kernels in its (CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device one Triton can launch on."""
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
