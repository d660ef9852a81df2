"""The scheduler with no model and no fakes: the real Scheduler over the real block manager,
stepped by `run` (schedule -> draws -> postprocess with a fixed token). Admission, token
budgets, chunking, preemption order, forks, reservations and aborts, as contracts."""

from __future__ import annotations

import pytest

from pdserve import SamplingParams
from pdserve.common.wire import TokenRow
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Role, Scheduler
from pdserve.engine.sequence import Request


def make_scheduler(num_blocks=64, role=Role.BOTH, max_num_seqs=256, max_num_batched_tokens=2048,
                   max_model_len=256, mixed_step_tokens=None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 16), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                     role=role, eos_token_ids=(1,), mixed_step_tokens=mixed_step_tokens)


def add(sched: Scheduler, ids, params, rid="r") -> Request:
    req = Request(rid, list(ids), params, seed=0)
    sched.add(req)
    return req


def run(sched: Scheduler, token: int = 7) -> tuple[list[tuple[int, int, int]], list[TokenRow]]:
    """One step: what ran as (start, num tokens, logits rows), and the rows drawn."""
    batch = sched.schedule()
    ran = [(s.num_computed_tokens, n, int(s.num_computed_tokens + n == s.num_tokens))
           for s, n in batch]
    draws = sched.draws(batch)
    return ran, sched.postprocess(batch, draws, [(token, None)] * len(draws))


def params(n_out=4, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True, **kw)


def test_admission_limited_by_max_num_seqs_then_fifo():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [add(sched, [2] * 5, params(), rid=f"r{i}") for i in range(3)]
    ran, _ = run(sched)
    assert len(ran) == 2  # two admitted, the third waits
    assert len(sched.running) == 2 and sched.waiting[0] is reqs[2].seqs[0]
    while sched.has_unfinished():
        run(sched)
    assert all(r.finished for r in reqs)


def test_token_budget_chunks_long_prompts():
    sched = make_scheduler(max_num_batched_tokens=32)
    add(sched, [2] * 70, params(n_out=2))
    steps = [run(sched)[0] for _ in range(3)]
    # 70 prompt tokens under a 32-token budget: 32 + 32 + 6, logits only at the end
    assert steps == [[(0, 32, 0)], [(32, 32, 0)], [(64, 6, 1)]]


def test_decodes_are_scheduled_before_new_prefills_within_the_budget():
    sched = make_scheduler(max_num_batched_tokens=20)
    add(sched, [2] * 10, params(n_out=5), rid="a")
    run(sched)  # prefill of the first
    add(sched, [3] * 30, params(n_out=5), rid="b")
    assert run(sched)[0] == [(10, 1, 1), (0, 19, 0)]  # decode first, then 19


def test_mixed_step_tokens_bound_only_the_steps_that_decode():
    """--mixed-step-tokens: prompts run in full-budget chunks while no stream decodes; once
    one does, a step takes its decode and at most the mixed budget in all."""
    sched = make_scheduler(max_num_batched_tokens=64, mixed_step_tokens=20)
    add(sched, [2] * 100, params(n_out=3), rid="a")
    assert run(sched)[0] == [(0, 64, 0)]  # nothing decodes: the full budget
    assert run(sched)[0] == [(64, 36, 1)]  # the rest of "a" (first token drawn)
    add(sched, [3] * 100, params(n_out=3), rid="b")
    assert run(sched)[0] == [(100, 1, 1), (0, 19, 0)]  # "a" decodes: 20 tokens in all
    ran, rows = run(sched)
    assert ran == [(101, 1, 1), (19, 19, 0)] and rows[0].finish_reason == "length"  # "a" ends
    assert run(sched)[0] == [(38, 62, 1)]  # no stream decodes now: the full budget again


def test_a_prompt_prefilled_for_another_worker_keeps_the_full_budget_beside_streams():
    """A both-role engine prefilling for another worker (`prefill_only`: the proxy put it in
    P's role) runs its prompt chunks with the full budget even while its own last streams
    decode; its own prompts alone keep to the mixed budget."""
    sched = make_scheduler(max_num_batched_tokens=64, mixed_step_tokens=20)
    add(sched, [2] * 10, params(n_out=5), rid="a")
    run(sched)  # "a" prefilled: it decodes from now on
    add(sched, [3] * 100, params(n_out=3), rid="own")
    assert run(sched)[0] == [(10, 1, 1), (0, 19, 0)]  # its own prompt: 20 tokens in all
    p = Request("for-d", [4] * 100, params(n_out=3), seed=0, prefill_only=True)
    sched.add(p)
    ran, _ = run(sched)
    assert ran[0] == (11, 1, 1) and sum(n for _, n, _ in ran) == 64, ran  # the full budget
    assert make_scheduler(max_num_batched_tokens=64, mixed_step_tokens=500) \
        .mixed_step_tokens == 64  # capped at --max-num-batched-tokens


def test_preemption_takes_the_newest_and_recomputes_it():
    # 4 blocks of 16: two 20-token prompts take 2 blocks each; decoding past 32 tokens needs
    # a third block for the first, so the newest (second) is preempted
    sched = make_scheduler(num_blocks=4, max_model_len=64)
    a = add(sched, [2] * 20, params(n_out=20), rid="a")
    b = add(sched, [3] * 20, params(n_out=20), rid="b")
    run(sched)  # both admitted and prefilled
    assert len(sched.running) == 2
    while b.seqs[0].status.value != "waiting" and sched.has_unfinished():
        run(sched)
    assert sched.num_preemptions == 1
    assert sched.running and sched.running[0] is a.seqs[0]
    b_out = list(b.seqs[0].output_token_ids)
    while sched.has_unfinished():
        run(sched)
    assert b.seqs[0].output_token_ids[: len(b_out)] == b_out  # kept, then recomputed
    assert len(a.seqs[0].output_token_ids) == 20 and len(b.seqs[0].output_token_ids) == 20
    assert sched.bm.num_free_blocks == 4


