"""A 1-layer tiny Llama through the Triton ops (interpreter) against the torch ops: the same
logits for a batched prefill and a few decode steps, and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.model_runner import SeqChunk
from pdserve.engine.setup import build_engine
from pdserve.tiny import make_tiny_checkpoint
from tests.factories import random_prompts

PROMPT_LENS = [5, 16, 17, 40]  # ending on and just past block boundaries
NUM_DECODE_STEPS = 4


def run_steps(parts, prompts):
    """Prefill all prompts in one step (logits at every position), then greedy-decode them
    together; returns (tokens per sequence, all logits rows in order)."""
    bm, runner = parts.block_manager, parts.runner
    tables = [bm.allocate(p, num_slots=len(p) + NUM_DECODE_STEPS).block_table for p in prompts]
    logits = [runner.execute([SeqChunk(p, 0, t, num_logits=len(p))
                              for p, t in zip(prompts, tables)])]
    last = torch.cumsum(torch.tensor([len(p) for p in prompts]), 0) - 1
    tokens = [[int(t)] for t in logits[0][last].argmax(-1)]
    for _ in range(NUM_DECODE_STEPS):
        step = runner.execute([SeqChunk([toks[-1]], len(p) + len(toks) - 1, t)
                               for p, toks, t in zip(prompts, tokens, tables)])
        logits.append(step)
        for toks, t in zip(tokens, step.argmax(-1)):
            toks.append(int(t))
    return tokens, torch.cat(logits)


@pytest.mark.timeout(300)
def test_triton_engine_matches_torch_engine(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny", arch="llama", num_hidden_layers=1)
    results = {}
    for backend in ("torch", "triton"):
        parts = build_engine(EngineConfig(model=str(path), device="cpu", kernel_backend=backend,
                                          num_gpu_blocks_override=64), progress=False)
        assert parts.runner.ops.name == backend
        prompts = random_prompts(PROMPT_LENS, vocab=parts.model_config.vocab_size, seed=11)
        results[backend] = run_steps(parts, prompts)
    (want_tokens, want), (tokens, got) = results["torch"], results["triton"]
    assert got.shape == want.shape
    worst = (got - want).abs().max().item()
    assert worst <= 1e-4, f"max |logits(triton) - logits(torch)| = {worst:.2e}"
    assert tokens == want_tokens


@pytest.mark.timeout(300)
def test_dense_prefill_in_the_engine_matches_the_torch_engine(tmp_path, monkeypatch):
    """The Triton ops with fresh prompts' prefill through `dense_prefill_attention` (forced on
    here: on its own it runs on CUDA only) give the torch ops' logits and tokens."""
    import pdserve.engine.model as model_mod

    taken = []

    def wanted(lens, device):
        taken.append(lens)
        return lens is not None

    path = make_tiny_checkpoint(tmp_path / "tiny", arch="llama", num_hidden_layers=1)
    results = {}
    for backend in ("torch", "triton"):
        if backend == "triton":
            monkeypatch.setattr(model_mod, "dense_prefill_wanted", wanted)
        parts = build_engine(EngineConfig(model=str(path), device="cpu", kernel_backend=backend,
                                          num_gpu_blocks_override=64), progress=False)
        prompts = random_prompts(PROMPT_LENS, vocab=parts.model_config.vocab_size, seed=12)
        results[backend] = run_steps(parts, prompts)
    assert tuple(PROMPT_LENS) in taken  # the batched prefill took the dense path
    (want_tokens, want), (tokens, got) = results["torch"], results["triton"]
    worst = (got - want).abs().max().item()
    assert worst <= 1e-4, f"max |logits(triton, dense) - logits(torch)| = {worst:.2e}"
    assert tokens == want_tokens
