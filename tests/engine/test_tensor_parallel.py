"""Tensor parallelism on the CPU (gloo, 2 ranks): the sharded engine computes what one
process computes (logits within 1e-5 relative, the same greedy and seeded tokens), refuses
shapes it cannot split, and dies cleanly: a killed rank is a clear error on rank 0, never a
hang, and a killed rank 0 takes its follower with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.parallel import TensorParallelError
from pdserve.engine.setup import EngineSetupError
from pdserve.tiny import make_tiny_checkpoint
from tests.engine.test_model_vs_hf import run_engine_steps
from tests.factories import make_engine_parts, random_prompts

pytestmark = pytest.mark.timeout(180)

PROMPT_LENS = [5, 17, 40]
NUM_DECODE_STEPS = 6


def _followers_gone(procs: list[subprocess.Popen], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return True
        time.sleep(0.05)
    return False


VARIANTS = {  # Llama checkpoints that exercise the edges of sharding
    "odd-vocab": dict(vocab_size=509),  # 2 ranks split it unevenly: the last slice is padded
    "attention-bias": dict(attention_bias=True),  # q/k/v biases split, o_proj's on rank 0
}


@pytest.fixture(scope="module")
def variant_checkpoint(tmp_path_factory):
    return lambda name: make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{name}"),
                                             arch="llama", with_tokenizer=False,
                                             **VARIANTS[name])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", *VARIANTS])
def test_tp2_logits_and_greedy_tokens_equal_tp1(arch, tiny_checkpoint, variant_checkpoint):
    path = variant_checkpoint(arch) if arch in VARIANTS else tiny_checkpoint(arch)
    one = make_engine_parts(path, num_gpu_blocks_override=32)
    prompts = random_prompts(PROMPT_LENS, vocab=one.model_config.vocab_size, seed=3)
    tokens1, logits1 = run_engine_steps(one, prompts, NUM_DECODE_STEPS)
    two = make_engine_parts(path, num_gpu_blocks_override=32, tensor_parallel_size=2)
    try:
        assert two.pool.spec.num_kv_heads == one.pool.spec.num_kv_heads // 2  # its own heads
        tokens2, logits2 = run_engine_steps(two, prompts, NUM_DECODE_STEPS)
    finally:
        two.close()
    assert tokens2 == tokens1
    for a, b in zip(logits1, logits2):
        assert a.shape == b.shape
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel <= 1e-5, f"{arch}: relative logits error {rel:.2e}"
    assert _followers_gone(two.tp.procs)


@pytest.mark.parametrize("arch", ["qwen2", "odd-vocab", "attention-bias"])
def test_dummy_weights_are_the_same_model_at_any_size(arch, tiny_checkpoint, variant_checkpoint):
    """`load_format=dummy`: each rank draws whole tensors and keeps its shard, so two ranks
    run the model one process draws (benchmarks can check tokens across sizes)."""
    path = variant_checkpoint(arch) if arch in VARIANTS else tiny_checkpoint(arch)
    one = make_engine_parts(path, num_gpu_blocks_override=16, load_format="dummy", seed=5)
    prompts = random_prompts([7, 20], vocab=one.model_config.vocab_size, seed=8)
    tokens1, logits1 = run_engine_steps(one, prompts, 4)
    two = make_engine_parts(path, num_gpu_blocks_override=16, load_format="dummy", seed=5,
                            tensor_parallel_size=2)
    try:
        tokens2, logits2 = run_engine_steps(two, prompts, 4)
    finally:
        two.close()
    assert tokens2 == tokens1
    for a, b in zip(logits1, logits2):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


def test_many_sequences_past_the_table_limit_equal_tp1(tiny_checkpoint):
    """More sequences than the ranks keep block tables for (4 x 64): both sides forget the
    same ones (and tables grow across blocks), so every token still equals one rank's."""
    path = tiny_checkpoint("llama")
    prompts = [{"prompt_token_ids": p} for p in random_prompts([3, 14] * 150, 512, seed=6)]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    kw = dict(use_tqdm_on_load=False, device="cpu", num_gpu_blocks_override=256,
              max_num_seqs=64, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in LLM(str(path), **kw).generate(prompts, sp,
                                                                           use_tqdm=False)]
    with LLM(str(path), tensor_parallel_size=2, **kw) as two:
        assert [o.outputs[0].token_ids for o in two.generate(prompts, sp, use_tqdm=False)] == want
        assert len(two.parts.tp._sent) <= 4 * 64  # 300 sequences ran: some were forgotten


