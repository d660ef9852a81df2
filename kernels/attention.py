"""Attention over the paged, block-major KV cache: prefill (variable-length chunks with prior
context) and decode (one query per sequence). Both read K/V of a layer through the sequence's
block table; the new tokens' K/V are already written (`write_kv`) before these run.

References gather each sequence's blocks into a padded [B, max_seq_len] view and run a masked
softmax for the whole batch at once: no per-sequence loop, exact fp32 math, O(B * L) memory.

Launchers `prefill_attention` / `decode_attention` check shapes and dtypes, pick fixed tile
sizes from the head dim and dtype (and, for prefill, the batch's longest sequence; no
autotuning: the same inputs always run the same code) and launch the kernels of
`attention_triton.py`, which read K/V tile by tile through the block table with an online
softmax, never materialising the gathered K/V or the scores. Decode results do not depend on
the batch (fixed split size, fixed tiles); 16-bit prefill results may change in the last bit
with the batch's longest sequence (it picks the key-tile width), as DESIGN.md §2 allows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pdserve.kernels.attention_triton import _decode_attention_kernel, _prefill_attention_kernel
from pdserve.kernels.rotary_kv import check_rotary_kv, rotary_write_kv_ref
from pdserve.kernels.triton_utils import (
    check_device,
    check_index,
    check_power_of_two,
    interpreting,
    sm_count,
    triton,
    zeroed_counters,
)

LOG2E = math.log2(math.e)
DECODE_SPLIT_SIZE = 256  # tokens per decode split (fixed: results never depend on the batch)


def _gather_kv(
    kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of `layer` for each sequence: [B, max_seq_len, Hkv, D] (tail beyond a sequence's
    length is whatever its padded blocks hold; callers mask it)."""
    block_size = kv_cache.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    kv = kv_cache[tables, layer]  # [B, nb, 2, bs, Hkv, D]
    B, nb, _, bs, H, D = kv.shape
    k = kv[:, :, 0].reshape(B, nb * bs, H, D)[:, :max_seq_len]
    v = kv[:, :, 1].reshape(B, nb * bs, H, D)[:, :max_seq_len]
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], mask [B, Sq, Sk] (True = attend) -> [B, Sq, Hq, D]."""
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv  # GQA: query heads [h * group, (h + 1) * group) read KV head h
    qg = q.view(B, Sq, Hkv, group, D).permute(0, 2, 3, 1, 4).float()  # [B, Hkv, G, Sq, D]
    kt = k.permute(0, 2, 3, 1).float().unsqueeze(2)  # [B, Hkv, 1, D, Sk]
    scores = torch.matmul(qg, kt) * scale  # [B, Hkv, G, Sq, Sk], fp32
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).float().unsqueeze(2))  # [B, Hkv, G, Sq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, Sq, Hq, D).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    max_query_len: int, max_seq_len: int,
) -> torch.Tensor:
    """Causal attention for a batch of variable-length chunks.

    q [T, Hq, D]: the chunks' queries packed back to back; sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1] and has seq_lens[b] tokens in the cache in all
    (its prior context plus this chunk). Query i of sequence b sits at position
    seq_lens[b] - q_len[b] + i and attends to cache positions <= that. Returns [T, Hq, D].
    """
    B = seq_lens.shape[0]
    T = q.shape[0]
    device = q.device
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    ctx_lens = seq_lens - q_lens
    seq_of_token = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=T)
    row_of_token = torch.arange(T, device=device) - query_start_loc[seq_of_token]
    q_pad = q.new_zeros(B, max_query_len, q.shape[1], q.shape[2])
    q_pad[seq_of_token, row_of_token] = q
    k, v = _gather_kv(kv_cache, layer, block_tables, max_seq_len)
    rows = torch.arange(max_query_len, device=device)
    cols = torch.arange(max_seq_len, device=device)
    mask = (cols[None, None, :] <= (ctx_lens[:, None, None] + rows[None, :, None])) & (
        cols[None, None, :] < seq_lens[:, None, None]
    )
    out = _attend(q_pad, k, v, mask, scale)
    return out[seq_of_token, row_of_token]


def decode_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int,
) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] attends to the seq_lens[b] cached tokens of its
    sequence (its own K/V included). Returns [B, Hq, D]."""
    k, v = _gather_kv(kv_cache, layer, block_tables, max_seq_len)
    cols = torch.arange(max_seq_len, device=q.device)
    mask = (cols[None, :] < seq_lens[:, None])[:, None, :]  # [B, 1, Sk]
    return _attend(q.unsqueeze(1), k, v, mask, scale).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Triton launchers


