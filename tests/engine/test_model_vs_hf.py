"""The engine against transformers on tiny random checkpoints (fp32, CPU): per-step logits,
greedy tokens, chunked prefill and prefix reuse."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.model_runner import SeqChunk
from tests.factories import hf_model, make_engine_parts, random_prompts

ARCHS = ["llama", "llama3", "qwen2", "mistral"]
# lengths of different sizes, ending on and just past block boundaries; 100 and 130 exceed
# the llama3 fixture's original context (64), so its scaled frequencies are exercised
PROMPT_LENS = [5, 16, 17, 100, 130]
NUM_DECODE_STEPS = 33


def run_engine_steps(parts, prompts, num_steps):
    """Prefill all prompts in one step (logits at every prompt position), then greedy-decode
    them together; returns the generated tokens and, per sequence, the logits of every prompt
    position followed by those of every decode step."""
    bm, runner = parts.block_manager, parts.runner
    tables = [bm.allocate(p, num_slots=len(p) + num_steps).block_table for p in prompts]
    logits = runner.execute([SeqChunk(p, 0, t, num_logits=len(p)) for p, t in zip(prompts, tables)])
    prefill = list(logits.split([len(p) for p in prompts]))
    steps = []
    tokens = [[int(pl[-1].argmax())] for pl in prefill]
    for _ in range(num_steps - 1):
        chunks = [SeqChunk([toks[-1]], len(p) + len(toks) - 1, t)
                  for p, toks, t in zip(prompts, tokens, tables)]
        logits = runner.execute(chunks)
        steps.append(logits)
        for toks, t in zip(tokens, logits.argmax(-1)):
            toks.append(int(t))
    for t in tables:
        bm.free(t)
    return tokens, [torch.cat([prefill[i], *(s[i:i + 1] for s in steps)])
                    for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_logits_match_transformers(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    parts = make_engine_parts(path)
    prompts = random_prompts(PROMPT_LENS, vocab=parts.model_config.vocab_size, seed=1)
    tokens, logits = run_engine_steps(parts, prompts, NUM_DECODE_STEPS)
    model = hf_model(path)
    worst = 0.0
    for p, toks, ours in zip(prompts, tokens, logits):
        ids = torch.tensor([p + toks[:-1]])
        with torch.no_grad():
            ref = model(ids).logits[0].float()  # every prompt position, then each decode step
        assert ref.shape == ours.shape
        worst = max(worst, (ref - ours).abs().max().item())
    assert worst <= 1e-4, f"{arch}: max |logits - transformers| = {worst:.2e}"
    assert parts.block_manager.num_free_blocks == parts.block_manager.num_blocks


def assert_greedy_equals_generate(llm: LLM, path, prompts: list[list[int]], n: int) -> None:
    """`llm`'s greedy tokens for `prompts` (n each, all in one generate call) are
    transformers' `generate` ones, and every block is free after."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    model = hf_model(path)
    for p, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()
        assert out.outputs[0].finish_reason == "length"
    assert llm.parts.block_manager.num_free_blocks == llm.parts.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_generate(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=256)
    prompts = random_prompts(PROMPT_LENS, vocab=llm.parts.model_config.vocab_size, seed=2)
    assert_greedy_equals_generate(llm, path, prompts, 32)


def test_greedy_equals_generate_with_a_small_mixed_step_budget(tiny_checkpoint):
    """--mixed-step-tokens 8 under a 64-token budget: prompts chunk differently once a
    stream decodes (8 tokens in all), the tokens stay transformers' greedy ones."""
    path = tiny_checkpoint("llama3")
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=256,
              max_num_batched_tokens=64, mixed_step_tokens=8)
    assert llm.engine.scheduler.mixed_step_tokens == 8
    prompts = random_prompts([5, 90, 40, 130], vocab=llm.parts.model_config.vocab_size, seed=4)
    assert_greedy_equals_generate(llm, path, prompts, 12)


@pytest.mark.parametrize("chunk_sizes", [[7, 16, 200], [1, 1, 30, 200], [16, 16, 200]])
def test_chunked_prefill_equals_one_shot(chunk_sizes, tiny_checkpoint):
    parts = make_engine_parts(tiny_checkpoint("llama3"))
    prompt = random_prompts([100], vocab=parts.model_config.vocab_size, seed=3)[0]
    bm, runner = parts.block_manager, parts.runner
    table = bm.allocate(prompt).block_table
    one_shot = runner.execute([SeqChunk(prompt, 0, table)])
    bm.free(table)
    table = bm.allocate(prompt).block_table
    start = 0
    for size in chunk_sizes:
        chunk = prompt[start:start + size]
        last = start + len(chunk) == len(prompt)
        # a chunk may also return logits for all its tokens: check those against one-shot too
        logits = runner.execute([SeqChunk(chunk, start, table, num_logits=len(chunk))])
        start += len(chunk)
        if last:
            break
    torch.testing.assert_close(logits[-1:], one_shot, rtol=0, atol=1e-5)
    bm.free(table)


def test_prefix_reuse_equals_recompute(tiny_checkpoint):
    """A second prompt sharing a 3-block prefix takes those blocks from the cache and still
    produces the same logits and tokens as a cold run."""
    path = tiny_checkpoint("llama")
    shared = random_prompts([48], vocab=512, seed=4)[0]
    tails = random_prompts([5, 20], vocab=512, seed=5)
    prompts = [{"prompt_token_ids": shared + t} for t in tails]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cold = LLM(str(path), use_tqdm_on_load=False, enable_prefix_caching=False,
               num_gpu_blocks_override=128)
    want = [o.outputs[0].token_ids for o in cold.generate(prompts, params, use_tqdm=False)]
    warm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=128)
    got = [warm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == want
    bm = warm.parts.block_manager
    assert bm.num_prefix_hits == 48  # the second prompt reused the 3 shared blocks
    assert bm.num_free_blocks == bm.num_blocks


def test_mixed_batch_equals_separate_runs(tiny_checkpoint):
    """A decode token and a prefill chunk in one forward give the same logits as alone."""
    parts = make_engine_parts(tiny_checkpoint("qwen2"))
    a, b = random_prompts([20, 33], vocab=parts.model_config.vocab_size, seed=6)
    bm, runner = parts.block_manager, parts.runner
    ta = bm.allocate(a, num_slots=len(a) + 1).block_table
    la = runner.execute([SeqChunk(a, 0, ta)])
    nxt = int(la.argmax())
    alone_decode = runner.execute([SeqChunk([nxt], len(a), ta)])
    tb = bm.allocate(b).block_table
    alone_prefill = runner.execute([SeqChunk(b, 0, tb)])
    both = runner.execute([SeqChunk([nxt], len(a), ta), SeqChunk(b, 0, tb)])
    torch.testing.assert_close(both[0:1], alone_decode, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:2], alone_prefill, rtol=0, atol=1e-5)