class _Rank:
    """A stand-in group: what the model and the loader read of a rank (no collectives)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_loads_and_reads_only_its_slices(rank, variant_checkpoint, monkeypatch):
    from safetensors.torch import load_file

    from pdserve.engine import loader
    from pdserve.engine.model import CausalLM
    from pdserve.engine.model_config import ModelConfig

    path = variant_checkpoint("attention-bias")  # q/k/v biases split, o_proj's on rank 0
    cfg = ModelConfig.from_pretrained(path)
    model = CausalLM(cfg, 64, _Rank(rank, 2))  # type: ignore[arg-type]
    read: dict[str, tuple[int, ...]] = {}  # tensor name -> shape of what was read
    real_read = loader._read

    def spy(sf, name, target):
        tensor = real_read(sf, name, target)
        read[name] = tuple(tensor.shape)
        return tensor

    monkeypatch.setattr(loader, "_read", spy)
    loader.load_safetensors(model, path, progress=False)
    full = load_file(next(path.glob("*.safetensors")))
    p = "model.layers.1."
    assert read[p + "self_attn.k_proj.weight"] == (cfg.head_dim, cfg.hidden_size)  # 1 of 2 heads
    assert read[p + "mlp.down_proj.weight"] == (cfg.hidden_size, cfg.intermediate_size // 2)
    assert read["lm_head.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)
    q, kv, i, h = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                   cfg.intermediate_size, cfg.hidden_size)
    half = slice(rank * q // 2, (rank + 1) * q // 2)
    kvh = slice(rank * kv // 2, (rank + 1) * kv // 2)
    ih = slice(rank * i // 2, (rank + 1) * i // 2)
    layer = model.layers[1]
    want_qkv = torch.cat([full[p + "self_attn.q_proj.weight"][half],
                          full[p + "self_attn.k_proj.weight"][kvh],
                          full[p + "self_attn.v_proj.weight"][kvh]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, want_qkv)
    assert torch.equal(layer.self_attn.o_proj.weight, full[p + "self_attn.o_proj.weight"][:, half])
    o_bias = full[p + "self_attn.o_proj.bias"] if rank == 0 else torch.zeros(h)
    assert torch.equal(layer.self_attn.o_proj.bias, o_bias)  # added once, by rank 0
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat(
        [full[p + "mlp.gate_proj.weight"][ih], full[p + "mlp.up_proj.weight"][ih]]))
    assert torch.equal(layer.mlp.down_proj.weight, full[p + "mlp.down_proj.weight"][:, ih])
    rows = cfg.vocab_size // 2
    assert torch.equal(model.embed_tokens.weight,
                       full["model.embed_tokens.weight"][rank * rows:(rank + 1) * rows])


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_seeded_sampling_forks_and_prefix_cache_equal_tp1(async_scheduling, tiny_checkpoint):
    """Sampling (rank 0 only) draws the same tokens; n=2 forks copy blocks on every rank;
    a second round reuses cached prefixes. Asynchronous steps broadcast the tokens that
    rank 0 feeds back on the device."""
    path = tiny_checkpoint("qwen2")
    prompts = [{"prompt_token_ids": p} for p in random_prompts([20, 33, 9], 512, seed=4)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=7, n=2,
                             ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=8, seed=11, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]

    def run(llm: LLM) -> list[list[list[int]]]:
        out = []
        for _ in range(2):  # the second round hits the prefix cache
            out += [[c.token_ids for c in o.outputs]
                    for o in llm.generate(prompts, params, use_tqdm=False)]
        return out

    one = LLM(str(path), use_tqdm_on_load=False, device="cpu", num_gpu_blocks_override=64)
    with LLM(str(path), use_tqdm_on_load=False, device="cpu", num_gpu_blocks_override=64,
             tensor_parallel_size=2, async_scheduling=async_scheduling) as two:
        assert run(two) == run(one)
        assert two.parts.block_manager.num_free_blocks == two.parts.block_manager.num_blocks


@pytest.mark.parametrize("size, field", [(3, "num_key_value_heads"),
                                         (4, "num_key_value_heads")])
def test_sizes_that_do_not_divide_the_heads_are_refused(size, field, tiny_checkpoint):
    started = time.monotonic()
    with pytest.raises(EngineSetupError, match=rf"--tensor-parallel-size: tensor_parallel_size "
                       rf"{size} does not divide the model's {field} \(2\)"):
        LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, device="cpu",
            tensor_parallel_size=size)
    assert time.monotonic() - started < 5  # refused before any rank starts


def test_a_killed_rank_is_a_clear_error_not_a_hang(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, device="cpu",
              num_gpu_blocks_override=32, tensor_parallel_size=2)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": [3, 4, 5, 6]}
    assert len(llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids) == 4
    follower = llm.parts.tp.procs[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait(timeout=10)
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate(prompt, sp, use_tqdm=False)
    with pytest.raises(TensorParallelError):  # and every step after
        llm.generate(prompt, sp, use_tqdm=False)
    assert time.monotonic() - started < 10
    assert llm.parts.block_manager.num_free_blocks == llm.parts.block_manager.num_blocks
    llm.close()


def test_a_rank_killed_mid_step_is_a_clear_error(tiny_checkpoint):
    """The kill lands while rank 0 runs steps: gloo's broken connection (or the pipe)
    becomes the same error, within the step, with no hang."""
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, device="cpu",
              num_gpu_blocks_override=64, tensor_parallel_size=2)
    follower = llm.parts.tp.procs[0]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([30] * 4, 512, seed=5)]
    sp = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    killer = subprocess.Popen([sys.executable, "-c", "import os, signal, time; time.sleep(1.0);"
                               f"os.kill({follower.pid}, signal.SIGKILL)"])
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
        while time.monotonic() - started < 30:  # steps back to back until the kill lands
            llm.generate(prompts, sp, use_tqdm=False)
    assert time.monotonic() - started < 30
    killer.wait(timeout=10)
    llm.close()


LEADER = """
import sys, time
from pdserve import LLM
llm = LLM(sys.argv[1], use_tqdm_on_load=False, device="cpu", num_gpu_blocks_override=16,
          tensor_parallel_size=2)
