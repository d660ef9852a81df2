"""The sampler: target distributions, counter-based reproducibility, penalties and logprobs
against a straightforward reference on transformers' logits, min_tokens, n > 1."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.sampler import Sampler, SampleRow
from pdserve.kernels.sampling import exponential_race_ref
from tests.factories import hf_model, random_prompts

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -2.0, -3.0])
NUM_DRAWS = 20_000


def draw(params: SamplingParams, seed: int = 1234) -> torch.Tensor:
    """NUM_DRAWS tokens from LOGITS: one row per draw, each under its own seed."""
    sampler = Sampler(exponential_race_ref)
    rows = [SampleRow(params, seed * NUM_DRAWS + i, 0, [0], 1) for i in range(NUM_DRAWS)]
    tokens = [r.token for r in sampler(LOGITS.repeat(NUM_DRAWS, 1), rows)]
    return torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).double()


def chi_square_p(counts: torch.Tensor, target: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probabilities `target`
    (cells with zero target probability must have zero counts)."""
    keep = target > 0
    assert counts[~keep].sum() == 0, "a filtered-out token was drawn"
    expected = target[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def target(params: SamplingParams) -> torch.Tensor:
    """The distribution each filter should leave, computed the plain way."""
    p = torch.softmax(LOGITS.double() / params.temperature, dim=0)
    keep = torch.ones_like(p, dtype=torch.bool)
    if params.min_p > 0:
        keep &= p >= params.min_p * p.max()
    if params.top_k > 0:
        keep &= torch.zeros_like(keep).index_fill(0, p.topk(params.top_k).indices, True)
    q = torch.where(keep, p, 0.0)
    q = q / q.sum()
    if params.top_p < 1:
        order = q.argsort(descending=True)
        cum = torch.cumsum(q[order], 0)
        nucleus = order[: int((cum < params.top_p - 1e-12).sum()) + 1]
        q = torch.zeros_like(q).index_fill(0, nucleus, 1.0) * q
        q = q / q.sum()
    return q


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
], ids=["softmax", "temp0.5", "top_k3", "top_p0.8", "min_p0.2", "combined"])
def test_draws_match_the_target_distribution(params):
    counts = draw(params)
    want = target(params)
    p = chi_square_p(counts, want)
    assert p > 1e-3, f"chi-square p = {p:.2e}; counts {counts.tolist()} vs {want.tolist()}"


def test_chi_square_detects_a_wrong_distribution():
    """The statistics test has power: draws at T=1 fail against the T=0.5 target."""
    counts = draw(SamplingParams(temperature=1.0))
    assert chi_square_p(counts, target(SamplingParams(temperature=0.5))) < 1e-6


def test_draws_are_a_function_of_seed_choice_and_position():
    sampler = Sampler(exponential_race_ref)
    params = SamplingParams(temperature=1.0)
    big = torch.randn(1, 300)

    def one(seed, choice, pos, others=0):
        rows = [SampleRow(params, seed + 1 + k, 0, [1, 1], 1) for k in range(others)]
        rows.append(SampleRow(params, seed, choice, [1] + [1] * pos, 1))
        return sampler(big.repeat(len(rows), 1), rows)[-1].token

    streams = [[one(7, 0, pos) for pos in range(40)], [one(7, 1, pos) for pos in range(40)],
               [one(8, 0, pos) for pos in range(40)]]
    assert streams[0] != streams[1] and streams[0] != streams[2]
    assert streams[0] == [one(7, 0, pos, others=5) for pos in range(40)]  # batch-independent


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=512)


