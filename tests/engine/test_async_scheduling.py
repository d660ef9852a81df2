"""Asynchronous scheduling (engine/llm_engine.py, issue 16): a decode step is launched before
the previous step's tokens are read, with those tokens fed back on the device. It must draw
exactly the tokens of synchronous steps, under requests joining a running batch, preemption
and recompute, n > 1 forks, aborts mid-batch, stop tokens that end a sequence while its
next step is already on the device, min_tokens, penalties and logprobs (synchronous rows),
a row under a token mask, and a D's joins of transferred prefills; and it must leak no KV
block (a finished sequence's blocks wait for the step still writing them)."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.sequence import Request
from tests.factories import make_engine_parts, random_prompts

STOPS = list(range(2, 70))  # about one token in eight of the tiny model's 512 ends a sequence

PARAMS = [
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, max_tokens=25, ignore_eos=True, n=3),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=4, max_tokens=40,
                   stop_token_ids=STOPS),
    # synchronous rows (the step they are in runs synchronously): short, so most steps are not
    SamplingParams(temperature=0.9, seed=6, max_tokens=6, ignore_eos=True, n=2,
                   repetition_penalty=1.2),
    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.7, seed=8, max_tokens=30, min_tokens=12, stop_token_ids=STOPS),
    SamplingParams(temperature=0.6, seed=9, max_tokens=6, ignore_eos=True),  # masked
    SamplingParams(temperature=0, max_tokens=26, stop_token_ids=STOPS, n=2, seed=10),
]

EVEN = torch.arange(512) % 2 == 0


def even_only(output_so_far: list[int]) -> torch.Tensor:
    return EVEN


def run(path, mode: str, blocks: int) -> tuple[dict, dict, int, int]:
    """Requests join over the first steps, one under a token mask; r1 (3 forks) is aborted
    once it has delivered 6 tokens; `blocks` may force preemption. Returns the delivered
    tokens and the sequences' outputs of every choice, the preemption count and how many
    steps were launched ahead."""
    parts = make_engine_parts(path, num_gpu_blocks_override=blocks, max_num_seqs=6,
                              async_scheduling=mode)
    eng = LLMEngine(parts)
    ahead = 0
    launch = eng._launch

    def counting(*a, **k):
        nonlocal ahead
        ok = launch(*a, **k)
        ahead += bool(ok and k.get("ahead"))
        return ok

    eng._launch = counting
    prompts = random_prompts([9, 20, 33, 5, 17, 26, 12, 40], 512, seed=71)
    reqs, delivered, step, aborted = [], {}, 0, False
    while len(reqs) < len(prompts) or eng.has_unfinished():
        if len(reqs) < len(prompts) and step % 3 == 0:
            i = len(reqs)
            reqs.append(eng.add_request(prompts[i], PARAMS[i], request_id=f"r{i}",
                                        token_mask=even_only if i == 6 else None))
        for row in eng.step():
            delivered.setdefault((row.request_id, row.choice_index), []).append(row.token_id)
        if not aborted and len(delivered.get(("r1", 0), [])) >= 6:
            eng.abort(reqs[1])  # mid-batch, its forks running, a step of it on the device
            aborted = True
        step += 1
    bm = parts.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked, deferred frees included
    assert eng.scheduler._deferred is None and eng._launched is None
    outputs = {(r.request_id, s.choice_index): s.output_token_ids for r in reqs for s in r.seqs}
    return delivered, outputs, eng.scheduler.num_preemptions, ahead


@pytest.mark.parametrize("blocks", [256, 10], ids=["roomy", "preempting"])
def test_same_tokens_as_synchronous_steps(tiny_checkpoint, blocks):
    path = tiny_checkpoint("llama")
    got, got_out, preempted, ahead = run(path, "on", blocks)
    want, want_out, preempted_sync, none = run(path, "off", blocks)
    assert none == 0 and ahead >= 10, ahead  # the steps did run ahead
    assert got == want and got_out == want_out
    assert got == {k: v for k, v in got_out.items() if v}  # every drawn token delivered once
    if blocks == 10:
        assert preempted == preempted_sync > 0  # the recompute path ran
    assert len(got[("r1", 0)]) == 6 and ("r1", 2) in got  # aborted with its forks running
    assert all(t % 2 == 0 for t in got[("r6", 0)])  # the masked request
    # stop tokens ended sequences early (one while its next step was on the device)
    assert any(len(got[(f"r{i}", 0)]) < PARAMS[i].max_tokens for i in (2, 7))
    assert len(got[("r5", 0)]) >= 12  # min_tokens held


def test_blocks_of_a_sequence_stopped_in_flight_wait_for_its_step(tiny_checkpoint):
    """A stop token ends a sequence whose next step is already on the device: that step's
    row is dropped, and its blocks go back to the pool only once the step is done."""
    path = tiny_checkpoint("llama")
    prompt = random_prompts([20], 512, seed=72)[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = LLMEngine(make_engine_parts(path))
    req = ref.add_request(prompt, greedy)
    while ref.has_unfinished():
        ref.step()
    out = req.seqs[0].output_token_ids
    stop = out[4]
    k = out.index(stop)  # its first occurrence ends the sequence there
    eng = LLMEngine(make_engine_parts(path, async_scheduling="on"))
    bm = eng.bm
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                           stop_token_ids=[stop]))
    rows = []
    while not rows or rows[-1].finish_reason is None:
        rows += eng.step()
    assert [r.token_id for r in rows] == out[:k + 1] and rows[-1].finish_reason == "stop"
    assert eng._launched is not None  # the next step was launched before the stop was read
    assert bm.num_free_blocks < bm.num_blocks  # and still holds the sequence's blocks
    assert eng.has_unfinished()
    assert eng.step() == []  # that step's row is dropped
    assert not eng.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_decode_role_joins_while_running_ahead(tiny_checkpoint):
    """D joins transferred prefills while its steps run ahead: each join waits for the step
    on the device, then decodes with the others; every token equals the single engine's."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([12, 30, 7, 21], 512, seed=73)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=18, ignore_eos=True, n=2),
              SamplingParams(temperature=1.0, seed=6, max_tokens=22, stop_token_ids=STOPS),
              SamplingParams(temperature=0.5, seed=7, max_tokens=16, ignore_eos=True)]
    p = LLMEngine(make_engine_parts(path), Role.PREFILL)
    d = LLMEngine(make_engine_parts(path, async_scheduling="on"), Role.DECODE)
    firsts: dict[str, list] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
        d.scheduler.reserve(Request(f"r{i}", list(ids), sp, sp.seed or 0))
        p.add_request(ids, SamplingParams(**{**sp.__dict__, "seed": sp.seed or 0}), f"r{i}")
    while p.has_unfinished():
        for o in p.step():
            tokens[(o.request_id, o.choice_index)] = [o.token_id]
            firsts.setdefault(o.request_id, []).append(o)
    step = 0
    pending = [f"r{i}" for i in range(len(prompts))]
    while pending or d.has_unfinished():
        if pending and step % 4 == 0:  # a join every fourth D step, mid-run
            rid = pending.pop(0)
            src = p.scheduler.held[rid].block_table
            dst = d.scheduler.reserved[rid].seqs[0].block_table
            d.parts.pool.tensor[torch.tensor(dst)] = p.parts.pool.tensor[torch.tensor(src)]
            p.scheduler.release(rid)
            d.join(rid, [o for o in firsts[rid] if o.finish_reason is None], kv_ready=True)
        for o in d.step():
            tokens[(o.request_id, o.choice_index)].append(o.token_id)
        step += 1
    assert d.bm.num_free_blocks == d.bm.num_blocks
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=256)
    want = llm.generate([{"prompt_token_ids": x} for x in prompts],
                        [SamplingParams(**{**sp.__dict__, "seed": sp.seed or 0}) for sp in params],
                        use_tqdm=False)
    for i, out in enumerate(want):
        for c in out.outputs:
            assert tokens[(f"r{i}", c.index)] == c.token_ids, (i, c.index)


