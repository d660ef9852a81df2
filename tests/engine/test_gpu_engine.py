"""The engine on a GPU (gpu-marked: skipped without CUDA): fp32 greedy output equals the CPU
output token for token; CUDA-graph decode equals eager decode; seeded sampling gives the same
tokens on both devices. bf16 numerics: test_bf16_numerics.py."""

from __future__ import annotations

import pytest

from pdserve import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from tests.factories import make_engine_parts, random_prompts

pytestmark = pytest.mark.gpu
PROMPT_LENS = [5, 16, 17, 100, 130]


def greedy(parts, prompts, n=32):
    eng = LLMEngine(parts)
    reqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p in prompts]
    while eng.has_unfinished():
        eng.step()
    return [r.seqs[0].output_token_ids for r in reqs]


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp32_gpu_greedy_equals_cpu(tiny_checkpoint, arch, eager):
    path = tiny_checkpoint(arch)
    prompts = random_prompts(PROMPT_LENS, 512, seed=40)
    cpu = greedy(make_engine_parts(path), prompts)
    gpu_parts = make_engine_parts(path, device="cuda", dtype="float32", enforce_eager=eager,
                                  max_num_seqs=16)
    assert gpu_parts.runner.ops.name == "triton"
    assert bool(gpu_parts.runner.graphs) == (not eager)
    assert greedy(gpu_parts, prompts) == cpu


def test_fp32_dense_prefill_greedy_equals_cpu(tiny_checkpoint, monkeypatch):
    """Fresh prompts' prefill through torch's SDPA (`dense_prefill_attention`; its length
    thresholds lowered to fit the tiny model's 512 positions): the same greedy tokens as the
    CPU engine, and the dense path was taken."""
    import pdserve.engine.model as model_mod
    from pdserve.kernels import attention

    monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_LEN", 64)
    monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_EACH", 16)
    taken = []

    def wanted(lens, device):
        taken.append(attention.dense_prefill_wanted(lens, device))
        return taken[-1]

    monkeypatch.setattr(model_mod, "dense_prefill_wanted", wanted)
    path = tiny_checkpoint("llama3")
    prompts = random_prompts([100, 300, 17], 512, seed=42)
    cpu = greedy(make_engine_parts(path), prompts)
    assert not any(taken)  # the CPU path never takes it
    gpu = greedy(make_engine_parts(path, device="cuda", dtype="float32", max_num_seqs=16),
                 prompts)
    assert any(taken)
    assert gpu == cpu


def test_sampled_tokens_equal_on_cpu_and_gpu(tiny_checkpoint):
    """Seeded sampling in fp32: the same uniforms on both devices give the same tokens
    (up to exact probability ties, which random logits do not produce)."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([7, 40], 512, seed=41)

    def run(parts):
        eng = LLMEngine(parts)
        reqs = [eng.add_request(p, SamplingParams(temperature=0.9, top_p=0.95, seed=5,
                                                  max_tokens=24, ignore_eos=True, n=2))
                for p in prompts]
        while eng.has_unfinished():
            eng.step()
        return [[s.output_token_ids for s in r.seqs] for r in reqs]

    assert run(make_engine_parts(path, device="cuda", dtype="float32")) == run(
        make_engine_parts(path))