@pytest.fixture(scope="module")
def llm_processed(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=64,
               logprobs_mode="processed_logprobs")


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_seeded_request_alone_in_a_batch_and_as_one_of_n(llm):
    prompt = {"prompt_token_ids": random_prompts([21], 512, seed=20)[0]}
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in random_prompts(list(range(3, 35, 2)), 512, seed=21)]
    assert len(others) == 16
    batch = llm.generate(others[:7] + [prompt] + others[7:],
                         [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True)
                          for i in range(7)] + [params]
                         + [SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)] * 9,
                         use_tqdm=False)
    assert batch[7].outputs[0].token_ids == alone
    n4 = llm.generate(prompt, SamplingParams(**{**params.__dict__, "n": 4}), use_tqdm=False)[0]
    assert [c.index for c in n4.outputs] == [0, 1, 2, 3]
    assert n4.outputs[0].token_ids == alone
    assert len({tuple(c.token_ids) for c in n4.outputs}) == 4  # distinct streams
    engine = llm.engine
    for choice in (1, 2, 3):  # each choice equals a lone request with that choice_index
        req = engine.add_request(prompt["prompt_token_ids"], params, choice_index=choice)
        while engine.has_unfinished():
            engine.step()
        assert req.seqs[0].output_token_ids == n4.outputs[choice].token_ids
    bm = llm.parts.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_n_shares_prompt_blocks_and_copies_the_partial_one(tiny_checkpoint):
    """n = 3 on a 21-token prompt: one prefill; the full block is shared, the partial one
    copied; greedy choices all equal the n = 1 greedy output."""
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=64,
              enable_prefix_caching=False)
    prompt = random_prompts([21], 512, seed=22)[0]
    one = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    engine, bm = llm.engine, llm.parts.block_manager
    req = engine.add_request(prompt, SamplingParams(temperature=0, n=3, max_tokens=10,
                                                    ignore_eos=True))
    engine.step()  # the prefill: all three choices exist now
    assert len(req.seqs) == 3
    tables = [s.block_table for s in req.seqs]
    assert tables[0][0] == tables[1][0] == tables[2][0] and bm.ref_count(tables[0][0]) == 3
    assert len({t[1] for t in tables}) == 3  # partial block copied per choice
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in req.seqs] == [one] * 3
    assert bm.num_free_blocks == bm.num_blocks


def test_n_without_room_to_fork_recomputes_and_finishes(tiny_checkpoint):
    """A pool with no block free for the copy: extra choices wait and recompute, same result."""
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=3,
              max_model_len=48)
    prompt = random_prompts([36], 512, seed=23)[0]  # 3 blocks: the whole pool
    params = SamplingParams(temperature=0.8, seed=5, n=3, max_tokens=6, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [6, 6, 6]
    big = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=64)
    ref = big.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert tokens([out]) == tokens([ref])
    assert llm.parts.block_manager.num_free_blocks == 3


def reference_steps(model, prompt, output, params, num_steps, raw=False):
    """Straightforward reference: per step, transformers' logits for the sequence so far,
    penalties applied token by token, log-softmax (after temperature for random rows);
    `raw`: the log-softmax of the logits as they are."""
    steps = []
    for k in range(num_steps):
        ids = prompt + output[:k]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().clone()
        if raw:
            steps.append(torch.log_softmax(logits, dim=0))
            continue
        seen_out = output[:k]
        for t in set(prompt) | set(seen_out):
            if logits[t] > 0:
                logits[t] /= params.repetition_penalty
            else:
                logits[t] *= params.repetition_penalty
        for t in set(seen_out):
            logits[t] -= params.frequency_penalty * seen_out.count(t) + params.presence_penalty
        if not params.greedy:
            logits = logits / params.temperature
        steps.append(torch.log_softmax(logits, dim=0))
    return steps


