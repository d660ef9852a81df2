"""Skinny linear layers for decode (few rows), with the elementwise op before them fused in.

A decode step at small batch reads every weight once and does little else; what runs between
the GEMMs (residual add + RMSNorm before qkv and gate_up, SiLU-and-mul before down) is a
launch each, latency-bound at a few rows, and cuBLAS adds a split-K reduce launch to skinny
GEMMs. `linear_skinny` reads the weight once per step in one launch, the prologue computed
on the fly from the (few, L2-resident) input rows:

- prologue "none":   y = x @ W^T (+ bias)
- prologue "norm":   h = x + residual (rounded to the dtype, as torch's add); y = rms_norm(h) @ W^T;
                     the new residual h is returned (written by program 0)
- prologue "silu":   x = [gate | up]; y = (silu(gate) * up) @ W^T

Roundings follow the references (`rms_norm_ref`, `silu_and_mul_ref`, then `F.linear`): each
intermediate rounds to the input dtype where torch would round it, so the only difference
from the unfused path is the GEMM's summation order. One program owns BLOCK_N output columns
for every row and walks K once: W's [BLOCK_N, BLOCK_K] tiles are contiguous along K, so the
loads are wide and the whole weight is read exactly once per call. Rows are padded to a
tensor-core dot's 16 (a single row is summed with FMAs).

`linear_skinny_ref` is the unfused composition (the CPU path and the reference);
`linear_fused` (the Triton ops' linear) takes the skinny kernel up to `SKINNY_MAX_ROWS` rows.
That is 0 for now: on an H100 (bench/gemv_sweep.py, BENCHMARKS.md session 11) cuBLAS read the
weights 1.2-4x faster than this kernel at 1-32 rows except o_proj at 4-16 rows (1.15x), and
the fused launches it saves (~0.3 ms a step at batch 1) do not make up for it: a decode step at
batch 1 took 9.62 ms with it against 6.10 without. The kernel stays, tested, for the sweep:
a version that splits K over programs (as cuBLAS's skinny kernels do) is the next try.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.norm import rms_norm, rms_norm_ref
from pdserve.kernels.triton_utils import check_device, tl, triton

PROLOGUES = ("none", "norm", "silu")
SKINNY_MAX_ROWS = 0  # off: cuBLAS measured faster (bench/gemv_sweep.py, BENCHMARKS.md)


def linear_skinny_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    prologue: str = "none", residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
    norm=rms_norm_ref, silu=silu_and_mul_ref,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused path: (y [M, N], new residual for "norm" else None)."""
    new_residual = None
    if prologue == "norm":
        x, new_residual = norm(x, norm_weight, eps, residual)
    elif prologue == "silu":
        x = silu(x)
    elif prologue != "none":
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    return F.linear(x, weight, bias), new_residual


