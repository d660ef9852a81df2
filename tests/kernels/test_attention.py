"""Paged prefill and decode attention: Triton kernels against the torch references.

CPU cases run under the Triton interpreter in fp32 and fp16 with small shapes that would also
compile (head_dim >= 16, dots >= 16x16x16); gpu cases run compiled, in bf16 against an fp32
reference of the same bf16 inputs, in fp32 with ieee dots, and at Llama-3-8B shapes.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import triton_utils
from pdserve.kernels.attention import (
    _programs_per_head,
    decode_attention,
    decode_attention_ref,
    dense_prefill_attention,
    prefill_attention,
    prefill_attention_ref,
    rotary_decode_attention,
    rotary_decode_attention_ref,
)
from pdserve.kernels.rotary_kv import rotary_write_kv
from pdserve.kernels.triton_utils import zeroed_counters
from tests.kernels.paged import make_paged_batch, poisoned_outputs, rel_err, seed_for

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
INTERP_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 dot is wrong

# (head_dim, q heads, kv heads, block_size, q_lens, prior context lens, block_m, block_n):
# GQA groups 1/4/8; chunks ending on and just past block boundaries; empty and long context;
# tiles across several blocks (block_n > block_size) and inside one (block_n < block_size)
PREFILL_CASES = [
    (16, 4, 4, 16, [16, 17, 1], [0, 0, 5], None, None),
    (32, 8, 2, 16, [32, 33, 7], [0, 16, 200], None, None),
    (64, 8, 1, 32, [31, 32, 65], [0, 1, 40], 16, 64),
    (32, 4, 1, 32, [5, 40], [300, 0], 16, 16),
    (16, 8, 2, 16, [100], [400], 32, 64),
    (64, 8, 2, 16, [48, 1, 1], [64, 15, 16], None, None),  # prefill chunk beside decode tokens
]

# (head_dim, q heads, kv heads, block_size, seq_lens, split_size, block_n): one split (direct
# write) and split-K with a small split size, splits ending on and past tile/block boundaries
DECODE_CASES = [
    (16, 4, 4, 16, [1, 16, 17, 33], 512, None),
    (32, 8, 2, 16, [1, 63, 64, 65, 200], 64, 32),
    (64, 8, 1, 32, [500, 33, 32], 64, 16),
    (32, 16, 2, 32, [512, 1], 32, 32),
    (64, 8, 2, 16, [96, 97, 160], 32, 16),
]


def check_prefill(batch, dtype, tol, **tiles):
    args = (batch.kv_cache, batch.layer, batch.block_tables, batch.query_start_loc,
            batch.seq_lens, 0.37, batch.max_query_len, batch.max_seq_len)
    with poisoned_outputs():
        out = prefill_attention(batch.q, *args, **tiles)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert not out.isnan().any(), "unwritten output elements"
    ref = prefill_attention_ref(batch.q.float(), batch.kv_cache.float(), *args[1:])
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def check_decode(batch, dtype, tol, **kw):
    args = (batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens, 0.29,
            batch.max_seq_len)
    with poisoned_outputs():
        out = decode_attention(batch.q, *args, **kw)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert not out.isnan().any(), "unwritten output elements"
    ref = decode_attention_ref(batch.q.float(), batch.kv_cache.float(), *args[1:])
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"d{c[0]}-g{c[1] // c[2]}-bs{c[3]}")
def test_prefill_attention(case, dtype, request):
    head_dim, hq, hkv, bs, q_lens, ctx_lens, bm, bn = case
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    batch = make_paged_batch(q_lens, ctx_lens, hq, hkv, head_dim, bs, dtype, "cpu", gen)
    check_prefill(batch, dtype, TOL[dtype], block_m=bm, block_n=bn)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"d{c[0]}-g{c[1] // c[2]}-split{c[5]}")
def test_decode_attention(case, dtype, request):
    head_dim, hq, hkv, bs, seq_lens, split, bn = case
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    batch = make_paged_batch([1] * len(seq_lens), [s - 1 for s in seq_lens], hq, hkv, head_dim,
                             bs, dtype, "cpu", gen)
    check_decode(batch, dtype, TOL[dtype], split_size=split, block_n=bn)
    # the kernel leaves its counters zero
    assert not zeroed_counters("decode_attention", 1, batch.q.device).any()


def check_batch_independence(device: str, dtype: torch.dtype, head_dim: int, hq: int, hkv: int,
                             lens: list[int], gen: torch.Generator, spreads: list[int],
                             **kw) -> None:
    """Each sequence's output is the same bits alone (its own max_seq_len) as inside the
    batch, as in a launch sized for 8192 tokens (the engine's CUDA graphs), and whatever
    number of programs shares its splits; the kernel leaves its counters zero."""
    batch = make_paged_batch([1] * len(lens), [n - 1 for n in lens], hq, hkv, head_dim, 16,
                             dtype, device, gen)
    args = (batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens, 0.29)
    together = decode_attention(batch.q, *args, batch.max_seq_len, **kw)
    check_decode(batch, dtype, TOL[dtype], **kw)
    assert torch.equal(decode_attention(batch.q, *args, 8192, **kw), together)
    for per_head in spreads:
        spread = decode_attention(batch.q, *args, 8192, programs_per_head=per_head, **kw)
        assert torch.equal(spread, together), f"{per_head} programs per head"
    for i, n in enumerate(lens):
        alone = decode_attention(batch.q[i:i + 1], batch.kv_cache, batch.layer,
                                 batch.block_tables[i:i + 1], batch.seq_lens[i:i + 1], 0.29, n,
                                 **kw)
        assert torch.equal(alone[0], together[i]), f"sequence {i} ({n} tokens)"
    assert not zeroed_counters("decode_attention", 1, batch.q.device).any()


def test_decode_result_does_not_depend_on_the_batch(request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    check_batch_independence("cpu", torch.float16, 32, 8, 2, [40, 1, 64, 65, 300], gen,
                             [1, 2, 3, 7, 128], split_size=64, block_n=32)


def test_int32_indices_and_strided_q(request):
    """int32 metadata and a q that is a strided view (as the model's fused qkv split gives)."""
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    batch = make_paged_batch([20, 3], [10, 40], 4, 2, 16, 16, torch.float32, "cpu", gen,
                             index_dtype=torch.int32)
    wide = torch.randn(batch.q.shape[0], 4 + 2 * 2, 16, generator=gen)
    wide[:, :4] = batch.q
    batch.q = wide[:, :4]  # non-contiguous view
    check_prefill(batch, torch.float32, TOL[torch.float32])
    dec = make_paged_batch([1, 1], [70, 9], 4, 2, 16, 16, torch.float32, "cpu", gen,
                           index_dtype=torch.int32)
    check_decode(dec, torch.float32, TOL[torch.float32], split_size=32)


def test_launchers_refuse_bad_shapes():
    q = torch.randn(4, 6, 16)
    cache = torch.randn(4, 1, 2, 16, 4, 16)  # 6 q heads do not group over 4 kv heads
    tables = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="heads"):
        decode_attention(q[:1], cache, 0, tables, torch.tensor([4]), 1.0, 4)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(torch.randn(1, 4, 16).half(), cache, 0, tables, torch.tensor([4]), 1.0, 4)
    with pytest.raises(ValueError, match="block_size"):
        decode_attention(torch.randn(1, 4, 16), torch.randn(4, 1, 2, 24, 4, 16), 0, tables,
                         torch.tensor([4]), 1.0, 4)



def test_spread_is_one_program_per_head_once_the_rows_fill_the_sms(monkeypatch):
    """The launcher's choice on a GPU (no GPU needed: the SM count is looked up once per
    device): one program per (sequence, KV head) as soon as the batch's rows give 7/8 of the
    SMs one (its splits fold in registers), about two programs per SM below that, never more
    than the splits. On the interpreter a few, so the tests exercise shared heads."""
    gpu = torch.device("cuda", 7)
    monkeypatch.setitem(triton_utils._SM_COUNTS, gpu.index, 132)
    assert _programs_per_head(8, 32, gpu) == 32  # capped by the 32 splits
    assert _programs_per_head(8, 64, gpu) == 33  # batch 1 at 8 KV heads: ceil(264 / 8)
    assert _programs_per_head(64, 32, gpu) == 5  # batch 8: ceil(264 / 64)
    assert _programs_per_head(115, 32, gpu) == 3  # under 7/8 of the SMs
    assert _programs_per_head(116, 32, gpu) == 1  # 7/8 of 132 SMs: one program per head
    assert _programs_per_head(128, 32, gpu) == 1  # batch 16
    assert _programs_per_head(132, 32, gpu) == 1  # the rows fill the SMs
    assert _programs_per_head(256, 32, gpu) == 1  # batch 32
    assert _programs_per_head(2048, 32, gpu) == 1  # batch 256
    assert _programs_per_head(1, 4, gpu) == 4  # never more programs than splits
    assert _programs_per_head(8, 32, torch.device("cpu")) == 4

# --- compiled, on a GPU ----------------------------------------------------------------------

GPU_PREFILL_CASES = [
    # Llama-3-8B attention shapes: 32 q heads, 8 kv heads, head_dim 128
    (128, 32, 8, 16, [1024, 17, 300], [0, 2000, 513]),
    (128, 32, 8, 32, [129, 64, 1], [4096, 0, 777]),
    (64, 8, 1, 16, [16, 1000], [48, 3]),
]
GPU_DECODE_CASES = [
    (128, 32, 8, 16, [1, 17, 512, 513, 4000, 8192]),
    (128, 32, 8, 32, [100, 2047, 1025]),
    (64, 16, 2, 16, [33, 3000]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_PREFILL_CASES, ids=lambda c: f"d{c[0]}-g{c[1] // c[2]}-bs{c[3]}")
def test_prefill_attention_gpu(case, dtype, request):
    head_dim, hq, hkv, bs, q_lens, ctx_lens = case
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    batch = make_paged_batch(q_lens, ctx_lens, hq, hkv, head_dim, bs, dtype, "cuda", gen)
    check_prefill(batch, dtype, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("split", [256, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=lambda c: f"d{c[0]}-g{c[1] // c[2]}-bs{c[3]}")
def test_decode_attention_gpu(case, dtype, split, request):
    head_dim, hq, hkv, bs, seq_lens = case
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    batch = make_paged_batch([1] * len(seq_lens), [s - 1 for s in seq_lens], hq, hkv, head_dim,
                             bs, dtype, "cuda", gen)
    check_decode(batch, dtype, TOL[dtype], split_size=split)
    check_decode(batch, dtype, TOL[dtype], split_size=split, programs_per_head=1)


@pytest.mark.gpu
def test_decode_batch_independence_and_repeats_gpu(request):
    """Compiled: a sequence's bits alone = in its batch = in a launch sized for 8192 tokens =
    with any spread of its splits over programs, at the default config and a small split; and
    30 repeats of a launch with many programs per sequence give the same bits (the last
    program's hand-off has no race)."""
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    lens = [1, 100, 1030, 1130, 4000, 513, 257, 256]
    check_batch_independence("cuda", torch.bfloat16, 128, 32, 8, lens, gen, [1, 2, 5, 32])
    check_batch_independence("cuda", torch.bfloat16, 128, 32, 8, lens, gen, [1, 3, 128],
                             split_size=64)
    ctx = [int(n) for n in torch.randint(500, 3000, (96,), generator=gen)]
    batch = make_paged_batch([1] * 96, ctx, 32, 8, 128, 16, torch.bfloat16, "cuda", gen)
    args = (batch.q, batch.kv_cache, batch.layer, batch.block_tables, batch.seq_lens, 0.29, 8192)
    first = decode_attention(*args, split_size=64, programs_per_head=16)
    for i in range(30):
        again = decode_attention(*args, split_size=64, programs_per_head=(16, 128, 1)[i % 3])
        assert torch.equal(again, first)
    assert not zeroed_counters("decode_attention", 1, batch.q.device).any()


def check_rotary_decode(device, dtype, head_dim, hq, hkv, bs, seq_lens, gen, spreads, exact,
                        **kw):
    """The decode kernel with the rotation and KV write fused in (ROTARY) against
    `rotary_write_kv` then `decode_attention` on copies of one pool: the same output and the
    same cache, bit for bit where `exact` (the interpreter), else within TOL, at every spread;
    a padding row (slot -1) writes nothing; and the torch composition (the CPU path) within
    TOL of the fp32 reference."""
    batch = make_paged_batch([1] * len(seq_lens), [n - 1 for n in seq_lens], hq, hkv, head_dim,
                             bs, dtype, device, gen)
    B = len(seq_lens)
    qkv = torch.randn(B, hq + 2 * hkv, head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # strided views, as the model's fused qkv
    last = batch.seq_lens.cpu() - 1
    tables = batch.block_tables.cpu()
    slots = torch.stack([tables[b, last[b] // bs] * bs + last[b] % bs for b in range(B)])
    slots[1] = -1  # a padding row: attends over what its slot already holds
    slots = slots.to(device)
    positions = last.to(device)
    angles = torch.rand(int(last.max()) + 1, head_dim // 2, generator=gen) * 40
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    rope = (positions, cos, sin)
    meta = (batch.block_tables, batch.seq_lens, 0.29, batch.max_seq_len)
    split_cache = batch.kv_cache.clone()
    q_rot = rotary_write_kv(q, k, v, *rope, split_cache, batch.layer, slots)
    want = decode_attention(q_rot, split_cache, batch.layer, *meta, **kw)
    qkv0 = qkv.clone()
    for spread in spreads:
        cache = batch.kv_cache.clone()
        with poisoned_outputs():
            out = rotary_decode_attention(q, k, v, *rope, cache, batch.layer, slots, *meta,
                                          programs_per_head=spread, **kw)
        assert torch.equal(qkv, qkv0)  # inputs never written
        if exact:
            assert torch.equal(out, want), f"spread {spread}"
            assert torch.equal(cache, split_cache), f"spread {spread}"
        else:
            assert rel_err(out, want) <= TOL[dtype], f"spread {spread}"
            torch.testing.assert_close(cache, split_cache, rtol=TOL[dtype], atol=TOL[dtype])
        # [NB, bs, Hkv]: the (slot, KV head)s written, one per head of each real row; the
        # padding row's slot untouched
        changed = (cache != batch.kv_cache).any(-1).any(2).any(1)
        assert int(changed.sum()) == (B - 1) * hkv
    ref_cache = batch.kv_cache.float()
    ref = rotary_decode_attention_ref(q.float(), k.float(), v.float(), *rope, ref_cache,
                                      batch.layer, slots, *meta)
    assert rel_err(want, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES[1:4], ids=lambda c: f"d{c[0]}-g{c[1] // c[2]}-bs{c[3]}")
def test_rotary_decode_attention_equals_the_two_kernels(case, dtype, request):
    head_dim, hq, hkv, bs, seq_lens, split, bn = case
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    check_rotary_decode("cpu", dtype, head_dim, hq, hkv, bs, seq_lens, gen, [1, 2, 3],
                        exact=True, split_size=split, block_n=bn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rotary_decode_attention_gpu(dtype, request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    check_rotary_decode("cuda", dtype, 128, 32, 8, 16, [1, 17, 513, 1030, 4000, 256], gen,
                        [1, 2, 5], exact=False)


def check_dense_prefill(device, dtype, lens, hq, hkv, head_dim, gen, tol):
    """Fresh sequences (no context): `dense_prefill_attention` over the step's own k/v (read
    out of a paged pool here, v as a strided view) against the paged kernel's reference on
    that pool, and against the paged Triton kernel."""
    batch = make_paged_batch(lens, [0] * len(lens), hq, hkv, head_dim, 16, dtype, device, gen)
    tables, bs = batch.block_tables.cpu(), 16
    rows = [int(tables[b, p // bs]) * bs + p % bs for b, n in enumerate(lens) for p in range(n)]
    plane = batch.kv_cache[:, batch.layer].transpose(1, 2).reshape(-1, 2, hkv, head_dim)
    kv = plane[torch.tensor(rows, device=device)]  # [T, 2, Hkv, D]: the tokens' own K/V
    k, v = kv[:, 0].contiguous(), kv[:, 1]
    with poisoned_outputs():
        out = dense_prefill_attention(batch.q, k, v, tuple(lens), 0.37)
    args = (batch.kv_cache, batch.layer, batch.block_tables, batch.query_start_loc,
            batch.seq_lens, 0.37, batch.max_query_len, batch.max_seq_len)
    ref = prefill_attention_ref(batch.q.float(), batch.kv_cache.float(), *args[1:])
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert rel_err(out, ref) <= tol
    if device == "cuda":
        assert rel_err(out, prefill_attention(batch.q, *args)) <= tol


def test_dense_prefill_attention_matches_the_paged_reference(request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    check_dense_prefill("cpu", torch.float32, [5, 17, 40, 1], 8, 2, 32, gen, TOL[torch.float32])
    check_dense_prefill("cpu", torch.float32, [33], 4, 4, 16, gen, TOL[torch.float32])
    q = torch.zeros(10, 4, 16)
    with pytest.raises(ValueError, match="do not fit"):
        dense_prefill_attention(q, q[:, :2], q[:, :2], (4, 5), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_prefill_attention_gpu(dtype, request):
    gen = torch.Generator().manual_seed(seed_for(request.node.name))
    check_dense_prefill("cuda", dtype, [1024, 600, 3000], 32, 8, 128, gen, TOL[dtype])
    check_dense_prefill("cuda", dtype, [8192], 32, 8, 128, gen, TOL[dtype])


def test_dense_prefill_is_taken_by_long_fresh_steps_on_cuda_only():
    from pdserve.kernels.attention import dense_prefill_wanted

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dense_prefill_wanted((8192,), cuda) and dense_prefill_wanted((4096, 2048), cuda)
    assert not dense_prefill_wanted((8192,), cpu)  # the CPU path stays the references
    assert not dense_prefill_wanted(None, cuda)  # a step with cached context
    assert not dense_prefill_wanted((1024,) * 8, cuda)  # short: the paged kernel is faster
    assert not dense_prefill_wanted((8192, 100), cuda)  # a short one beside a long one
    assert not dense_prefill_wanted((4096,) * 17, cuda)  # one SDPA call per sequence
