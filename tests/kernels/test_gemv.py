"""linear_skinny (the fused prologue + skinny linear of decode) against the unfused torch
composition: the same roundings, only the GEMM's summation order differs."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.gemv import linear_fused, linear_skinny, linear_skinny_ref
from tests.kernels.paged import poisoned_outputs, rel_err, seed_for

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU = [pytest.param("cpu", torch.float32, id="cpu-float32")]
GPU = [pytest.param("cuda", d, marks=pytest.mark.gpu, id=f"cuda-{d}")
       for d in (torch.float32, torch.bfloat16)]


def _inputs(device, dtype, m, n, k, prologue, with_residual, bias, request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)

    x = r(m, 2 * k if prologue == "silu" else k, scale=2.0)
    w = r(n, k, scale=k ** -0.5)
    b = r(n) if bias else None
    res = r(m, k) if with_residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(device)
    return x, w, b, res, nw


@pytest.mark.parametrize("device,dtype", CPU + GPU)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("prologue,with_residual,bias", [
    ("none", False, False), ("none", False, True), ("norm", True, False),
    ("norm", False, True), ("silu", False, False),
])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])  # ragged N and K: masked tiles
@pytest.mark.parametrize("split_k", [1, 3])  # 3: partials folded by the last program
def test_linear_skinny_matches_unfused(device, dtype, m, prologue, with_residual, bias, n, k,
                                       split_k, request):
    x, w, b, res, nw = _inputs(device, dtype, m, n, k, prologue, with_residual, bias, request)
    x0 = x.clone()
    kw = dict(prologue=prologue, residual=res, norm_weight=nw, eps=1e-5)
    with poisoned_outputs():
        y, new_res = linear_skinny(x, w, b, **kw, block_k=32, split_k=split_k)
    assert torch.equal(x, x0)  # inputs never written
    # the reference in fp32 on the same (rounded) inputs
    f = (lambda t: None if t is None else t.float())
    want, want_res = linear_skinny_ref(f(x), f(w), f(b), prologue=prologue, residual=f(res),
                                       norm_weight=f(nw), eps=1e-5)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, want) <= TOL[dtype]
    if prologue == "norm":
        # the new residual is x + residual rounded as torch rounds it, bit for bit
        same_dtype_res = linear_skinny_ref(x, w, b, **kw)[1]
        torch.testing.assert_close(new_res, same_dtype_res, rtol=0, atol=0)
    else:
        assert new_res is None


@pytest.mark.parametrize("device,dtype", CPU)
def test_linear_skinny_refuses_bad_shapes(device, dtype, request):
    x, w, b, res, nw = _inputs(device, dtype, 2, 32, 64, "none", False, False, request)
    with pytest.raises(ValueError, match="prologue must be"):
        linear_skinny(x, w, prologue="gelu")
    with pytest.raises(ValueError, match="does not fit"):
        linear_skinny(x, w, prologue="silu")  # silu wants [M, 2K]
    with pytest.raises(ValueError, match="norm_weight"):
        linear_skinny(x, w, prologue="norm")
    with pytest.raises(ValueError, match="unit stride"):
        linear_skinny(x.t().contiguous().t(), w)


@pytest.mark.parametrize("device,dtype", CPU)
@pytest.mark.parametrize("max_rows", [None, 0, 64])
def test_linear_fused_either_path_matches_the_composition(device, dtype, max_rows, request):
    """Above max_rows (default: SKINNY_MAX_ROWS, 0 = off) the prologue kernels and F.linear,
    below it the skinny kernel: the same result within the GEMM's summation order."""
    x, w, b, res, nw = _inputs(device, dtype, 40, 32, 64, "norm", True, False, request)
    kw = dict(prologue="norm", residual=res, norm_weight=nw, eps=1e-5)
    y, new_res = linear_fused(x, w, **kw, max_rows=max_rows)
    want, want_res = linear_skinny_ref(x, w, **kw)
    assert rel_err(y, want) <= TOL[dtype]
    torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
    if max_rows is None or max_rows == 0:  # off: the unfused kernels, bit for bit
        from pdserve.kernels.activation import silu_and_mul
        from pdserve.kernels.norm import rms_norm
        torch.testing.assert_close(
            y, linear_skinny_ref(x, w, **kw, norm=rms_norm, silu=silu_and_mul)[0], rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", CPU)
def test_split_k_is_deterministic_and_leaves_its_counters_zero(device, dtype, request):
    """The last program of each tile folds the splits' partials in split order: repeated
    calls give the same bits, and every tile's arrival counter is zero again after."""
    from pdserve.kernels.triton_utils import zeroed_counters

    x, w, b, res, nw = _inputs(device, dtype, 3, 40, 200, "norm", True, True, request)
    kw = dict(prologue="norm", residual=res, norm_weight=nw, eps=1e-5, block_k=32, split_k=4)
    y1, r1 = linear_skinny(x, w, b, **kw)
    y2, r2 = linear_skinny(x, w, b, **kw)
    assert torch.equal(y1, y2) and torch.equal(r1, r2)
    assert not zeroed_counters("linear_skinny", 3, x.device).any()
    want = linear_skinny_ref(x, w, b, prologue="norm", residual=res, norm_weight=nw, eps=1e-5)[0]
    assert rel_err(y1, want) <= TOL[dtype]
