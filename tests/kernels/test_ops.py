"""The ops table: which backend each (backend, device) choice gets."""

from __future__ import annotations

import pytest

from pdserve.kernels.ops import BACKENDS, TORCH_OPS, TRITON_OPS, get_ops


def test_backend_choice(monkeypatch):
    assert set(BACKENDS) == {"auto", "torch", "triton"}
    assert get_ops("auto", "cuda") is TRITON_OPS
    assert get_ops("auto", "cpu") is TORCH_OPS
    assert get_ops("torch", "cuda") is TORCH_OPS
    assert get_ops("triton", "cuda") is TRITON_OPS
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_ops("triton", "cpu") is TRITON_OPS
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        get_ops("triton", "cpu")
    with pytest.raises(ValueError, match="not available"):
        get_ops("cuda-graphs", "cuda")


def test_tables_are_complete():
    for field in ("rms_norm", "rotary", "write_kv", "rotary_write_kv", "prefill_attention",
                  "decode_attention", "rotary_decode_attention", "silu_and_mul"):
        ref, ours = getattr(TORCH_OPS, field), getattr(TRITON_OPS, field)
        assert ref.__name__ == f"{field}_ref" and ours.__name__ == field