print(llm.parts.tp.procs[0].pid, flush=True)
time.sleep(120)
"""


def test_a_killed_rank_0_takes_its_follower_down(tiny_checkpoint, tmp_path):
    leader = subprocess.Popen([sys.executable, "-c", LEADER, str(tiny_checkpoint("llama"))],
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pid = int(leader.stdout.readline())
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a zombie counts as gone: its parent (the test's child) was killed, init reaps it
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the follower outlived rank 0 by 10 s")
    finally:
        if leader.poll() is None:
            leader.kill()


def test_generate_cli_with_two_ranks(tiny_checkpoint, capsys):
    from pdserve.cli import main

    path = str(tiny_checkpoint("mistral"))
    argv = ["generate", "--model", path, "--device", "cpu", "--prompt-token-ids", "3,4,5,6,7",
            "--max-tokens", "6", "--ignore-eos", "--json", "--num-gpu-blocks-override", "16"]
    assert main(argv) == 0
    one = capsys.readouterr().out
    assert main([*argv, "--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == one


def test_a_bad_chunk_is_contained_and_the_ranks_stay_in_step(tiny_checkpoint):
    """An error raised alike on every rank before the step's first collective (a block
    table too short) is the caller's to contain; the next steps still run."""
    from pdserve.engine.model_runner import SeqChunk

    parts = make_engine_parts(tiny_checkpoint("llama"), num_gpu_blocks_override=16,
                              tensor_parallel_size=2)
    try:
        with pytest.raises(ValueError, match="cannot hold"):
            parts.runner.execute([SeqChunk(list(range(3, 40)), 0, [0])])
        logits = parts.runner.execute([SeqChunk([3, 4, 5], 0, [1])])
        assert logits.shape == (1, parts.model_config.vocab_size)
        assert torch.isfinite(logits).all()
    finally:
        parts.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_over_nccl_equals_tp1_with_cuda_graphs(tiny_checkpoint):
    """Two GPUs (NCCL), fp32, decode CUDA graphs and asynchronous steps on: greedy tokens
    equal one GPU's, logits close (the row-parallel sums add in another order)."""
    path = tiny_checkpoint("llama")
    kw = dict(device="cuda:0", dtype="float32", num_gpu_blocks_override=64)
    one = make_engine_parts(path, **kw)
    prompts = random_prompts(PROMPT_LENS, vocab=one.model_config.vocab_size, seed=3)
    tokens1, logits1 = run_engine_steps(one, prompts, NUM_DECODE_STEPS)
    two = make_engine_parts(path, tensor_parallel_size=2, **kw)
    try:
        assert two.runner.graphs  # captured on both ranks, collectives inside
        tokens2, logits2 = run_engine_steps(two, prompts, NUM_DECODE_STEPS)
        with LLM(str(path), use_tqdm_on_load=False, tensor_parallel_size=2,
                 async_scheduling="on", **kw) as llm:
            sp = SamplingParams(temperature=0.0, max_tokens=NUM_DECODE_STEPS, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    finally:
        two.close()
    assert tokens2 == tokens1
    assert [o.outputs[0].token_ids for o in outs] == tokens1
    for a, b in zip(logits1, logits2):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4
