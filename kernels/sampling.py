"""Counter-based random draws for the sampler: Philox4x32-10 uniforms and the exponential race.

This module owns the sampler's randomness. Every token's uniform is a pure function of
(request seed, choice_index, output position, token id): key = the seed's 64 bits
(k0 = low word, k1 = high word), counter = (token id, output position, choice_index, 0), and the
uniform comes from output word 0 as ``u = (2 * (x0 >> 9) + 1) * 2**-24`` (in (0, 1), never 0
or 1, exact in fp32). Sampling is then an exponential race: ``argmax_v probs[v] / -log(u[v])``,
which draws v with probability probs[v] (the Gumbel-max trick in another form).

Why counter-based rather than a per-request ``torch.Generator``: a token's draw does not depend
on which other requests share the batch, on how often the request was retried or failed over,
or on the device, so re-submitting a request record reproduces its text; there is no generator
state to carry between steps or processes, and the kernels read only tensors (no host-side RNG
offsets), so they are safe to capture in a CUDA graph.

``name_ref`` is plain torch using only 32-bit-safe integer arithmetic on int64 tensors (32x32
multiplies split into 16-bit limbs), so it runs on any device and is bit-equal to the Triton
kernels ``name``. Only the low 32 bits of choice_index and position take part in the counter.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from pdserve.kernels.triton_utils import sm_count, tl, triton

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key bumps
_MASK32 = 0xFFFFFFFF
# Kernels may read only constexpr globals.
_M0, _M1 = tl.constexpr(PHILOX_M0), tl.constexpr(PHILOX_M1)
_W0, _W1 = tl.constexpr(PHILOX_W0), tl.constexpr(PHILOX_W1)
# int64 intermediates per chunk of the reference: bounds its memory on a 128k vocabulary.
_REF_CHUNK_ELEMS = 1 << 22


# ---------------------------------------------------------------- plain-torch reference


def _mulhilo32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) words of a * b for a in [0, 2^32) (int64 tensor), b a 32-bit constant.

    The 64-bit product would overflow int64, so multiply 16-bit limbs: every intermediate
    stays below 2^34."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    mid = a_hi * b_lo + a_lo * b_hi  # < 2^33
    low = a_lo * b_lo + ((mid & 0xFFFF) << 16)  # < 2^33: bit 32 is the carry into hi
    hi = a_hi * b_hi + (mid >> 16) + (low >> 32)  # < 2^32 since the full product < 2^64
    return hi, low & _MASK32


def _philox_words(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words -> 4 output words."""
    for r in range(10):
        if r:  # the key is bumped between rounds: 9 bumps for 10 rounds
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_ref(counter_words: Tensor, key_words: Tensor) -> Tensor:
    """Philox4x32-10 (Random123): counter int64 [..., 4], key int64 [..., 2] (broadcastable,
    words taken mod 2^32) -> int64 [..., 4], each word in [0, 2^32)."""
    c = counter_words.to(torch.int64) & _MASK32
    k = key_words.to(torch.int64) & _MASK32
    out = _philox_words(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1])
    return torch.stack(torch.broadcast_tensors(*out), dim=-1)


def uniform_from_word(x0: Tensor) -> Tensor:
    """int64 words in [0, 2^32) -> float32 (2 * (x0 >> 9) + 1) * 2^-24: the 23 high bits
    centred in their cell, so u lies in (0, 1) and the conversion is exact."""
    return (2 * (x0 >> 9) + 1).to(torch.float32) * 2.0**-24