@triton.jit
def _skinny_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr,
    M, N, K, stride_xm, stride_rm, stride_wn, stride_ym, stride_rom, eps,
    PROLOGUE: tl.constexpr,  # 0 none, 1 norm, 2 silu
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    r_rows = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm
    dtype = x_ptr.dtype.element_ty

    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if PROLOGUE == 1:  # first pass: each row's fp32 sum of squares of h = x + residual
        ss = tl.zeros([M_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = mask_m[:, None] & (offs_k < K)[None, :]
            h = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_rows + offs_k[None, :], mask=mk, other=0.0)
                h = (r.to(tl.float32) + h.to(tl.float32)).to(dtype)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)

    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mk = mask_m[:, None]
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mk = mask_m[:, None] & (offs_k < K)[None, :]
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                        other=0.0)
        if PROLOGUE == 2:  # x = [gate | up], K = the intermediate size
            g = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            u = tl.load(x_rows + K + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # rounded as torch's silu
            a = (s * u).to(dtype)
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0)
            if PROLOGUE == 1:
                if HAS_RESIDUAL:
                    r = tl.load(r_rows + offs_k[None, :], mask=mk, other=0.0)
                    a = (r.to(tl.float32) + a.to(tl.float32)).to(dtype)
                    if pid == 0:  # the new residual, once
                        tl.store(res_out_ptr + offs_m[:, None].to(tl.int64) * stride_rom
                                 + offs_k[None, :], a, mask=mk)
                normed = (a.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
                nw = tl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                a = (nw[None, :] * normed).to(dtype)
        if USE_DOT:
            acc = tl.dot(a, tl.trans(w.to(dtype)), acc, input_precision=DOT_PRECISION)
        else:  # [M_PAD, 1, BLOCK_K] * [1, BLOCK_N, BLOCK_K], summed over K
            prod = a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, 2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _default_config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for M = m rows; bench/gemv_sweep.py."""
    if m >= 16:
        return 32, 128, 4, 4
    if m >= 4:
        return 16, 128, 4, 4
    return 16, 256, 4, 4


def linear_skinny(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    prologue: str = "none", residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
    block_n: int | None = None, block_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, use_dot: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton `linear_skinny_ref` (same contract), one launch. x [M, K] ([M, 2K] for "silu"),
    weight [N, K] with unit stride along K. The tile options are for the sweep (use_dot:
    rows padded to 16 for a tensor-core dot; default from one row up)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    check_device(x, weight)
    if x.dim() != 2 or weight.dim() != 2 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x [M, K] and weight [N, K] need unit stride along K, got "
                         f"{tuple(x.shape)} {x.stride()} and {tuple(weight.shape)} {weight.stride()}")
    M = x.shape[0]
    N, K = weight.shape
    if x.shape[1] != (2 * K if prologue == "silu" else K):
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} with "
                         f"prologue {prologue!r}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    if prologue == "norm":
        if norm_weight is None or norm_weight.shape != (K,):
            raise ValueError(f"prologue 'norm' needs norm_weight [{K}]")
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                     or residual.stride(1) != 1):
            raise ValueError("residual must be like x")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    has_res = prologue == "norm" and residual is not None
    res_out = torch.empty_like(x) if has_res else None
    if M == 0:
        return y, (res_out if has_res else (x if prologue == "norm" else None))
    bn, bk, warps, stages = _default_config(M, N, K)
    bn, bk = block_n or bn, block_k or bk
    if use_dot is None:
        use_dot = M > 1
    m_pad = max(16, triton.next_power_of_2(M)) if use_dot else triton.next_power_of_2(M)
    res_in = residual if has_res else x
    nw = norm_weight.contiguous() if prologue == "norm" else weight
    _skinny_kernel[(triton.cdiv(N, bn),)](
        x, res_in, nw, weight, bias if bias is not None else weight, y,
        res_out if has_res else x,
        M, N, K, x.stride(0), res_in.stride(0), weight.stride(0), y.stride(0),
        res_out.stride(0) if has_res else 0, eps,
        PROLOGUE=PROLOGUES.index(prologue), HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None,
        M_PAD=m_pad, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, EVEN_K=K % bk == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    new_res = res_out if has_res else (x if prologue == "norm" else None)
    return y, new_res


def linear_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    prologue: str = "none", residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, max_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton ops' linear: one skinny launch up to `max_rows` rows (default
    SKINNY_MAX_ROWS: off), else the Triton prologue kernel and cuBLAS."""
    limit = SKINNY_MAX_ROWS if max_rows is None else max_rows
    if x.shape[0] <= limit and x.dtype == weight.dtype and weight.stride(-1) == 1:
        return linear_skinny(x, weight, bias, prologue=prologue, residual=residual,
                             norm_weight=norm_weight, eps=eps)
    return linear_skinny_ref(x, weight, bias, prologue=prologue, residual=residual,
                             norm_weight=norm_weight, eps=eps, norm=rms_norm, silu=silu_and_mul)
