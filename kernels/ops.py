"""The table of ops the model calls, chosen once at engine start (no hidden globals).

`get_ops("torch")` gives the references (the CPU path); `get_ops("triton")` the Triton
kernels (on CUDA; on the CPU only under the Triton interpreter, TRITON_INTERPRET=1, which
the tests use); `get_ops("auto")` Triton on CUDA, torch on the CPU. An unknown backend,
Triton on the CPU without the interpreter, or Triton asked for where it is not installed (a
CPU install without the gpu extra) is a clear error, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.attention import (
    decode_attention,
    decode_attention_ref,
    dense_prefill_attention,
    prefill_attention,
    prefill_attention_ref,
    rotary_decode_attention,
    rotary_decode_attention_ref,
)
from pdserve.kernels.gemv import linear_fused, linear_skinny_ref
from pdserve.kernels.kv_cache import write_kv, write_kv_ref
from pdserve.kernels.norm import rms_norm, rms_norm_ref
from pdserve.kernels.rotary import rotary, rotary_ref
from pdserve.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref
from pdserve.kernels.triton_utils import HAVE_TRITON, TRITON_MISSING, interpreting


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every op; see each `*_ref` for the contract."""

    name: str
    rms_norm: Callable
    rotary: Callable
    write_kv: Callable
    rotary_write_kv: Callable  # rotary, then write_kv of the rotated k and v: one launch
    prefill_attention: Callable
    decode_attention: Callable
    # a decode step's rotary_write_kv, then decode_attention (one launch on the GPU)
    rotary_decode_attention: Callable
    # fresh prompts' attention over their own k/v, torch's SDPA (attention.py), where
    # dense_prefill_wanted says so; None: always prefill_attention (the CPU references)
    dense_prefill_attention: Callable | None
    silu_and_mul: Callable
    # a linear layer with its prologue fused ("none" | "norm": residual add + RMSNorm |
    # "silu": SiLU-and-mul): (y, new residual or None); see kernels/gemv.py
    linear: Callable


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_ref,
    rotary=rotary_ref,
    write_kv=write_kv_ref,
    rotary_write_kv=rotary_write_kv_ref,
    prefill_attention=prefill_attention_ref,
    decode_attention=decode_attention_ref,
    rotary_decode_attention=rotary_decode_attention_ref,
    dense_prefill_attention=None,
    silu_and_mul=silu_and_mul_ref,
    linear=linear_skinny_ref,
)

TRITON_OPS = KernelOps(
    name="triton",
    rms_norm=rms_norm,
    rotary=rotary,
    write_kv=write_kv,
    rotary_write_kv=rotary_write_kv,
    prefill_attention=prefill_attention,
    decode_attention=decode_attention,
    rotary_decode_attention=rotary_decode_attention,
    dense_prefill_attention=dense_prefill_attention,
    silu_and_mul=silu_and_mul,
    linear=linear_fused,
)

BACKENDS = ("auto", "torch", "triton")


def get_ops(backend: str, device_type: str) -> KernelOps:
    """Ops for `backend` on `device_type` ("cuda" or "cpu"); "auto" picks Triton on CUDA and
    the torch references elsewhere."""
    if backend == "auto":
        backend = "triton" if device_type == "cuda" else "torch"
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        if not HAVE_TRITON:
            raise ValueError(TRITON_MISSING)
        if device_type != "cuda" and not interpreting():
            raise ValueError(f"kernel backend 'triton' on {device_type} needs the Triton "
                             "interpreter (TRITON_INTERPRET=1 set before start); use 'torch'")
        return TRITON_OPS
    raise ValueError(f"kernel backend {backend!r} is not available (choose from {BACKENDS})")