def test_a_failed_launch_ahead_falls_back_to_synchronous_steps(tiny_checkpoint, caplog):
    """A step that cannot be launched ahead (the runner raises) is logged once; the engine
    finishes the step on the device and steps synchronously from then on: same tokens, no
    block lost."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([14, 25], 512, seed=74)
    params = SamplingParams(temperature=0.8, seed=12, max_tokens=20, ignore_eos=True)

    def tokens(eng: LLMEngine) -> dict:
        for i, ids in enumerate(prompts):
            eng.add_request(ids, params, request_id=f"r{i}")
        out: dict = {}
        while eng.has_unfinished():
            for row in eng.step():
                out.setdefault(row.request_id, []).append(row.token_id)
        return out

    want = tokens(LLMEngine(make_engine_parts(path, async_scheduling="off")))
    eng = LLMEngine(make_engine_parts(path, async_scheduling="on"))
    execute, calls = eng.parts.runner.execute, []

    def failing(chunks, input_ids=None):
        calls.append(input_ids is not None)
        if input_ids is not None and sum(calls) == 3:
            raise RuntimeError("injected launch failure")
        return execute(chunks, input_ids)

    eng.parts.runner.execute = failing
    with caplog.at_level("ERROR"):
        got = tokens(eng)
    assert got == want
    assert "stepping synchronously from now on" in caplog.text
    assert not eng.async_scheduling and sum(calls) == 3  # no launch ahead after the failure
    assert eng.bm.num_free_blocks == eng.bm.num_blocks and eng.scheduler._deferred is None