def _check_attention_inputs(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> tuple[int, int]:
    """Shared checks; returns (GQA group size, block_size)."""
    check_device(q, kv_cache, block_tables, seq_lens)
    if q.dim() != 3 or kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(f"q must be 3-d and kv_cache [NB, L, 2, bs, Hkv, D]; got {tuple(q.shape)} "
                         f"and {tuple(kv_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    if kv_cache.shape[5] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q heads/head_dim {num_heads}/{head_dim} do not fit the cache's "
                         f"{num_kv_heads}/{kv_cache.shape[5]}")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q ({q.dtype}) and kv_cache ({kv_cache.dtype}) must share one float dtype")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range for {kv_cache.shape[1]} layers")
    check_power_of_two("head_dim", head_dim)
    check_power_of_two("block_size", block_size)
    check_index("block_tables", block_tables, 2)
    check_index("seq_lens", seq_lens, 1)
    if block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("block_tables and seq_lens disagree on the batch size")
    return num_heads // num_kv_heads, block_size


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 promises exactness: full-precision FMA dots, never tf32; 16-bit inputs ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _prefill_config(head_dim: int, dtype: torch.dtype,
                    max_seq_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), fixed by shape (no autotuning; measured on
    an H200 with bench/kernel_speed.py --tune, BENCHMARKS.md)."""
    if interpreting():
        return 32, 32, 4, 1  # fewer, larger tiles: the interpreter pays per op, not per flop
    if dtype == torch.float32:  # ieee fp32 dots run on CUDA cores: registers bound the tile
        return (64, 32, 8, 2) if head_dim <= 64 else (32, 16, 8, 2)
    if head_dim <= 128:
        # wgmma tiles, 3-stage cp.async pipeline over K/V; 128-key tiles pay off once the
        # loops are long (+14% at 4k keys, +24% at 16k), 64-key tiles keep short ones cheap
        return (128, 128, 8, 3) if max_seq_len >= 4096 else (128, 64, 8, 3)
    return 64, 32, 8, 2


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel, fixed by shape (never by the
    batch: the tile and the warps' layout fix the order of the sums, so a sequence's result
    would change with them)."""
    if interpreting():
        return 32, 4, 1
    if dtype == torch.float32:
        return 32, 8, 2
    # K/V-bandwidth bound: 128-token tiles, 2-stage cp.async pipeline (bench/
    # decode_attention_sweep.py on an H100, BENCHMARKS.md session 7)
    return (128, 4, 2) if head_dim <= 128 else (32, 4, 2)