def test_abort_frees_at_once_in_every_state():
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    running = add(sched, [2] * 20, params(n_out=50), rid="a")
    waiting = add(sched, [2] * 20, params(n_out=50), rid="b")
    run(sched)
    sched.abort(running)
    sched.abort(waiting)
    assert not sched.has_unfinished() and sched.bm.num_free_blocks == 8
    assert running.seqs[0].finish_reason == "abort"


def test_n_choices_fork_from_one_prefill_and_copy_the_partial_block():
    sched = make_scheduler(num_blocks=8)
    req = add(sched, [2] * 20, params(n_out=3, n=3), rid="r")
    ran, rows = run(sched)
    assert ran == [(0, 20, 1)]  # one prefill for all three choices
    assert sorted((r.choice_index, r.token_id) for r in rows) == [(0, 7), (1, 7), (2, 7)]
    assert len(req.seqs) == 3 and len(sched.copies) == 2  # the partial block, per fork
    assert sched.bm.num_free_blocks == 8 - 2 - 2  # 1 shared full block + 3 partial ones
    while sched.has_unfinished():
        run(sched)
    assert sched.bm.num_free_blocks == 8


def test_prefill_role_holds_blocks_until_released():
    sched = make_scheduler(num_blocks=8, role=Role.PREFILL)
    req = add(sched, [2] * 20, params(n_out=5, n=3), rid="r")
    _, rows = run(sched)
    assert [(o.choice_index, o.token_id) for o in rows] == [(0, 7), (1, 7), (2, 7)]
    assert len(req.seqs) == 1  # n first tokens from one row: no forks on P
    assert "r" in sched.held and sched.bm.num_free_blocks == 6
    sched.release("r")
    assert sched.bm.num_free_blocks == 8 and not sched.has_unfinished()


def test_prefill_role_frees_at_once_when_every_choice_finished():
    sched = make_scheduler(num_blocks=8, role=Role.PREFILL)
    add(sched, [2] * 20, params(n_out=1), rid="r")
    run(sched)
    assert "r" not in sched.held and sched.bm.num_free_blocks == 8


def test_reservation_join_and_cancel():
    sched = make_scheduler(num_blocks=8, role=Role.DECODE)
    assert sched.can_reserve(100) and not sched.can_reserve(129)
    sched.reserve(Request("r", [2] * 40, params(n_out=3, n=2), seed=1))
    assert sched.bm.num_free_blocks == 5 and not sched.has_unfinished()  # reserved, not running
    sched.join("r", [TokenRow("r", 0, 9, None, None), TokenRow("r", 1, 8, None, None)],
               kv_ready=True)
    assert len(sched.running) == 2 and sched.copies  # partial block copied for choice 1
    while sched.has_unfinished():
        run(sched)
    assert sched.bm.num_free_blocks == 8
    req = Request("s", [2] * 40, params(), seed=1)
    sched.reserve(req)
    sched.abort(req)  # a reservation aborted before it joined
    assert sched.bm.num_free_blocks == 8 and "s" not in sched.reserved


def test_join_after_a_failed_transfer_recomputes_in_chunks():
    sched = make_scheduler(num_blocks=16, role=Role.DECODE, max_num_batched_tokens=16)
    sched.reserve(Request("r", [2] * 40, params(n_out=3), seed=1))
    sched.join("r", [TokenRow("r", 0, 9, None, None)], kv_ready=False)
    # prompt (40) + P's first token (1) recomputed under the 16-token budget
    assert [run(sched)[0] for _ in range(3)] == [[(0, 16, 0)], [(16, 16, 0)], [(32, 9, 1)]]


@pytest.mark.parametrize("prompt_len", [255, 256])
def test_prompt_at_or_over_max_model_len_is_refused(prompt_len):
    sched = make_scheduler()
    if prompt_len >= 256:
        with pytest.raises(ValueError, match="max_model_len"):
            add(sched, [2] * prompt_len, params())
    else:
        add(sched, [2] * prompt_len, params())
        while sched.has_unfinished():
            run(sched)


def test_waiting_behind_reserved_blocks_is_a_wait_not_an_error():
    """On D, reservations hold blocks while their KV is in flight; a sequence that needs them
    waits (found by the small-pool worker test: this used to raise)."""
    sched = make_scheduler(num_blocks=4, role=Role.DECODE, max_model_len=64)
    sched.reserve(Request("r", [2] * 40, params(n_out=3), seed=1))  # 3 of 4 blocks
    waiting = add(sched, [3] * 30, params(n_out=2), rid="w")  # needs 2: only 1 is free
    assert run(sched) == ([], []) and sched.stalled
    sched.join("r", [TokenRow("r", 0, 9, None, None)], kv_ready=True)
    while sched.has_unfinished():
        run(sched)
    assert waiting.finished and sched.bm.num_free_blocks == 4


def test_a_sequence_keeps_one_growing_token_list():
    sched = make_scheduler()
    req = add(sched, [2] * 5, params(n_out=3), rid="r")
    seq = req.seqs[0]
    tokens = seq.token_ids
    while sched.has_unfinished():
        run(sched)
    assert seq.token_ids is tokens and tokens == [2] * 5 + [7] * 3
    assert seq.output_token_ids == [7] * 3 and req.prompt_token_ids == [2] * 5