def _row_words(seeds: Tensor, choices: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
    """Per-row (k0, k1, c1, c2) as int64 [N, 1]; the seed's two's-complement bits form the key."""
    col = lambda t: t.to(torch.int64).reshape(-1, 1)
    s = col(seeds)
    return s & _MASK32, (s >> 32) & _MASK32, col(positions) & _MASK32, col(choices) & _MASK32


def _uniform_cols(rows: tuple[Tensor, ...], start: int, stop: int) -> Tensor:
    """Uniforms of vocabulary columns [start, stop) for every row -> float32 [N, stop - start]."""
    k0, k1, c1, c2 = rows
    c0 = torch.arange(start, stop, dtype=torch.int64, device=k0.device).reshape(1, -1)
    x0 = _philox_words(c0, c1, c2, torch.zeros_like(c1), k0, k1)[0]
    return uniform_from_word(x0.expand(k0.shape[0], stop - start))


def _chunk_cols(n_rows: int) -> int:
    return max(1024, _REF_CHUNK_ELEMS // max(n_rows, 1))


def philox_uniform_ref(seeds: Tensor, choices: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """seeds, choices, positions int64 [N] -> float32 [N, vocab_size]: u[i, v] from counter
    (v, positions[i], choices[i], 0) under key seeds[i]. Batched (chunked over the vocabulary
    only to bound memory); runs on the inputs' device."""
    _check_rows(seeds, choices, positions)
    rows = _row_words(seeds, choices, positions)
    step = _chunk_cols(seeds.shape[0])
    parts = [_uniform_cols(rows, s, min(s + step, vocab_size)) for s in range(0, vocab_size, step)]
    if not parts:
        return torch.empty(seeds.shape[0], 0, dtype=torch.float32, device=seeds.device)
    return torch.cat(parts, dim=1)


def exponential_race_ref(probs: Tensor, seeds: Tensor, choices: Tensor, positions: Tensor) -> Tensor:
    """probs float32 [N, V] (finite, >= 0, disallowed tokens already 0) -> int64 [N] tokens:
    argmax_v probs[v] / E[v] with E[v] = -log(u[v]); ties go to the smallest index.

    A zero-probability token scores -1, below every allowed token, so it is never drawn while
    the row has any nonzero probability; a row of all zeros yields token 0 (callers should not
    send one). Unnormalised rows are fine: the race only needs relative weights."""
    n, vocab = _check_probs(probs, seeds, choices, positions)
    rows = _row_words(seeds, choices, positions)
    best_val = torch.full((n,), -2.0, dtype=torch.float32, device=probs.device)
    best_idx = torch.zeros(n, dtype=torch.int64, device=probs.device)
    step = _chunk_cols(n)
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        p = probs[:, start:stop]
        q = torch.where(p > 0, p / -torch.log(_uniform_cols(rows, start, stop)), -1.0)
        val, idx = q.max(dim=1)  # first maximal index within the chunk
        better = val > best_val  # strict: an earlier chunk keeps a tie
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


# ---------------------------------------------------------------------- Triton kernels


@triton.jit
def _philox_uniform_tile(offs, seed_ptr, choice_ptr, pos_ptr, row, BLOCK: tl.constexpr):
    """float32 [BLOCK] uniforms of token ids `offs` for one row (same words as the reference)."""
    s = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)  # every word a [BLOCK] tensor through the rounds
    k0 = zero + (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = zero + (s >> 32).to(tl.uint32)
    c0 = offs.to(tl.uint32)
    c1 = zero + tl.load(pos_ptr + row).to(tl.uint64, bitcast=True).to(tl.uint32)
    c2 = zero + tl.load(choice_ptr + row).to(tl.uint64, bitcast=True).to(tl.uint32)
    c3 = zero
    # Constants above 2^31 stay explicitly uint32 so no signed promotion sneaks in.
    m0 = tl.full([BLOCK], _M0, tl.uint32)
    m1 = tl.full([BLOCK], _M1, tl.uint32)
    w0 = tl.full([BLOCK], _W0, tl.uint32)
    w1 = tl.full([BLOCK], _W1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0  # uint32 wraps mod 2^32
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    # < 2^24, so the int32 and fp32 conversions are exact; 2^-24 is exact too.
    return ((c0 >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _philox_uniform_kernel(seed_ptr, choice_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = _philox_uniform_tile(offs, seed_ptr, choice_ptr, pos_ptr, row, BLOCK)
    tl.store(out_ptr + row.to(tl.int64) * V + offs, u, mask=offs < V)


@triton.jit
def _exponential_race_kernel(
    probs_ptr, stride_row, seed_ptr, choice_ptr, pos_ptr, val_ptr, idx_ptr, V, SPAN,
    BLOCK: tl.constexpr,
):
    """Program (row, split) races tokens [split * SPAN, (split + 1) * SPAN) of its row and
    writes its winner's (score, index) to the [N, splits] partials."""
    row, split = tl.program_id(0), tl.program_id(1)
    base = probs_ptr + row.to(tl.int64) * stride_row
    # Per-lane running best; lanes see increasing indices, so strict '>' keeps the first.
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(split * SPAN, tl.minimum(split * SPAN + SPAN, V), BLOCK):
        offs = start + tl.arange(0, BLOCK)  # SPAN is a multiple of BLOCK: only V cuts a tile
        mask = offs < V
        p = tl.load(base + offs, mask=mask, other=0.0)
        u = _philox_uniform_tile(offs, seed_ptr, choice_ptr, pos_ptr, row, BLOCK)
        # div_rn: IEEE division like torch's (a plain fp32 '/' compiles to an approximate one).
        q = tl.where(p > 0.0, tl.math.div_rn(p, -tl.log(u)), -1.0)
        q = tl.where(mask, q, float("-inf"))
        better = q > best_val
        best_val = tl.where(better, q, best_val)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best_val, axis=0)
    token = tl.min(tl.where(best_val == top, best_idx, V), axis=0)
    slot = row * tl.num_programs(1) + split
    tl.store(val_ptr + slot, top)
    tl.store(idx_ptr + slot, token.to(tl.int64))


@triton.jit
def _race_reduce_kernel(val_ptr, idx_ptr, out_ptr, SPLITS, BLOCK: tl.constexpr):
    """Per row: the best of its splits' winners, ties to the smallest index."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < SPLITS
    val = tl.load(val_ptr + row * SPLITS + offs, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * SPLITS + offs, mask=mask, other=0)
    top = tl.max(val, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(mask & (val == top), idx, 2**62), axis=0))


# --------------------------------------------------------------------------- launchers


def _check_rows(seeds: Tensor, choices: Tensor, positions: Tensor) -> int:
    for name, t in (("seeds", seeds), ("choices", choices), ("positions", positions)):
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name} must be int64 [N], got {t.dtype} {tuple(t.shape)}")
    if not seeds.shape == choices.shape == positions.shape:
        raise ValueError(f"seeds/choices/positions shapes differ: {seeds.shape}, "
                         f"{choices.shape}, {positions.shape}")
    if not seeds.device == choices.device == positions.device:
        raise ValueError("seeds, choices and positions must share one device")
    return seeds.shape[0]


def _check_probs(probs: Tensor, seeds: Tensor, choices: Tensor, positions: Tensor) -> tuple[int, int]:
    n = _check_rows(seeds, choices, positions)
    if probs.dtype != torch.float32 or probs.dim() != 2 or probs.shape[0] != n or probs.shape[1] < 1:
        raise ValueError(f"probs must be float32 [N={n}, V>=1], got {probs.dtype} {tuple(probs.shape)}")
    if probs.device != seeds.device:
        raise ValueError("probs and seeds must share one device")
    return n, probs.shape[1]


def _check_triton_device(t: Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("Triton sampling kernels need CUDA tensors (or TRITON_INTERPRET=1); "
                         "use the *_ref functions on the CPU")


def philox_uniform(seeds: Tensor, choices: Tensor, positions: Tensor, vocab_size: int,
                   block: int = 1024) -> Tensor:
    """Triton: same contract as philox_uniform_ref (float32 [N, vocab_size], bit-equal)."""
    n = _check_rows(seeds, choices, positions)
    _check_triton_device(seeds)
    out = torch.empty(n, vocab_size, dtype=torch.float32, device=seeds.device)
    if n and vocab_size:
        grid = (n, triton.cdiv(vocab_size, block))
        _philox_uniform_kernel[grid](seeds.contiguous(), choices.contiguous(), positions.contiguous(),
                                     out, vocab_size, BLOCK=block)
    return out


def exponential_race(probs: Tensor, seeds: Tensor, choices: Tensor, positions: Tensor,
                     block: int = 1024, num_warps: int = 32, splits: int | None = None) -> Tensor:
    """Triton, fused: same contract as exponential_race_ref (int64 [N]), without materialising
    the [N, V] uniforms. Philox makes the race compute-bound, so a row is split over up to
    `splits` programs (default: enough to fill the GPU twice) and a second launch reduces
    their [N, splits] winners."""
    n, vocab = _check_probs(probs, seeds, choices, positions)
    _check_triton_device(probs)
    if probs.stride(1) != 1:
        probs = probs.contiguous()  # rows may be strided; tokens within a row must not be
    out = torch.empty(n, dtype=torch.int64, device=probs.device)
    if not n:
        return out
    tiles = triton.cdiv(vocab, block)
    if splits is None:
        splits = triton.cdiv(2 * sm_count(probs.device), n)
    span_tiles = triton.cdiv(tiles, max(1, min(splits, tiles)))
    splits = triton.cdiv(tiles, span_tiles)  # no empty split
    val = torch.empty(n, splits, dtype=torch.float32, device=probs.device)
    idx = torch.empty(n, splits, dtype=torch.int64, device=probs.device)
    _exponential_race_kernel[(n, splits)](
        probs, probs.stride(0), seeds.contiguous(), choices.contiguous(), positions.contiguous(),
        val, idx, vocab, span_tiles * block, BLOCK=block, num_warps=num_warps)
    _race_reduce_kernel[(n,)](val, idx, out, splits, BLOCK=max(16, triton.next_power_of_2(splits)))
    return out
