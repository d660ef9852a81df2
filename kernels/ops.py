"""The table of ops the model calls, chosen once at engine start (no hidden globals).

`get_ops("torch")` gives the references. The Triton backend is added by the kernels issue;
asking for it before then is a clear error, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdserve.kernels.activation import silu_and_mul_ref
from pdserve.kernels.attention import decode_attention_ref, prefill_attention_ref
from pdserve.kernels.kv_cache import write_kv_ref
from pdserve.kernels.norm import rms_norm_ref
from pdserve.kernels.rotary import rotary_ref


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every op; see each `*_ref` for the contract."""

    name: str
    rms_norm: Callable
    rotary: Callable
    write_kv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    silu_and_mul: Callable


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_ref,
    rotary=rotary_ref,
    write_kv=write_kv_ref,
    prefill_attention=prefill_attention_ref,
    decode_attention=decode_attention_ref,
    silu_and_mul=silu_and_mul_ref,
)

BACKENDS = ("auto", "torch")


def get_ops(backend: str, device_type: str) -> KernelOps:
    """Ops for `backend` ("auto" picks the best one available for `device_type`)."""
    if backend in ("auto", "torch"):
        return TORCH_OPS
    raise ValueError(f"kernel backend {backend!r} is not available (choose from {BACKENDS})")
