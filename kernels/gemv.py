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

The residual add and SiLU round to the input dtype where torch would; the norm is applied as
rms_norm(h) @ W^T = rstd * ((h * w_norm) @ W^T), each row's rstd applied to the fp32 sums
once every split's sum of squares of h is in (one rounding fewer than the reference). One
program owns BLOCK_N output columns and a slice of K (`split_k` slices): W's [BLOCK_N,
BLOCK_K] tiles are contiguous along K, so the loads are wide and the whole weight is read
exactly once per call. With several slices each program writes an fp32 partial and counts
in with an atomic; the last of a tile folds the partials in slice order, so the bits depend
on the configuration alone. Rows are padded to a tensor-core dot's 16 (a single row is
summed with FMAs).

`linear_skinny_ref` is the unfused composition (the CPU path and the reference);
`linear_fused` (the Triton ops' linear) takes the skinny kernel up to `SKINNY_MAX_ROWS` rows.
That is 0 for now: on an H100 (bench/gemv_sweep.py, BENCHMARKS.md session 11) cuBLAS read the
weights 1.2-4x faster than the first version of this kernel (one program walking all of K)
at 1-32 rows, and a decode step at batch 1 took 9.62 ms with it against 6.10 without. With K
split over programs (session 17, same card) the best config per projection is on par at one
row (qkv 0.97x, o_proj 1.02x, gate_up 0.89x, down 1.01x, the prologue launch included) and
0.26-0.92x at 32 rows (the dot path), so it stays off; tuning it further would win at most
the ~0.2 ms of small launches a batch-1 step spends around the GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.norm import rms_norm, rms_norm_ref
from pdserve.kernels.triton_utils import check_device, sm_count, tl, triton, zeroed_counters

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
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, part_ptr, ss_ptr, cnt_ptr,
    M, N, K, K_PER, stride_xm, stride_rm, stride_wn, stride_ym, stride_rom, eps,
    PROLOGUE: tl.constexpr,  # 0 none, 1 norm, 2 silu
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (n tile, k split): y[:, tile] over K[k split], from the weight's [BLOCK_N,
    BLOCK_K] tiles (contiguous along K: wide loads; the weight is read exactly once). With
    SPLIT_K > 1 each program writes its fp32 partial and counts in; the last of a tile folds
    all partials in split order (the bits depend on the split, never on arrival order)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    r_rows = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    dtype = x_ptr.dtype.element_ty

    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([M_PAD], dtype=tl.float32)  # "norm": this split's sum of squares of h
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mk = mask_m[:, None]
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            in_k = offs_k < k_hi
            mk = mask_m[:, None] & in_k[None, :]
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & in_k[None, :],
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
                    if pid_n == 0:  # the new residual, once (tile 0 of each split)
                        tl.store(res_out_ptr + offs_m[:, None].to(tl.int64) * stride_rom
                                 + offs_k[None, :], a, mask=mk)
                hf = a.to(tl.float32)
                ss += tl.sum(hf * hf, 1)
                # rms_norm(h) @ W^T = rstd * ((h * nw) @ W^T): the row's rstd is applied
                # to the sums at the end, once every split's sum of squares is in
                nw = tl.load(nw_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
                a = (hf * nw[None, :]).to(dtype)
        if USE_DOT:
            acc = tl.dot(a, tl.trans(w.to(dtype)), acc, input_precision=DOT_PRECISION)
        else:  # [M_PAD, 1, BLOCK_K] * [1, BLOCK_N, BLOCK_K], summed over K
            prod = a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, 2)

    if SPLIT_K > 1:
        # partials [SPLIT_K, M_PAD, N] (and the sums of squares [n tiles, SPLIT_K, M_PAD]);
        # every thread's are written before the one (scalar) atomic releases them
        part = part_ptr + (pid_k * M_PAD + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask_n[None, :])
        ss_row = ss_ptr + (pid_n * SPLIT_K) * M_PAD + offs_m
        if PROLOGUE == 1:
            tl.store(ss_row + pid_k * M_PAD, ss)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:  # the last: fold every split in order (read past L1: .cg)
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            ss = tl.zeros([M_PAD], dtype=tl.float32)
            base = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            for j in tl.static_range(SPLIT_K):
                acc += tl.load(base + j * M_PAD * N, mask=mask_n[None, :], other=0.0,
                               cache_modifier=".cg")
                if PROLOGUE == 1:
                    ss += tl.load(ss_row + j * M_PAD, cache_modifier=".cg")
            _skinny_store(acc, ss, b_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, K, stride_ym,
                          eps, PROLOGUE, HAS_BIAS)
            tl.store(cnt_ptr + pid_n, 0)  # zero again for the next launch
    else:
        _skinny_store(acc, ss, b_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, K, stride_ym, eps,
                      PROLOGUE, HAS_BIAS)


@triton.jit
def _skinny_store(acc, ss, b_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, K, stride_ym, eps,
                  PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if PROLOGUE == 1:
        acc = acc * (1.0 / tl.sqrt(ss / K + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _default_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for M = m rows; bench/gemv_sweep.py."""
    if m >= 16:
        return 32, 128, 4, 4
    if m >= 4:
        return 16, 128, 4, 4
    return 16, 256, 4, 4


def _default_split(tiles: int, k_tiles: int, device: torch.device) -> int:
    """Programs along K: about four programs per SM over the grid (bench/gemv_sweep.py)."""
    if device.type != "cuda":
        return min(k_tiles, 3)  # the interpreter: a few splits, so the tests fold partials
    return max(1, min(triton.cdiv(4 * sm_count(device), tiles), k_tiles, 16))


def linear_skinny(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    prologue: str = "none", residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
    block_n: int | None = None, block_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, use_dot: bool | None = None,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton `linear_skinny_ref` (same contract), one launch. x [M, K] ([M, 2K] for "silu"),
    weight [N, K] with unit stride along K. The tile options are for the sweep (use_dot:
    rows padded to 16 for a tensor-core dot; default from one row up; split_k: programs
    along K, whose partials the last one folds)."""
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
    bn, bk, warps, stages = _default_config(M)
    bn, bk = block_n or bn, block_k or bk
    tiles = triton.cdiv(N, bn)
    split = max(1, min(split_k or _default_split(tiles, triton.cdiv(K, bk), x.device),
                       triton.cdiv(K, bk)))
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk  # whole tiles per split
    split = triton.cdiv(K, k_per)  # no empty split
    if use_dot is None:
        use_dot = M > 1
    m_pad = max(16, triton.next_power_of_2(M)) if use_dot else triton.next_power_of_2(M)
    if split > 1:
        part = torch.empty((split, m_pad, N), dtype=torch.float32, device=x.device)
        ss = torch.empty((tiles, split, m_pad), dtype=torch.float32, device=x.device)
        cnt = zeroed_counters("linear_skinny", tiles, x.device)
    else:
        part = ss = cnt = y  # unused
    res_in = residual if has_res else x
    nw = norm_weight.contiguous() if prologue == "norm" else weight
    _skinny_kernel[(tiles, split)](
        x, res_in, nw, weight, bias if bias is not None else weight, y,
        res_out if has_res else x, part, ss, cnt,
        M, N, K, k_per, x.stride(0), res_in.stride(0), weight.stride(0), y.stride(0),
        res_out.stride(0) if has_res else 0, eps,
        PROLOGUE=PROLOGUES.index(prologue), HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None,
        M_PAD=m_pad, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, EVEN_K=K % k_per == 0,
        SPLIT_K=split, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
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
