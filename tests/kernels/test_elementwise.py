"""write_kv, rms_norm, rotary, the fused rotary + KV write and silu_and_mul: Triton kernels
against the torch references, on fresh random inputs, outputs poisoned with NaN before each
run."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.kv_cache import write_kv, write_kv_ref
from pdserve.kernels.norm import rms_norm, rms_norm_ref
from pdserve.kernels.rotary import rotary, rotary_ref
from pdserve.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref
from tests.kernels.paged import poisoned_outputs, rel_err, seed_for

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU = [("cpu", torch.float32), ("cpu", torch.float16)]
GPU = [pytest.param("cuda", d, marks=pytest.mark.gpu, id=f"cuda-{d}")
       for d in (torch.float32, torch.bfloat16, torch.float16)]
PLACES = [pytest.param(*p, id=f"cpu-{p[1]}") for p in CPU] + GPU


def gen_for(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(request.node.name))


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 16, 16), (3, 32, 32), (8, 128, 16)])
def test_write_kv(device, dtype, num_kv_heads, head_dim, block_size, request):
    gen = gen_for(request)
    num_blocks, T = 6, 40
    cache = torch.full((num_blocks, 2, 2, block_size, num_kv_heads, head_dim), float("nan"),
                       dtype=dtype, device=device)  # poisoned: untouched slots stay NaN
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[::7] = -1  # padding tokens are skipped
    qkv = torch.randn(T, 4 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k = torch.randn(T, num_kv_heads, head_dim, generator=gen).float().to(device)  # cast on write
    v = qkv[:, num_kv_heads:2 * num_kv_heads]  # a strided view, as the fused qkv split gives
    slots = slots.to(device)
    want = cache.clone()
    write_kv_ref(want, 1, k, v, slots)
    write_kv(cache, 1, k, v, slots)
    assert torch.equal(cache.isnan(), want.isnan())  # every slot written, nothing else
    torch.testing.assert_close(cache, want, rtol=0, atol=0, equal_nan=True)  # a copy: exact


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("hidden", [64, 200, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, hidden, with_residual, request):
    gen = gen_for(request)
    T = 7
    x = (3 * torch.randn(T, hidden, generator=gen)).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    res = torch.randn(T, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    x0 = x.clone()
    with poisoned_outputs():
        out, new_res = rms_norm(x, w, 1e-5, res)
    assert torch.equal(x, x0)  # inputs are never written
    want, want_res = rms_norm_ref(x.float(), w.float(), 1e-5,
                                  None if res is None else res.float())
    assert out.dtype == dtype and new_res.dtype == dtype
    assert rel_err(out, want) <= TOL[dtype]
    # the new residual is the sum rounded to the input dtype, as the reference rounds it
    want_res16 = rms_norm_ref(x, w, 1e-5, res)[1]
    torch.testing.assert_close(new_res, want_res16, rtol=0, atol=0)
    assert rel_err(new_res, want_res) <= TOL[dtype]


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 6, 32), (32, 8, 128)])
def test_rotary(device, dtype, num_heads, num_kv_heads, head_dim, request):
    gen = gen_for(request)
    T, max_pos = 19, 300
    angles = torch.rand(max_pos, head_dim // 2, generator=gen) * 40
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    qkv = torch.randn(T, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]  # strided views
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    with poisoned_outputs():
        q_out, k_out = rotary(q, k, positions, cos, sin)
    q_want, k_want = rotary_ref(q.float(), k.float(), positions, cos, sin)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert rel_err(q_out, q_want) <= TOL[dtype] and rel_err(k_out, k_want) <= TOL[dtype]


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("inter", [16, 100, 1536])
def test_silu_and_mul(device, dtype, inter, request):
    gen = gen_for(request)
    gate_up = (4 * torch.randn(9, 2 * inter, generator=gen)).to(dtype).to(device)
    with poisoned_outputs():
        out = silu_and_mul(gate_up)
    assert out.dtype == dtype
    want = silu_and_mul_ref(gate_up.float())
    assert rel_err(out, want) <= TOL[dtype]
    # and against the reference's own 16-bit roundings: within one ulp
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up))


@pytest.mark.parametrize("device,dtype", PLACES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size",
                         [(4, 2, 16, 16), (6, 3, 32, 32), (32, 8, 128, 16)])
def test_rotary_write_kv(device, dtype, num_heads, num_kv_heads, head_dim, block_size, request):
    """The fused kernel: bit-equal to `rotary` then `write_kv` (q and every cache slot), close
    to the fp32 reference, padding slots write nothing, the inputs are never written."""
    gen = gen_for(request)
    T, max_pos, num_blocks = 23, 300, 5
    angles = torch.rand(max_pos, head_dim // 2, generator=gen) * 40
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    qkv = torch.randn(T, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)  # strided views
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[::5] = -1  # padding tokens: rotated q, nothing cached
    slots = slots.to(device)
    cache = torch.full((num_blocks, 3, 2, block_size, num_kv_heads, head_dim), float("nan"),
                       dtype=dtype, device=device)  # poisoned: untouched slots stay NaN
    qkv0 = qkv.clone()
    # unfused Triton kernels: the fused one must give the same bits
    split_cache = cache.clone()
    q_rot, k_rot = rotary(q, k, positions, cos, sin)
    write_kv(split_cache, 2, k_rot, v, slots)
    with poisoned_outputs():
        q_out = rotary_write_kv(q, k, v, positions, cos, sin, cache, 2, slots)
    assert torch.equal(qkv, qkv0)
    assert q_out.dtype == dtype and q_out.shape == q.shape
    torch.testing.assert_close(q_out, q_rot, rtol=0, atol=0)
    torch.testing.assert_close(cache, split_cache, rtol=0, atol=0, equal_nan=True)
    # return_k: the rotated k to memory too (dense prefill reads it there), the same bits
    k_cache = torch.full_like(cache, float("nan"))
    q_k, k_k = rotary_write_kv(q, k, v, positions, cos, sin, k_cache, 2, slots, return_k=True)
    assert torch.equal(q_k, q_rot) and torch.equal(k_k, k_rot)
    torch.testing.assert_close(k_cache, split_cache, rtol=0, atol=0, equal_nan=True)
    q_r, k_r = rotary_write_kv_ref(q, k, v, positions, cos, sin, k_cache.clone(), 2, slots,
                                   return_k=True)
    assert torch.equal(k_r, rotary_ref(q, k, positions, cos, sin)[1])
    # the fp32 reference: the same slots written (all others NaN), values within TOL
    want_cache = torch.full(cache.shape, float("nan"), dtype=torch.float32, device=device)
    q_want = rotary_write_kv_ref(q.float(), k.float(), v.float(), positions, cos, sin,
                                 want_cache, 2, slots)
    assert torch.equal(cache.isnan(), want_cache.isnan())
    written = ~want_cache.isnan()
    assert int(written.sum()) == 2 * int((slots >= 0).sum()) * num_kv_heads * head_dim
    assert rel_err(q_out, q_want) <= TOL[dtype]
    assert rel_err(cache[written], want_cache[written]) <= TOL[dtype]
    # and the torch ops' composition is the reference itself (the CPU path is unchanged)
    ref_cache = torch.full(cache.shape, float("nan"), dtype=dtype, device=device)
    q_ref = rotary_write_kv_ref(q, k, v, positions, cos, sin, ref_cache, 2, slots)
    q_two, k_two = rotary_ref(q, k, positions, cos, sin)
    two_cache = torch.full(cache.shape, float("nan"), dtype=dtype, device=device)
    write_kv_ref(two_cache, 2, k_two, v, slots)
    assert torch.equal(q_ref, q_two)
    torch.testing.assert_close(ref_cache, two_cache, rtol=0, atol=0, equal_nan=True)


def test_rotary_write_kv_refuses_bad_shapes():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos = sin = torch.randn(10, 8)
    cache = torch.zeros(2, 1, 2, 16, 2, 16)
    slots, pos = torch.arange(3), torch.arange(3)
    with pytest.raises(ValueError, match="layer"):
        rotary_write_kv(q, k, k, pos, cos, sin, cache, 1, slots)
    with pytest.raises(ValueError, match="must be"):
        rotary_write_kv(q, k[:, :1], k, pos, cos, sin, cache, 0, slots)
    with pytest.raises(ValueError, match="disagree"):
        rotary_write_kv(q, k, k, pos, cos, sin, cache, 0, slots[:2])
