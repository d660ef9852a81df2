"""Triton kernels of paged attention; their launchers and references live in `attention.py`.

Both kernels read one layer's K/V straight out of the block-major pool through the block
table, a tile of BLOCK_N tokens at a time. A tile may span several cache blocks
(BLOCK_N > block_size) or part of one: each token's row is found as
`block_tables[b, n // BLOCK_SIZE] * stride_cb + (n % BLOCK_SIZE) * stride_cs` (BLOCK_SIZE is a
power-of-two constexpr, so that is a shift and a mask). A token's head_dim row is contiguous,
so the loads are 16-byte vectors and the software pipeliner overlaps them with the dots.

Softmax is online (flash-attention style) in fp32, in log2 units: scores are scaled by
`scale * log2(e)` once, and exp2 replaces exp.

- `_prefill_attention_kernel`: one program = BLOCK_M queries of one sequence for ONE query
  head. Prefill is bound by tensor-core math, not bytes: a program per query head keeps the
  dot's M at BLOCK_M tokens (packing a GQA group would not cut the flops), and the group's
  programs run next to each other (head is grid axis 0), so each K/V tile is fetched from
  memory once and read by the group out of L2. Keys below the tile's first query position
  are visible to all its rows and run without masks; only the diagonal tiles are masked.
- `_decode_attention_kernel`: decode is bound by K/V bytes. A sequence's context is cut into
  fixed splits of SPLIT_SIZE tokens; each split's partial (max, sum, acc) over the KV head's
  query group (the group's queries are the rows of one dot, padded to 16, so each K/V byte is
  read once for the group) is folded into a running (max, sum, acc) in split order by one
  code path (`_fold_split`). How many programs share a sequence's splits (grid axis 2, each a
  contiguous run of splits in one software-pipelined loop) is the launcher's choice by batch
  size, many at batch 1 (parallelism over the context) and one at large batches:
  - one program (ONE_PROGRAM): it folds each split as the split ends, in registers, and
    writes the output; nothing goes to memory but the output, so small splits cost large
    batches nothing but the fold's few FLOPs;
  - several: each split's partial goes to memory, and the program that finishes last for a
    (sequence, KV head) (an acq_rel atomic counter, zeroed again after) folds them all in
    split order (`_merge_splits`): no second kernel.
  Both fold the same fp32 values in the same order with the same code (explicit FMAs, so the
  compiler cannot contract them differently), so a sequence's result depends on the split
  size (fixed) alone, never on its batch or on the launch's spread.
  With ROTARY the kernel also does kernels/rotary_kv.py's work for the step's token (one
  launch a layer fewer): every program rotates its group's query heads in registers, and
  the program holding the last split rotates the token's key head and writes it and its
  value head into the token's cache slot before its first tile load (a barrier orders them).
"""

from __future__ import annotations

from pdserve.kernels.triton_utils import tl, triton


