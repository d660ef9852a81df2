"""`cache_salt` (vLLM's request field) separates the prefix cache per tenant: the same prompt
under two salts, or under a salt and none, shares no cached block, on a both-role engine, on
P and on D; the same salt (and no salt twice) still hits. The salt changes what is cached,
never what is drawn. Real engines and schedulers, no fakes."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.common.prefix import (
    MAX_CACHE_SALT_CHARS,
    check_cache_salt,
    hash_block_tokens,
    prefix_block_hashes,
)
from pdserve.common.wire import TokenRow
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.scheduler import Role, Scheduler
from pdserve.engine.sequence import Request
from tests.factories import make_engine_parts, random_prompts

BS = 16


# ---- the names ----------------------------------------------------------------------------


def test_no_salt_keeps_the_names_of_prefix_hash_function_v1():
    # pinned values: the compat record's PREFIX_HASH_FUNCTION names exactly these
    assert hash_block_tokens(None, list(range(16))) == 0xA8EE8A77EA5BE4F2
    assert prefix_block_hashes(list(range(32)), BS) == [12172819090466661618,
                                                        9031721815601424023]
    assert prefix_block_hashes(list(range(40)), BS, cache_salt=None) == \
        prefix_block_hashes(list(range(40)), BS)


def test_salt_enters_the_first_block_and_the_chain_carries_it():
    ids = list(range(64))
    plain = prefix_block_hashes(ids, BS)
    a = prefix_block_hashes(ids, BS, cache_salt="tenant-a")
    b = prefix_block_hashes(ids, BS, cache_salt="tenant-b")
    assert not set(a) & set(plain) and not set(a) & set(b)  # no block name in common
    assert a == prefix_block_hashes(ids, BS, cache_salt="tenant-a")  # stable
    assert a[0] == hash_block_tokens(None, ids[:BS], "tenant-a")
    assert a[1] == hash_block_tokens(a[0], ids[BS:2 * BS])  # later blocks: parent only
    # incremental hashing under a salt equals hashing from scratch
    assert prefix_block_hashes(ids, BS, start=a[:2], cache_salt="tenant-a") == a


@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_CHARS + 1), 5, b"bytes", "\ud800"])
def test_bad_salts_are_refused(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        check_cache_salt(salt)


def test_good_salts_pass():
    for salt in (None, "a", "x" * MAX_CACHE_SALT_CHARS, "租户-ü"):
        check_cache_salt(salt)


# ---- a both-role engine with the model ------------------------------------------------------


def _admitted(engine: LLMEngine, ids: list[int], salt: str | None, rid: str
              ) -> tuple[list[int], int]:
    """Add a request, run its prefill step; (its block table then, prefix-hit tokens it got).
    The request keeps running; the caller finishes it."""
    hits = engine.bm.num_prefix_hits
    req = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                             rid, cache_salt=salt)
    engine.step()
    return list(req.seqs[0].block_table), engine.bm.num_prefix_hits - hits


def _finish(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def test_tenants_share_no_cached_blocks_in_a_real_engine(tiny_checkpoint):
    engine = LLMEngine(make_engine_parts(tiny_checkpoint()))
    assert engine.bm.block_size == BS
    prompt = random_prompts([70], 200, seed=3)[0]  # 4 full blocks + 6 tokens
    table_a, hits = _admitted(engine, prompt, "tenant-a", "a1")
    assert hits == 0
    _finish(engine)  # A's blocks stay cached (evictable)

    # another tenant, the same prompt: nothing cached for it, no block of A's
    table_b, hits = _admitted(engine, prompt, "tenant-b", "b1")
    _finish(engine)
    assert hits == 0 and not set(table_b) & set(table_a[:4])
    # no salt: nothing of A's either
    table_plain, hits = _admitted(engine, prompt, None, "p1")
    _finish(engine)
    assert hits == 0 and not set(table_plain) & set(table_a[:4])

    # the same salt hits A's blocks (so the checks above can fail), and no salt hits no salt's
    table_a2, hits = _admitted(engine, prompt, "tenant-a", "a2")
    _finish(engine)
    assert hits == 4 * BS and table_a2[:4] == table_a[:4]
    table_plain2, hits = _admitted(engine, prompt, None, "p2")
    _finish(engine)
    assert hits == 4 * BS and table_plain2[:4] == table_plain[:4]


def test_salt_never_changes_the_tokens(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint()), device="cpu", num_gpu_blocks_override=256,
              use_tqdm_on_load=False)
    ids = random_prompts([40], 200, seed=4)[0]
    sp = SamplingParams(temperature=0.8, seed=9, max_tokens=8, ignore_eos=True)
    outs = [llm.generate({"prompt_token_ids": ids, **({"cache_salt": s} if s else {})}, sp,
                         use_tqdm=False)[0].outputs[0].token_ids
            for s in (None, "tenant-a", "tenant-b", None, "tenant-a")]
    assert all(o == outs[0] for o in outs)
    # the offline API salts through the prompt dict (as vLLM's): 2 full blocks, hit twice
    # (the second unsalted run and the second "tenant-a" run), never across salts
    assert llm.engine.bm.num_prefix_hits == 2 * 2 * BS
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids, "cache_salt": ""}],
                     sp, use_tqdm=False)
    assert not llm.engine.has_unfinished()  # checked before anything ran


# ---- P and D (schedulers over the real block manager; no tensors) --------------------------


def _scheduler(role: Role) -> Scheduler:
    return Scheduler(BlockManager(64, BS), max_num_seqs=16, max_num_batched_tokens=2048,
                     max_model_len=256, role=role, eos_token_ids=(1,))


def _run(sched: Scheduler) -> list[TokenRow]:
    batch = sched.schedule()
    draws = sched.draws(batch)
    return sched.postprocess(batch, draws, [(7, None)] * len(draws))


def _params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_prefill_worker_caches_per_salt():
    p = _scheduler(Role.PREFILL)
    prompt = [5] * 50  # 3 full blocks
    for rid, salt, want in (("a", "tenant-a", 0), ("b", "tenant-b", 0), ("n", None, 0),
                            ("a2", "tenant-a", 3 * BS), ("n2", None, 3 * BS)):
        hits = p.bm.num_prefix_hits
        p.add(Request(rid, prompt, _params(), seed=0, cache_salt=salt))
        _run(p)
        p.release(rid)  # the KV transfer ended
        assert p.bm.num_prefix_hits - hits == want, rid


def test_decode_worker_registers_transferred_blocks_under_the_salt():
    d = _scheduler(Role.DECODE)
    prompt = [5] * 50
    req = Request("r", prompt, _params(), seed=0, cache_salt="tenant-a")
    d.reserve(req)
    d.join("r", [TokenRow("r", 0, 7, None, None)], kv_ready=True)  # P's KV arrived
    while d.has_unfinished():
        _run(d)
    # a request the proxy sends D directly (Generate): only the same salt finds those blocks
    for rid, salt, want in (("b", "tenant-b", 0), ("n", None, 0), ("a", "tenant-a", 3 * BS)):
        hits = d.bm.num_prefix_hits
        d.add(Request(rid, prompt, _params(), seed=0, cache_salt=salt))
        while d.has_unfinished():
            _run(d)
        assert d.bm.num_prefix_hits - hits == want, rid
