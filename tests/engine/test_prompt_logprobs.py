"""Prompt logprobs (`SamplingParams.prompt_logprobs`) against transformers on a tiny random
checkpoint (fp32, CPU): every prompt token's logprob, rank and the top-N, through chunked
prefill, a prompt the prefix cache holds, n > 1 and the prefill role; D of a pair computes
none (P delivers them)."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.sequence import Request
from tests.factories import hf_model, make_engine_parts, random_prompts

pytestmark = pytest.mark.timeout(300)
TOP = 3


def reference(path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each prompt position [len - 1, vocab] (position i
    predicts token i + 1)."""
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_against(ref: torch.Tensor, prompt: list[int], plp: list) -> float:
    """Assert ranks and top ids match; returns the worst |logprob - transformers'|."""
    assert len(plp) == len(prompt) and plp[0] is None
    worst = 0.0
    for i, entry in enumerate(plp[1:]):
        tok = prompt[i + 1]
        row = ref[i]
        assert next(iter(entry)) == tok  # the prompt token's own entry first
        worst = max(worst, abs(entry[tok].logprob - row[tok].item()))
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(TOP).indices.tolist()
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= TOP)
        assert [t for _, t in ranked] == top
        for t in top:
            worst = max(worst, abs(entry[t].logprob - row[t].item()))
    return worst


def test_prompt_logprobs_equal_transformers_through_chunks_cache_and_forks(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    # a step budget of 32 tokens: the 100-token prompt prefills in four chunks
    llm = LLM(str(path), device="cpu", num_gpu_blocks_override=256, max_num_batched_tokens=32,
              use_tqdm_on_load=False)
    vocab = llm.parts.model_config.vocab_size
    short, long = random_prompts([7, 100], vocab=vocab, seed=3)
    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=TOP)
    outs = llm.generate([{"prompt_token_ids": short}, {"prompt_token_ids": long}], sp,
                        use_tqdm=False)
    worst = max(check_against(reference(path, p), p, o.prompt_logprobs)
                for p, o in zip((short, long), outs, strict=True))
    assert worst <= 1e-4, f"max |prompt logprob - transformers'| = {worst:.2e}"
    # decoded text of each entry, as vLLM reports it
    assert all(lp.decoded_token is not None for lp in outs[1].prompt_logprobs[1].values())
    # the same prompt again: its blocks are cached now, yet every position is computed;
    # n = 2 random choices: one list for the request
    again = llm.generate({"prompt_token_ids": long},
                         SamplingParams(max_tokens=3, n=2, seed=5, prompt_logprobs=TOP),
                         use_tqdm=False)[0]
    # (other batch company than the first run: equal up to float rounding)
    check_against(reference(path, long), long, again.prompt_logprobs)
    assert [None if e is None else {t: lp.rank for t, lp in e.items()}
            for e in again.prompt_logprobs] == \
        [None if e is None else {t: lp.rank for t, lp in e.items()}
         for e in outs[1].prompt_logprobs]
    assert len(again.outputs) == 2
    # the output's own logprobs are unaffected; no prompt logprobs unless asked
    plain = llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=2, temperature=0),
                         use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == outs[1].outputs[0].token_ids
    bm = llm.parts.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefill_role_delivers_them_and_decode_role_computes_none(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    p = LLMEngine(make_engine_parts(path), Role.PREFILL)
    d = LLMEngine(make_engine_parts(path), Role.DECODE)
    prompt = random_prompts([40], vocab=p.parts.model_config.vocab_size, seed=4)[0]
    sp = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0, seed=1)
    p.add_request(prompt, sp, "r")
    rows = []
    while p.has_unfinished():
        rows += p.step()
    assert len(rows) == 1 and rows[0].prompt_logprobs is not None
    plp = rows[0].prompt_logprobs
    ref = reference(path, prompt)
    for i, entry in enumerate(plp[1:]):  # N = 0: the prompt token's own entry only
        assert list(entry) == [prompt[i + 1]]
        assert abs(entry[prompt[i + 1]].logprob - ref[i, prompt[i + 1]].item()) <= 1e-4
    p.scheduler.release("r")
    # D reserves, the KV does not arrive (it recomputes the prompt): still no prompt logprobs
    d.scheduler.reserve(Request("r", list(prompt), sp, 1))
    d.join("r", [rows[0]], kv_ready=False)
    out = []
    while d.has_unfinished():
        out += d.step()
    assert len(out) == 3 and all(r.prompt_logprobs is None for r in out)