@pytest.mark.parametrize("mode", ["processed_logprobs", "raw_logprobs"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_penalties_and_logprobs_equal_a_reference_on_transformers_logits(
        llm, llm_processed, tiny_checkpoint, temperature, mode):
    """processed: the logprobs of the distribution drawn from (penalties, temperature);
    raw (the default, vLLM V1's): the model's own, whatever the sampling."""
    prompt = random_prompts([30], 512, seed=24)[0]
    prompt = prompt[:10] * 3  # repeated tokens: the repetition penalty matters
    params = SamplingParams(temperature=temperature, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.4, logprobs=5,
                            max_tokens=20, ignore_eos=True, seed=3)
    engine = llm if mode == "raw_logprobs" else llm_processed
    out = engine.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    model = hf_model(tiny_checkpoint("llama"))
    ref = reference_steps(model, prompt, out.token_ids, params, 20, raw=mode == "raw_logprobs")
    drawn = reference_steps(model, prompt, out.token_ids, params, 20)
    total = 0.0
    for k, (tok, lp, want) in enumerate(zip(out.token_ids, out.logprobs, ref)):
        if temperature == 0.0:
            assert tok == int(drawn[k].argmax()), f"step {k}: greedy token differs"
        assert math.isclose(lp[tok].logprob, float(want[tok]), abs_tol=1e-4), k
        assert lp[tok].rank == int((want > want[tok]).sum()) + 1
        top = want.topk(5)
        got_top = sorted(((v.rank, t, v.logprob) for t, v in lp.items() if v.rank <= 5))
        assert [t for _, t, _ in got_top][:5] == top.indices.tolist(), k
        assert all(math.isclose(v, float(want[t]), abs_tol=1e-4) for _, t, v in got_top)
        assert isinstance(lp[tok].decoded_token, str)
        total += lp[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-3)


def test_min_tokens_blocks_stop_tokens(llm):
    prompt = {"prompt_token_ids": random_prompts([12], 512, seed=25)[0]}
    first = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8),
                         use_tqdm=False)[0].outputs[0].token_ids
    stop = first[0]  # the greedy first token becomes a stop token
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [stop] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=4,
                                              stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert stop not in out.token_ids[:4] and len(out.token_ids) >= 4


def test_token_mask_restricts_the_draw_to_its_tokens():
    """A masked row draws from the masked distribution (renormalised over the allowed
    tokens), greedy or random; logprobs are those of that distribution."""
    allowed = torch.zeros(len(LOGITS), dtype=torch.bool)
    allowed[[1, 3, 4, 8]] = True
    sampler = Sampler(exponential_race_ref, logprobs_mode="processed_logprobs")
    params = SamplingParams(temperature=1.0, seed=0)
    rows = [SampleRow(params, 99 * NUM_DRAWS + i, 0, [0], 1, allowed=allowed)
            for i in range(NUM_DRAWS)]
    counts = torch.bincount(torch.tensor([r.token for r in sampler(
        LOGITS.repeat(NUM_DRAWS, 1), rows)]), minlength=len(LOGITS)).double()
    want = torch.where(allowed, LOGITS, float("-inf")).softmax(-1).double()
    assert chi_square_p(counts, want) > 1e-3
    greedy = sampler(LOGITS.repeat(1, 1), [SampleRow(SamplingParams(temperature=0, logprobs=1),
                                                     1, 0, [0], 1, allowed=allowed)])[0]
    assert greedy.token == 1  # the best allowed token, not the overall best (0)
    assert greedy.logprobs[1].logprob == pytest.approx(float(want[1].log()), abs=1e-5)


def test_a_masked_row_leaves_the_others_alone():
    allowed = torch.zeros(len(LOGITS), dtype=torch.bool)
    allowed[5] = True
    sampler = Sampler(exponential_race_ref)
    params = SamplingParams(temperature=0.8, seed=0)
    plain = [SampleRow(params, s, 0, [0], 1) for s in range(64)]
    alone = [r.token for r in sampler(LOGITS.repeat(64, 1), plain)]
    mixed = sampler(LOGITS.repeat(65, 1), plain[:32] + [SampleRow(params, 7, 0, [0], 1,
                                                                  allowed=allowed)] + plain[32:])
    assert [r.token for r in mixed[:32] + mixed[33:]] == alone
    assert mixed[32].token == 5


@pytest.mark.parametrize("mask, why", [
    (torch.zeros(10, dtype=torch.bool), "allows no token"),
    (torch.ones(9, dtype=torch.bool), "shape"),
    (torch.ones(10, dtype=torch.int32), "bool"),
])
def test_a_bad_token_mask_is_a_clear_error(mask, why):
    with pytest.raises(ValueError, match=why):
        Sampler(exponential_race_ref)(LOGITS.repeat(1, 1), [
            SampleRow(SamplingParams(temperature=0), 1, 0, [0], 1, allowed=mask)])


