"""P and D roles of the engine, in one process with the KV copied pool to pool: the
disaggregated output equals the single-engine output token for token."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.sequence import Request
from tests.factories import make_engine_parts, random_prompts


def run_disaggregated(path, prompts, params, kv_ready=True, d_blocks=256, flexible=False):
    """P prefills, D decodes, the KV copied pool to pool. `flexible`: both engines are
    both-role ones (P's requests added `prefill_only`), each also running a request of its
    own to the end meanwhile (returned under ("own-p", 0) and ("own-d", 0))."""
    if flexible:
        p = LLMEngine(make_engine_parts(path), Role.BOTH)
        d = LLMEngine(make_engine_parts(path, num_gpu_blocks_override=d_blocks), Role.BOTH)
        own = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        p.add_request(prompts[0], own, "own-p")
        d.add_request(prompts[-1], own, "own-d")
    else:
        p = LLMEngine(make_engine_parts(path), Role.PREFILL)
        d = LLMEngine(make_engine_parts(path, num_gpu_blocks_override=d_blocks), Role.DECODE)
    tokens: dict[tuple[str, int], list[int]] = {}
    reqs = []
    for i, (ids, sp) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        seed = sp.seed if sp.seed is not None else 1000 + i
        assert d.scheduler.can_reserve(len(ids))
        d.scheduler.reserve(Request(rid, list(ids), sp, seed))
        reqs.append(p.add_request(ids, SamplingParams(**{**sp.__dict__, "seed": seed}), rid,
                                  prefill_only=flexible))
    while p.has_unfinished():
        firsts: dict[str, list] = {}
        for o in p.step():
            if o.request_id == "own-p":
                tokens.setdefault(("own-p", 0), []).append(o.token_id)
                continue
            tokens[(o.request_id, o.choice_index)] = [o.token_id]
            if o.finish_reason is None:
                firsts.setdefault(o.request_id, []).append(o)
        held, reserved = p.scheduler.held, d.scheduler.reserved
        for req in reqs:
            rid = req.request_id
            if rid not in reserved or p.has_unfinished() and rid not in firsts \
                    and rid not in held:
                continue
            if rid in held:
                src = held[rid].block_table
                dst = reserved[rid].seqs[0].block_table
                if kv_ready:
                    d.parts.pool.tensor[torch.tensor(dst)] = p.parts.pool.tensor[torch.tensor(src)]
                p.scheduler.release(rid)
            if rid in firsts or rid in reserved:
                d.join(rid, firsts.get(rid, []), kv_ready=kv_ready)
    assert not p.scheduler.held and not d.scheduler.reserved
    while d.has_unfinished():
        for o in d.step():
            tokens.setdefault((o.request_id, o.choice_index), []).append(o.token_id)
    for e in (p, d):
        assert e.bm.num_free_blocks == e.bm.num_blocks
    return tokens, d.scheduler.num_preemptions


@pytest.mark.parametrize("kv_ready, flexible", [(True, False), (False, False), (True, True)],
                         ids=["transferred", "recomputed", "both-role-engines"])
def test_disaggregated_equals_single_engine(tiny_checkpoint, kv_ready, flexible):
    """Also between two both-role engines (flexible roles, issue 21): one prefills requests
    for the other while each runs a request of its own to the end; every token equals the
    single engine's."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([5, 16, 17, 40, 70, 3], 512, seed=30)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, n=2),
        SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=1),  # finishes on P: D not used
        SamplingParams(temperature=0.9, seed=6, max_tokens=15, ignore_eos=True, n=3,
                       repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
    ]
    got, _ = run_disaggregated(path, prompts, params, kv_ready=kv_ready, flexible=flexible)
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=256)
    if flexible:
        own = llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[-1]}],
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           use_tqdm=False)
        assert got[("own-p", 0)] == own[0].outputs[0].token_ids
        assert got[("own-d", 0)] == own[1].outputs[0].token_ids
    want_params = [SamplingParams(**{**sp.__dict__, "seed": sp.seed if sp.seed is not None
                                     else 1000 + i}) for i, sp in enumerate(params)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], want_params, use_tqdm=False)
    for i, out in enumerate(outs):
        for c in out.outputs:
            assert got[(f"r{i}", c.index)] == c.token_ids, (i, c.index)


def test_decode_preemption_keeps_the_output(tiny_checkpoint):
    """A D pool too small for all choices at once: preemption and recompute, same tokens."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([30, 30], 512, seed=31)
    params = [SamplingParams(temperature=0.8, seed=9, max_tokens=40, ignore_eos=True, n=2)] * 2
    small, preempted = run_disaggregated(path, prompts, params, d_blocks=12)
    big, none = run_disaggregated(path, prompts, params, d_blocks=256)
    assert preempted > 0 and none == 0
    assert small == big