def _programs_per_head(rows: int, max_splits: int, device: torch.device) -> int:
    """Programs that share one (sequence, KV head)'s splits: one once the batch's `rows`
    (sequences x KV heads) give most SMs (7/8) a program (it then folds its splits in
    registers: on an H100 at batch 32, 91% of the copy rate against 81% with two programs per
    head, BENCHMARKS.md session 16; at batch 16, 128 rows on 132 SMs, 30.1 µs a call against
    32.0 with three, session 17), else enough for about two programs per SM (batch 8, 64
    rows: 18.7 µs with five against 25.6 with one). Any value gives the same bits (the
    kernel's docstring)."""
    if device.type != "cuda":
        return min(max_splits, 4)  # the interpreter: a few, so the tests share splits
    sms = sm_count(device)
    if 8 * rows >= 7 * sms:
        return 1
    return max(1, min(max_splits, -(-2 * sms // rows)))


def prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    max_query_len: int, max_seq_len: int, *, block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton `prefill_attention_ref` (same contract). block_m/block_n override the tile
    (powers of two >= 16; tests use them to put tiles across and inside cache blocks)."""
    group, block_size = _check_attention_inputs(q, kv_cache, layer, block_tables, seq_lens)
    check_device(q, query_start_loc)
    check_index("query_start_loc", query_start_loc, 1)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("query_start_loc must hold B + 1 offsets")
    T, num_heads, head_dim = q.shape
    bm, bn, num_warps, num_stages = _prefill_config(head_dim, q.dtype, max_seq_len)
    bm, bn = block_m or bm, block_n or bn
    check_power_of_two("block_m", bm)
    check_power_of_two("block_n", bn)
    out = torch.empty((T, num_heads, head_dim), dtype=q.dtype, device=q.device)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    kv = kv_cache[:, layer]  # [NB, 2, bs, Hkv, D], a view: only the base pointer moves
    num_m_blocks = triton.cdiv(max_query_len, bm)
    # head on axis 0: a GQA group's programs run side by side and share K/V tiles in L2
    grid = (num_heads, B, num_m_blocks)
    _prefill_attention_kernel[grid](
        q, kv, out, block_tables, query_start_loc, seq_lens, scale * LOG2E,
        *q.stride(), *kv.stride(), *out.stride(), *block_tables.stride(), num_m_blocks,
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int, *,
    split_size: int = DECODE_SPLIT_SIZE, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    programs_per_head: int | None = None, rotary: tuple | None = None,
) -> torch.Tensor:
    """Triton `decode_attention_ref` (same contract). Contexts are cut into fixed splits of
    `split_size` tokens (a multiple of the tile, block_n), merged in split order in the same
    kernel. split_size, block_n, num_warps and num_stages override the defaults (tests and
    bench/decode_attention_sweep.py use them; a caller must not vary them with the batch);
    programs_per_head overrides the launch's spread of each sequence's splits over programs
    (the default follows the batch size; it never changes a result). `rotary` = (k, v,
    positions, cos_cache, sin_cache, slot_mapping): q and the step's k are unrotated, and the
    kernel does `rotary_write_kv`'s work first (`rotary_decode_attention`)."""
    group, block_size = _check_attention_inputs(q, kv_cache, layer, block_tables, seq_lens)
    B, num_heads, head_dim = q.shape
    if rotary is not None:
        k, v, positions, cos_cache, sin_cache, slot_mapping = rotary
        check_rotary_kv(q, k, v, positions, cos_cache, sin_cache, kv_cache, layer, slot_mapping)
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
        rot_args = (k, v, positions, slot_mapping, cos_cache, sin_cache)
        rot_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_cache.stride(0))
    else:
        rot_args, rot_strides = (q,) * 6, (0,) * 5
    bn, warps, stages = _decode_config(head_dim, q.dtype)
    bn = block_n or min(bn, split_size)
    check_power_of_two("block_n", bn)
    if split_size % bn:
        raise ValueError(f"split_size {split_size} must be a multiple of the tile ({bn})")
    out = torch.empty((B, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    kv = kv_cache[:, layer]  # [NB, 2, bs, Hkv, D]
    num_kv_heads = num_heads // group
    max_splits = max(triton.cdiv(max_seq_len, split_size), 1)
    per_head = programs_per_head or _programs_per_head(B * num_kv_heads, max_splits, q.device)
    if not 1 <= per_head <= max_splits:
        raise ValueError(f"programs_per_head {per_head} must be in [1, {max_splits}]")
    one = per_head == 1  # each (sequence, KV head) in one program: folds in registers
    # partials, fp32: m/l [B, Hq, S], acc [B, Hq, S, D] (contiguous: the kernel relies on it);
    # one program per head writes none (placeholders keep the signature)
    parts = (B, num_heads, 1 if one else max_splits)
    part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((*parts, head_dim), dtype=torch.float32, device=q.device)
    counters = zeroed_counters("decode_attention", B * num_kv_heads, q.device)
    group_pad = max(16, triton.next_power_of_2(group))  # a dot needs M >= 16
    _decode_attention_kernel[(B, num_kv_heads, per_head)](
        q, kv, out, block_tables, seq_lens, part_m, part_l, part_acc, counters, *rot_args,
        scale * LOG2E,
        *q.stride(), *kv.stride(), *out.stride(), *block_tables.stride(), *part_m.stride(),
        *rot_strides, GROUP=group, GROUP_PAD=group_pad, GROUP_R=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=bn, SPLIT_SIZE=split_size,
        MERGE_STEP=8, DOT_PRECISION=_dot_precision(q.dtype), ONE_PROGRAM=one,
        ROTARY=rotary is not None, num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return out


# Fresh prompts (every sequence from position 0, nothing cached before it) can skip the paged
# kernel: their K/V is the step's own, contiguous in memory, so torch's SDPA can run on it (on
# Hopper its cuDNN kernel). One layer on an H100 (bench/prefill_paths.py, BENCHMARKS.md session
# 17), dense time / paged time: 8 x 1k 2.06, 4 x 2k 1.05, 2 x 4k 0.83, 1 x 8k 0.73, 1 x 16k
# 0.65. So a step takes it when every sequence has 2k tokens or more and one 4k or more
# (at most 16: one SDPA call each).
DENSE_PREFILL_MAX_SEQS = 16
DENSE_PREFILL_MIN_EACH = 2048
DENSE_PREFILL_MIN_LEN = 4096


def dense_prefill_wanted(lens: tuple[int, ...] | None, device: torch.device) -> bool:
    """Whether a prefill step of fresh sequences of `lens` tokens (None: not all fresh)
    takes `dense_prefill_attention` (CUDA only: the CPU path stays the references)."""
    return (lens is not None and device.type == "cuda" and 0 < len(lens) <= DENSE_PREFILL_MAX_SEQS
            and min(lens) >= DENSE_PREFILL_MIN_EACH and max(lens) >= DENSE_PREFILL_MIN_LEN)


def dense_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            lens: tuple[int, ...], scale: float) -> torch.Tensor:
    """Causal attention of fresh sequences packed back to back (`lens` tokens each, on the
    host, every one from position 0) over their own rotated q [T, Hq, D] and k, v [T, Hkv, D]
    (strided views are fine): `prefill_attention`'s result where every context is empty, by
    torch's SDPA one sequence at a time (GQA through enable_gqa). Returns [T, Hq, D]."""
    T, num_heads, head_dim = q.shape
    if sum(lens) != T or k.shape != v.shape or k.shape[0] != T or k.shape[2] != head_dim \
            or num_heads % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"fit sequences of {list(lens)} tokens")
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        # [1, H, n, D], contiguous (cuDNN's kernel wants a dense layout)
        qi, ki, vi = (x[start:start + n].transpose(0, 1).unsqueeze(0).contiguous()
                      for x in (q, k, v))
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                            enable_gqa=num_heads != k.shape[1])
        out[start:start + n] = oi[0].transpose(0, 1)
        start += n
    return out


def rotary_decode_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, max_seq_len: int,
) -> torch.Tensor:
    """A decode step's attention from its unrotated q/k/v: `rotary_write_kv_ref` (rotate q and
    k, write k and v into their slots), then `decode_attention_ref`. Returns [B, Hq, D]."""
    q = rotary_write_kv_ref(q, k, v, positions, cos_cache, sin_cache, kv_cache, layer,
                            slot_mapping)
    return decode_attention_ref(q, kv_cache, layer, block_tables, seq_lens, scale, max_seq_len)


def rotary_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, max_seq_len: int, **kw,
) -> torch.Tensor:
    """Triton `rotary_decode_attention_ref` (same contract), one launch: the decode kernel
    with the rotation and the KV write fused in (its ROTARY mode). kw: decode_attention's
    tile and spread overrides."""
    return decode_attention(q, kv_cache, layer, block_tables, seq_lens, scale, max_seq_len,
                            rotary=(k, v, positions, cos_cache, sin_cache, slot_mapping), **kw)