def test_logit_bias_moves_the_draw_and_raw_logprobs_ignore_it():
    """OpenAI's logit_bias: +100 makes a token certain, -100 rules one out (greedy and
    random); raw logprobs are the model's, processed ones include the bias."""
    raw_lp = torch.log_softmax(LOGITS, dim=0)
    for mode in ("raw_logprobs", "processed_logprobs"):
        sampler = Sampler(exponential_race_ref, logprobs_mode=mode)
        params = SamplingParams(temperature=0, logit_bias={7: 100.0}, logprobs=0)
        (res,) = sampler(LOGITS.repeat(1, 1), [SampleRow(params, 1, 0, [0], 1)])
        assert res.token == 7
        biased = LOGITS.clone()
        biased[7] += 100
        want = raw_lp[7] if mode == "raw_logprobs" else torch.log_softmax(biased, dim=0)[7]
        assert res.logprobs[7].logprob == pytest.approx(float(want), abs=1e-5)
    counts = draw(SamplingParams(temperature=1.0, seed=0, logit_bias={0: -100.0, 1: 3.0}))
    biased = LOGITS.clone()
    biased[0] -= 100
    biased[1] += 3
    assert chi_square_p(counts, torch.softmax(biased.double(), 0)) > 1e-3


def test_logit_modes_report_logits():
    for mode, want in (("raw_logits", LOGITS), ("processed_logits", LOGITS / 0.5)):
        sampler = Sampler(exponential_race_ref, logprobs_mode=mode)
        (res,) = sampler(LOGITS.repeat(1, 1), [SampleRow(
            SamplingParams(temperature=0.5, seed=3, logprobs=2), 1, 0, [0], 1)])
        tok = res.token
        assert res.logprobs[tok].logprob == pytest.approx(float(want[tok]), abs=1e-5)
        assert res.logprobs[0].logprob == pytest.approx(float(want[0]), abs=1e-5)
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        Sampler(exponential_race_ref, logprobs_mode="raw")


def test_draw_without_host_reads_equals_the_full_path():
    """`Sampler.draw` (asynchronous steps: no host reads) gives the full path's tokens for
    simple rows (greedy, temperature, min-p, top-k, top-p, seeds, output positions given
    explicitly), and refuses a row that needs the tokens so far."""
    torch.manual_seed(3)
    logits = torch.randn(6, 300) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, min_p=0.05, seed=2),
              SamplingParams(temperature=0.9, top_k=7, seed=3),
              SamplingParams(temperature=1.2, top_p=0.8, seed=4),
              SamplingParams(temperature=0.8, top_k=30, top_p=0.95, min_p=0.01, seed=5)]
    rows = [SampleRow(p, p.seed or 0, 0, [1, 2, 3, 4], 2, output_position=k + 2)
            for k, p in enumerate(params)]
    sampler = Sampler(exponential_race_ref)
    assert all(r.is_simple for r in rows) and rows[3].num_output_tokens == 5
    drawn = sampler.draw(logits.clone(), rows).tolist()
    assert drawn == [r.token for r in sampler(logits.clone(), rows)]
    assert drawn[0] == int(logits[0].argmax())
    with_penalty = SampleRow(SamplingParams(temperature=0.5, repetition_penalty=1.3, seed=1),
                             1, 0, [1, 2, 3], 2)
    with_logprobs = SampleRow(SamplingParams(temperature=0, logprobs=2), 0, 0, [1, 2], 1)
    masked = SampleRow(SamplingParams(temperature=0), 0, 0, [1, 2], 1,
                       allowed=torch.ones(300, dtype=torch.bool))
    for row in (with_penalty, with_logprobs, masked):
        assert not row.is_simple
        with pytest.raises(ValueError, match="simple rows only"):
            sampler.draw(logits[:1].clone(), [row])
