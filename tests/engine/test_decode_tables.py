"""Decode steps over the persistent device block tables (engine/model_runner.py
`DecodeTables`) draw exactly the tokens of per-step tables: requests joining a running batch
at different steps, preemption and recompute (new table lists), n > 1 forks, aborts mid-batch,
a row under a token mask, and more sequences over time than the tables have rows (rows
reused). A D's joins of transferred prefills decode on them too: tests/engine/test_roles.py
(run_disaggregated, with preemption) compares them with one engine."""

from __future__ import annotations

import torch

from pdserve import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import DecodeTables, SeqChunk
from tests.factories import make_engine_parts, random_prompts

PARAMS = [
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=3, max_tokens=25, ignore_eos=True, n=3),
    SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=6, max_tokens=35, ignore_eos=True, n=2,
                   repetition_penalty=1.2),
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
]


EVEN = torch.arange(512) % 2 == 0


def even_only(output_so_far: list[int]) -> torch.Tensor:
    return EVEN


def run(path, persistent: bool) -> tuple[dict, int, DecodeTables | None]:
    """Requests join over the first steps; one is aborted mid-batch; a small pool forces
    preemption. Returns the tokens of every choice, the preemption count, the tables."""
    parts = make_engine_parts(path, num_gpu_blocks_override=14, max_num_seqs=6)
    if not persistent:
        parts.runner.tables = None  # every decode step builds its tables, as prefills do
    eng = LLMEngine(parts)
    prompts = random_prompts([9, 20, 33, 5, 17, 26, 12, 40], 512, seed=70)
    reqs, step = [], 0
    while len(reqs) < len(prompts) or eng.has_unfinished():
        if len(reqs) < len(prompts) and step % 3 == 0:  # a new request every third step
            i = len(reqs)
            # r6 may draw only even token ids (a structured-output mask)
            reqs.append(eng.add_request(prompts[i], PARAMS[i % len(PARAMS)], request_id=f"r{i}",
                                        token_mask=even_only if i == 6 else None))
        if step == 14:
            eng.abort(reqs[1])  # mid-batch, with its forks running
        eng.step()
        step += 1
    assert parts.block_manager.num_free_blocks == parts.block_manager.num_blocks
    return ({(r.request_id, s.choice_index): s.output_token_ids for r in reqs for s in r.seqs},
            eng.scheduler.num_preemptions, parts.runner.tables)


def test_same_tokens_as_per_step_tables(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    got, preempted, tables = run(path, persistent=True)
    want, preempted_before, none = run(path, persistent=False)
    assert none is None and tables is not None
    assert got == want
    assert preempted == preempted_before > 0  # the recompute path ran
    # more table lists over the run (requests, forks, recomputes) than rows: rows were reused
    assert tables._step > 0 and len(tables._rows) <= tables.capacity == 6
    assert ("r1", 2) in got and len(got[("r1", 0)]) < 25  # the aborted request's forks ran
    assert got[("r6", 1)] and all(t % 2 == 0 for t in got[("r6", 1)])  # the masked request
    assert any(t % 2 for t in got[("r1", 0)] + got[("r3", 0)])  # unmasked ones are not


def test_a_table_is_written_once_then_only_where_it_grew():
    t = DecodeTables(capacity=2, width=8, device=torch.device("cpu"))
    a, b = [3, 5], [7]
    assert t.assign([SeqChunk([1], 20, a), SeqChunk([1], 3, b)]) == [0, 1]
    assert len(t._updates) == 3 * 3
    t.flush()
    assert t.table[0, :2].tolist() == [3, 5] and t.table[1, :1].tolist() == [7]
    a.append(9)  # grew a block
    assert t.assign([SeqChunk([1], 33, a)]) == [0] and t._updates == [0, 2, 9]
    t.flush()
    assert t.table[0, :3].tolist() == [3, 5, 9]
    # a new list (a recompute after preemption, a fork) is a new sequence: b's row, unused
    # in this step, is taken for it
    c = [4, 6]
    assert t.assign([SeqChunk([1], 33, a), SeqChunk([1], 20, c)]) == [0, 1]
    t.flush()
    assert t.table[1, :2].tolist() == [4, 6]
    assert t.table[t.pad_row].tolist() == [0] * 8  # the padding row stays zero
