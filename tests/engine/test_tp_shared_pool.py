"""A P/D worker's tensor-parallel pool (CPU): one /dev/shm file in the tp=1 layout that every
rank maps, each rank's attention on a view of its KV heads. So a tp=2 engine's pool holds
what a tp=1 engine's holds (every head, the same block ids), and KV copied between pools of
any two TP sizes lands in the right heads: tp=2 -> tp=1, tp=1 -> tp=2 and tp=2 -> tp=2,
bytes exact, and the destination continues with the same tokens."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_pool import KVPool, KVPoolSpec
from pdserve.engine.model_runner import SeqChunk
from pdserve.engine.setup import EngineSetupError, build_engine
from pdserve.kv_transfer import shm
from tests.engine.test_model_vs_hf import run_engine_steps
from tests.factories import random_prompts

pytestmark = pytest.mark.timeout(180)

BLOCKS = 32


def _engine(path, tp: int, epoch: int | None):
    cfg = EngineConfig(model=str(path), device="cpu", num_gpu_blocks_override=BLOCKS,
                       tensor_parallel_size=tp)
    return build_engine(cfg, progress=False, pool_shm_epoch=epoch)


def test_head_shard_is_a_view_of_its_heads():
    spec = KVPoolSpec(4, 2, 16, 4, 8, torch.float32)
    full = KVPool(spec, torch.device("cpu"))
    full.tensor.copy_(torch.randn(spec.shape))
    part = full.head_shard(2, 4)
    assert part.spec.num_kv_heads == 2 and part.tensor.data_ptr() != full.tensor.data_ptr()
    part.tensor[1, 0, 1, 3] = 7.0  # written through the view: the full pool's heads 2..3
    assert torch.equal(full.tensor[1, 0, 1, 3, 2:], torch.full((2, 8), 7.0))
    assert torch.equal(part.tensor, full.tensor[..., 2:4, :])
    with pytest.raises(ValueError, match="outside"):
        full.head_shard(3, 5)


def test_attach_maps_the_owners_file(tmp_path):
    spec = KVPoolSpec(3, 1, 16, 2, 4, torch.float32)
    owner = KVPool(spec, torch.device("cpu"), shm_epoch=0x5EED)
    try:
        peer = KVPool.attach(owner.shm_path, spec)
        peer.tensor[2] = 1.5
        assert torch.equal(owner.tensor[2], torch.full(spec.shape[1:], 1.5))
        peer.close()  # not its file: left for the owner
        assert owner.shm_path.exists()
        with pytest.raises(ValueError, match="not a pool of shape"):
            KVPool.attach(owner.shm_path, KVPoolSpec(4, 1, 16, 2, 4, torch.float32))
    finally:
        owner.close()


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """tp=1 and tp=2 engines as P/D workers build them (pool in /dev/shm)."""
    path = tiny_checkpoint("llama")
    one, two = _engine(path, 1, 0x101), _engine(path, 2, 0x102)
    try:
        yield one, two
    finally:
        for e in (one, two):
            e.pool.close()
            e.close()


def _fill(parts, prompts):
    """Prefill `prompts` (their blocks stay allocated); block tables and greedy first tokens."""
    tables = [parts.block_manager.allocate(p, num_slots=len(p) + 4).block_table for p in prompts]
    logits = parts.runner.execute([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    return tables, [int(x) for x in logits.argmax(-1)]


def _decode(parts, prompts, tables, first, steps=3):
    tokens = [[t] for t in first]
    for _ in range(steps):
        chunks = [SeqChunk([toks[-1]], len(p) + len(toks) - 1, t)
                  for p, toks, t in zip(prompts, tokens, tables)]
        for toks, t in zip(tokens, parts.runner.execute(chunks).argmax(-1)):
            toks.append(int(t))
    return tokens


def test_tp2_pool_is_the_tp1_layout_with_every_rank_writing_its_heads(engines):
    one, two = engines
    assert two.pool.shm_path is not None and two.pool.spec == one.pool.spec  # whole heads
    assert two.runner.pool.spec.num_kv_heads == one.pool.spec.num_kv_heads // 2
    prompts = random_prompts([9, 21], vocab=one.model_config.vocab_size, seed=4)
    tok1, _ = run_engine_steps(one, prompts, 4)
    tok2, _ = run_engine_steps(two, prompts, 4)
    assert tok1 == tok2
    used = sorted({b for p in prompts for b in range(-(-(len(p) + 4) // 16))})
    a, b = one.pool.tensor[used], two.pool.tensor[used]
    h = one.pool.spec.num_kv_heads // 2
    assert b[..., h:, :].abs().sum() > 0  # rank 1 wrote its heads into rank 0's file
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src_tp, dst_tp", [(2, 1), (1, 2), (2, 2)])
def test_kv_moved_between_tp_sizes_lands_in_the_right_heads(engines, tiny_checkpoint,
                                                            src_tp, dst_tp):
    """P prefills at src_tp; its blocks are copied (the shm transport's copy) into a D at
    dst_tp, into other block ids; D's blocks equal P's bytes exactly, and D decodes the
    tokens P's own engine decodes from them."""
    engines_by_tp = {1: engines[0], 2: engines[1]}
    p = engines_by_tp[src_tp]
    own = src_tp == dst_tp  # a second engine of that size
    d = _engine(tiny_checkpoint("llama"), dst_tp, 0x200 + dst_tp) if own else engines_by_tp[dst_tp]
    held: list[tuple] = []
    try:
        prompts = random_prompts([18, 33], vocab=p.model_config.vocab_size,
                                 seed=src_tp * 3 + dst_tp)
        p_tables, first = _fill(p, prompts)
        held += [(p, t) for t in p_tables]
        src = [b for t, q in zip(p_tables, prompts) for b in t[:-(-len(q) // 16)]]
        while True:  # D's block ids differ from P's: hold D's blocks until they do
            d_tables = [d.block_manager.allocate(q, num_slots=len(q) + 4).block_table
                        for q in prompts]
            held += [(d, t) for t in d_tables]
            dst = [b for t, q in zip(d_tables, prompts) for b in t[:-(-len(q) // 16)]]
            if dst != src:
                break
        shm.copy_blocks(d.pool.tensor, dst, p.pool.tensor, src)
        assert torch.equal(d.pool.tensor[dst], p.pool.tensor[src])  # bytes exact, every head
        want = _decode(p, prompts, p_tables, first)
        assert _decode(d, prompts, d_tables, first) == want
    finally:
        for e, t in held:
            e.block_manager.free(t)
        if own:
            d.pool.close()
            d.close()


def test_gpu_workers_refuse_it_with_the_reason(tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("the refusal is for GPU devices")
    cfg = EngineConfig(model=str(tiny_checkpoint("llama")), device="cuda",
                       tensor_parallel_size=2)
    with pytest.raises(EngineSetupError, match="on the CPU only for now"):
        build_engine(cfg, progress=False, pool_shm_epoch=1)