@triton.jit
def _kv_offsets(bt_ptr, stride_btn, offs_n, stride_cb, stride_cs, mask_n,
                BLOCK_SIZE: tl.constexpr):
    """Element offsets [BLOCK_N] (int64) of tokens offs_n in one layer's K (or V) plane."""
    if mask_n is None:
        blk = tl.load(bt_ptr + (offs_n // BLOCK_SIZE) * stride_btn)
    else:
        blk = tl.load(bt_ptr + (offs_n // BLOCK_SIZE) * stride_btn, mask=mask_n, other=0)
    # int64: block * stride_cb passes 2^31 elements in pools of a few GiB
    return blk.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, qk_scale, mask_n, keep,
                         DOT_PRECISION: tl.constexpr):
    """One K/V tile: scores, running max/sum update, acc += p @ v. k_ptrs/v_ptrs [BLOCK_N,
    HEAD_DIM]; keep [M, BLOCK_N] (or None) marks the scores that take part."""
    if mask_n is None:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N] fp32
    if keep is not None:
        qk = tl.where(keep, qk, float("-inf"))
    # running max in log2 units; every row has a finite score by its first tile, so m_new is
    # finite and no NaN appears. The scale folds into the exponent's FMA (one pass, not two).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if mask_n is None:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    acc = acc * alpha[:, None]
    # fp16/bf16: p rounds to the input dtype so the dot runs on tensor cores; fp32 stays fp32
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_attention_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,  # kv_ptr: the layer's [NB, 2, bs, Hkv, D]
    stride_ot, stride_oh, stride_od,
    stride_btb, stride_btn,
    num_m_blocks,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    hq = tl.program_id(0)
    b = tl.program_id(1)
    # largest query blocks (most keys) first: the long programs start early, short ones fill in
    pid_m = num_m_blocks - 1 - tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # prior context: query i sits at position ctx_len + i

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    pos = ctx_len + offs_m

    k_base = kv_ptr + (hq // GROUP) * stride_ch + offs_d[None, :] * stride_cd
    v_base = k_base + stride_ckv
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # keys < lo_full are visible to every row: whole tiles of them run unmasked
    lo_full = ctx_len + pid_m * BLOCK_M
    num_full = lo_full // BLOCK_N
    for t in range(0, num_full):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_off = _kv_offsets(bt_row, stride_btn, offs_n, stride_cb, stride_cs, None, BLOCK_SIZE)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k_base + kv_off[:, None],
                                             v_base + kv_off[:, None], qk_scale, None, None,
                                             DOT_PRECISION)
    # diagonal tiles: causal mask, and keys past the tile's last query (or the sequence) out
    hi = tl.minimum(ctx_len + (pid_m + 1) * BLOCK_M, seq_len)
    for t in range(num_full, tl.cdiv(hi, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        kv_off = _kv_offsets(bt_row, stride_btn, offs_n, stride_cb, stride_cs, mask_n, BLOCK_SIZE)
        keep = (offs_n[None, :] <= pos[:, None]) & mask_n[None, :]
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k_base + kv_off[:, None],
                                             v_base + kv_off[:, None], qk_scale, mask_n, keep,
                                             DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _fold_split(m_run, l_run, acc_run, m_s, l_s, acc_s):
    """Fold one split's partial (m_s, l_s, acc_s) into the running one, in log2 units:
    m = max(m_run, m_s); l = l_run * 2^(m_run - m) + l_s * 2^(m_s - m); acc likewise. The
    first fold (m_run = -inf, l_run = 0, acc_run = 0) gives the split's own values exactly;
    a split past the context (m_s = -inf, l_s = 0, acc_s = 0) leaves the running one as it
    is. Every caller goes through here with fp32 values, so the bits agree wherever the fold
    runs (registers or after a round trip through memory)."""
    m_new = tl.maximum(m_run, m_s)
    alpha = tl.exp2(m_run - m_new)
    w = tl.exp2(m_s - m_new)
    l_run = tl.fma(l_run, alpha, w * l_s)
    acc_run = tl.fma(acc_run, alpha[:, None], w[:, None] * acc_s)
    return m_new, l_run, acc_run


@triton.jit
def _decode_attention_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, seq_lens_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, cnt_ptr,
    k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,  # ROTARY: the step's own k, v, rope
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
    stride_ob, stride_oh, stride_od,
    stride_btb, stride_btn,
    stride_pb, stride_ph, stride_ps,  # partial m/l [B, Hq, S]; acc [B, Hq, S, HEAD_DIM] adds D
    stride_kb, stride_kh, stride_vb, stride_vh, stride_cp,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_SIZE: tl.constexpr, MERGE_STEP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ONE_PROGRAM: tl.constexpr,  # one program per (sequence, KV head): fold in registers
    ROTARY: tl.constexpr,  # q and the step's k unrotated: rotate both, write k and v first
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    p = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_splits = tl.cdiv(seq_len, SPLIT_SIZE)
    # this program's splits: a contiguous run of `per_prog` (the launch's programs per head,
    # grid axis 2, only decides who computes which split, never a split's value)
    per_prog = tl.cdiv(num_splits, tl.num_programs(2))
    first = p * per_prog
    if first >= num_splits:
        return  # no split left for this program (it never counts itself)
    start = first * SPLIT_SIZE
    end = tl.minimum(start + per_prog * SPLIT_SIZE, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)  # rows = the group's query heads, padded to a dot's 16
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask_g[:, None],
                other=0.0)  # [GROUP_PAD, HEAD_DIM]
    if ROTARY:
        # rotate-half in place of kernels/rotary.py's kernel, with the same fp32 products:
        # element d pairs with d +- HALF; cos/sin rows of this token's position
        pair = (offs_d + HEAD_DIM // 2) % HEAD_DIM
        pos = tl.load(pos_ptr + b).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cp + offs_d % (HEAD_DIM // 2))
        sin = tl.load(sin_ptr + pos * stride_cp + offs_d % (HEAD_DIM // 2))
        sin = tl.where(offs_d < HEAD_DIM // 2, -sin, sin)  # x1 cos - x2 sin | x2 cos + x1 sin
        q_pair = tl.load(q_rows + pair[None, :] * stride_qd, mask=mask_g[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :]
             + q_pair.to(tl.float32) * sin[None, :]).to(q_ptr.dtype.element_ty)
        if end == seq_len:  # the program holding the last split writes the step's K/V first
            slot = tl.load(slot_ptr + b).to(tl.int64)
            if slot >= 0:
                k_row = k_ptr + b.to(tl.int64) * stride_kb + hkv * stride_kh
                k_new = (tl.load(k_row + offs_d).to(tl.float32) * cos
                         + tl.load(k_row + pair).to(tl.float32) * sin)
                dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
                       + hkv * stride_ch + offs_d * stride_cd)
                tl.store(dst, k_new.to(kv_ptr.dtype.element_ty))
                v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vb + hkv * stride_vh + offs_d)
                tl.store(dst + stride_ckv, v_new.to(kv_ptr.dtype.element_ty))
            tl.debug_barrier()  # the stores are visible to this program's tile loads below

    k_base = kv_ptr + hkv * stride_ch + offs_d[None, :] * stride_cd
    v_base = k_base + stride_ckv
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    part_row = b.to(tl.int64) * stride_pb + heads * stride_ph  # [GROUP_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_run = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # ONE_PROGRAM's fold
    l_run = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc_run = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        kv_off = _kv_offsets(bt_row, stride_btn, offs_n, stride_cb, stride_cs, mask_n, BLOCK_SIZE)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k_base + kv_off[:, None],
                                             v_base + kv_off[:, None], qk_scale, mask_n,
                                             mask_n[None, :], DOT_PRECISION)
        # a split's last tile: fold its partial in (one program) or write it (several), then
        # start the next split afresh (selects and masked stores, no branch: the loop stays
        # one software-pipelined loop)
        split_end = ((n0 + BLOCK_N) % SPLIT_SIZE == 0) | (n0 + BLOCK_N >= end)
        if ONE_PROGRAM:
            m_f, l_f, acc_f = _fold_split(m_run, l_run, acc_run, m_i, l_i, acc)
            m_run = tl.where(split_end, m_f, m_run)
            l_run = tl.where(split_end, l_f, l_run)
            acc_run = tl.where(split_end, acc_f, acc_run)
        else:
            part = part_row + (n0 // SPLIT_SIZE) * stride_ps
            keep = mask_g & split_end
            tl.store(part_m_ptr + part, m_i, mask=keep)
            tl.store(part_l_ptr + part, l_i, mask=keep)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=keep[:, None])
        m_i = tl.where(split_end, float("-inf"), m_i)
        l_i = tl.where(split_end, 0.0, l_i)
        acc = tl.where(split_end, 0.0, acc)

    if ONE_PROGRAM:
        l_run = tl.where(mask_g, l_run, 1.0)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh
                 + offs_d[None, :] * stride_od,
                 (acc_run / l_run[:, None]).to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
    else:
        # every thread's partials are written before the one (scalar) atomic releases them;
        # the program that counts last acquires the others' and folds all splits in order
        tl.debug_barrier()
        cnt = cnt_ptr + b * tl.num_programs(1) + hkv  # [B, Hkv]: Hkv programs on axis 1
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == tl.cdiv(num_splits, per_prog) - 1:
            _merge_splits(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, b, hkv, num_splits,
                          stride_ob, stride_oh, stride_od, stride_pb, stride_ph, stride_ps,
                          GROUP, GROUP_R, HEAD_DIM, MERGE_STEP)
            tl.store(cnt, 0)  # zero again for the next launch (no other program touches it)


@triton.jit
def _merge_splits(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, b, hkv, num_splits,
                  stride_ob, stride_oh, stride_od, stride_pb, stride_ph, stride_ps,
                  GROUP: tl.constexpr, GROUP_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MERGE_STEP: tl.constexpr):
    """Fold the `num_splits` partials of one (sequence, KV head)'s query heads in split order
    with `_fold_split`, as ONE_PROGRAM folds them in registers: out = acc / l. MERGE_STEP
    splits per round, unrolled (their loads do not wait on the folds before them); splits past
    num_splits load as (-inf, 0, 0), which the fold leaves out exactly. The partials are read
    past L1 (.cg): other programs wrote them in this launch."""
    offs_g = tl.arange(0, GROUP_R)
    mask_g = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * stride_pb + heads * stride_ph  # [GROUP_R]
    m_run = tl.full([GROUP_R], float("-inf"), tl.float32)
    l_run = tl.zeros([GROUP_R], dtype=tl.float32)
    acc = tl.zeros([GROUP_R, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_STEP):
        for j in tl.static_range(MERGE_STEP):
            mask = mask_g & (offs_g * 0 + (s0 + j) < num_splits)  # [GROUP_R]
            part = base + (s0 + j) * stride_ps
            m_s = tl.load(part_m_ptr + part, mask=mask, other=float("-inf"),
                          cache_modifier=".cg")
            m_s = tl.where(mask_g, m_s, 0.0)  # padding rows: finite, never stored
            l_s = tl.load(part_l_ptr + part, mask=mask, other=0.0, cache_modifier=".cg")
            acc_s = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                            mask=mask[:, None], other=0.0, cache_modifier=".cg")
            m_run, l_run, acc = _fold_split(m_run, l_run, acc, m_s, l_s, acc_s)
    l_run = tl.where(mask_g, l_run, 1.0)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             (acc / l_run[:, None]).to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
