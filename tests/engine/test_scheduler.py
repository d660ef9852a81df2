"""The scheduler with no model: a fake runner records what each step runs and a fake
sampler draws fixed tokens, over the real block manager. Admission, token budgets,
chunking, preemption order, reservations and aborts, as contracts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from pdserve import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine, Role
from pdserve.engine.sampler import SampleResult

VOCAB = 32


@dataclass
class FakeRunner:
    steps: list[list[tuple[int, int, int]]] = field(default_factory=list)  # (start, len, logits)

    def execute(self, chunks):
        self.steps.append([(c.start_pos, len(c.token_ids), c.num_logits) for c in chunks])
        return torch.zeros(sum(c.num_logits for c in chunks), VOCAB)


class FakeSampler:
    def __call__(self, logits, rows):
        return [SampleResult(7, None) for _ in rows]


@dataclass
class FakeModelConfig:
    vocab_size: int = VOCAB
    eos_token_ids: tuple[int, ...] = (1,)


@dataclass
class FakePoolSpec:
    block_size: int = 16


@dataclass
class FakePool:
    spec: FakePoolSpec = field(default_factory=FakePoolSpec)

    def copy_blocks(self, pairs):
        self.copied = getattr(self, "copied", []) + list(pairs)


@dataclass
class FakeParts:
    config: EngineConfig
    block_manager: BlockManager
    runner: FakeRunner = field(default_factory=FakeRunner)
    sampler: FakeSampler = field(default_factory=FakeSampler)
    pool: FakePool = field(default_factory=FakePool)
    model_config: FakeModelConfig = field(default_factory=FakeModelConfig)
    tokenizer: None = None
    max_model_len: int = 256
    device: torch.device = torch.device("cpu")


def make_scheduler(num_blocks=64, role=Role.BOTH, **cfg) -> LLMEngine:
    config = EngineConfig(model="fake", **cfg)
    return LLMEngine(FakeParts(config, BlockManager(num_blocks, 16, config.enable_prefix_caching)),
                     role)


def params(n_out=4, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True, **kw)


def test_admission_limited_by_max_num_seqs_then_fifo():
    eng = make_scheduler(max_num_seqs=2)
    reqs = [eng.add_request([2] * 5, params()) for _ in range(3)]
    eng.step()
    assert [len(s) for s in eng.parts.runner.steps] == [2]  # two admitted, the third waits
    assert len(eng.running) == 2 and eng.waiting[0] is reqs[2].seqs[0]
    while eng.has_unfinished():
        eng.step()
    assert all(r.finished for r in reqs)


def test_token_budget_chunks_long_prompts():
    eng = make_scheduler(max_num_batched_tokens=32)
    eng.add_request([2] * 70, params(n_out=2))
    for _ in range(3):
        eng.step()
    # 70 prompt tokens under a 32-token budget: 32 + 32 + 6, logits only at the end
    assert eng.parts.runner.steps[:3] == [[(0, 32, 0)], [(32, 32, 0)], [(64, 6, 1)]]


def test_decodes_are_scheduled_before_new_prefills_within_the_budget():
    eng = make_scheduler(max_num_batched_tokens=20)
    eng.add_request([2] * 10, params(n_out=5))
    eng.step()  # prefill of the first
    eng.add_request([3] * 30, params(n_out=5))
    eng.step()
    assert eng.parts.runner.steps[1] == [(10, 1, 1), (0, 19, 0)]  # decode first, then 19


def test_preemption_takes_the_newest_and_recomputes_it():
    # 4 blocks of 16: two 20-token prompts take 2 blocks each; decoding past 32 tokens needs
    # a third block for the first, so the newest (second) is preempted
    eng = make_scheduler(num_blocks=4, max_model_len=64)
    a = eng.add_request([2] * 20, params(n_out=20))
    b = eng.add_request([3] * 20, params(n_out=20))
    eng.step()  # both admitted and prefilled
    assert len(eng.running) == 2
    while b.seqs[0].status.value != "waiting" and eng.has_unfinished():
        eng.step()
    assert eng.num_preemptions == 1
    assert eng.running and eng.running[0] is a.seqs[0]
    b_out = list(b.seqs[0].output_token_ids)
    while eng.has_unfinished():
        eng.step()
    assert b.seqs[0].output_token_ids[: len(b_out)] == b_out  # kept, then recomputed
    assert len(a.seqs[0].output_token_ids) == 20 and len(b.seqs[0].output_token_ids) == 20
    assert eng.bm.num_free_blocks == 4


def test_abort_frees_at_once_in_every_state():
    eng = make_scheduler(num_blocks=8, max_num_seqs=1)
    running = eng.add_request([2] * 20, params(n_out=50))
    waiting = eng.add_request([2] * 20, params(n_out=50))
    eng.step()
    eng.abort(running)
    eng.abort(waiting)
    assert not eng.has_unfinished() and eng.bm.num_free_blocks == 8
    assert running.seqs[0].finish_reason == "abort"


def test_prefill_role_holds_blocks_until_released():
    eng = make_scheduler(num_blocks=8, role=Role.PREFILL)
    req = eng.add_request([2] * 20, params(n_out=5, n=3), request_id="r")
    outs = eng.step()
    assert [(o.choice_index, o.token_id) for o in outs] == [(0, 7), (1, 7), (2, 7)]
    assert len(req.seqs) == 1  # n first tokens from one row: no forks on P
    assert "r" in eng.held and eng.bm.num_free_blocks == 6
    eng.release("r")
    assert eng.bm.num_free_blocks == 8 and not eng.has_unfinished()


def test_prefill_role_frees_at_once_when_every_choice_finished():
    eng = make_scheduler(num_blocks=8, role=Role.PREFILL)
    eng.add_request([2] * 20, params(n_out=1), request_id="r")
    eng.step()
    assert "r" not in eng.held and eng.bm.num_free_blocks == 8


def test_reservation_join_and_cancel():
    eng = make_scheduler(num_blocks=8, role=Role.DECODE)
    assert eng.can_reserve(100) and not eng.can_reserve(129)
    eng.reserve([2] * 40, params(n_out=3, n=2), "r", seed=1)
    assert eng.bm.num_free_blocks == 5 and not eng.has_unfinished()  # reserved, not running
    eng.join("r", [(0, 9, None), (1, 8, None)], kv_ready=True)
    assert len(eng.running) == 2 and eng.parts.pool.copied  # partial block copied for choice 1
    while eng.has_unfinished():
        eng.step()
    assert eng.bm.num_free_blocks == 8
    req = eng.reserve([2] * 40, params(), "s", seed=1)
    eng.abort(req)  # a reservation aborted before it joined
    assert eng.bm.num_free_blocks == 8 and "s" not in eng.reserved


def test_join_after_a_failed_transfer_recomputes_in_chunks():
    eng = make_scheduler(num_blocks=16, role=Role.DECODE, max_num_batched_tokens=16)
    eng.reserve([2] * 40, params(n_out=3), "r", seed=1)
    eng.join("r", [(0, 9, None)], kv_ready=False)
    eng.step()
    eng.step()
    eng.step()
    # prompt (40) + P's first token (1) recomputed under the 16-token budget
    assert eng.parts.runner.steps[:3] == [[(0, 16, 0)], [(16, 16, 0)], [(32, 9, 1)]]


@pytest.mark.parametrize("prompt_len", [255, 256])
def test_prompt_at_or_over_max_model_len_is_refused(prompt_len):
    eng = make_scheduler()
    if prompt_len >= 256:
        with pytest.raises(ValueError, match="max_model_len"):
            eng.add_request([2] * prompt_len, params())
    else:
        eng.add_request([2] * prompt_len, params())
        while eng.has_unfinished():
            eng.step()


def test_waiting_behind_reserved_blocks_is_a_wait_not_an_error():
    """On D, reservations hold blocks while their KV is in flight; a sequence that needs them
    waits (found by the small-pool worker test: this used to raise)."""
    eng = make_scheduler(num_blocks=4, role=Role.DECODE, max_model_len=64)
    eng.reserve([2] * 40, params(n_out=3), "r", seed=1)  # 3 of 4 blocks
    waiting = eng.add_request([3] * 30, params(n_out=2))  # needs 2: only 1 is free
    assert eng.step() == [] and eng.stalled
    eng.join("r", [(0, 9, None)], kv_ready=True)
    while eng.has_unfinished():
        eng.step()
    assert waiting.finished and eng.bm.num_free_blocks == 4
