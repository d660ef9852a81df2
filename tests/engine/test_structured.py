"""Structured outputs in the engine (engine/structured.py, llguidance): on random weights only
the grammar can make the text valid, so valid text is the grammar's doing. JSON schemas with
nested objects, enums, bounded arrays and strings; regex; choice; n > 1; seeded draws
reproducible; a grammar that does not compile refused at admission; the grammar state rebuilt
from the output so far (as on D after P's first token, or after a failover)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.common.params import StructuredOutputs
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampler import unpack_bitmask
from tests.engine.test_roles import run_disaggregated
from tests.factories import make_engine_parts, random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                   "verified": {"type": "boolean"}},
                  "required": ["city", "verified"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
JSON = StructuredOutputs(json=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=256)


def texts(llm, params, prompts=("a", "b c", "d e f")):
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_is_valid(llm, temperature):
    got = texts(llm, SamplingParams(temperature=temperature, seed=7, n=2, max_tokens=200,
                                    structured=JSON))
    for text, reason in got:
        assert reason == "stop", text  # the grammar ended it (EOS allowed only at the end)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert "  " not in text and "\n" not in text  # whitespace bounded
    assert len({t for t, _ in got}) > 1  # not one canned answer


def test_regex_and_choice(llm):
    for text, _ in texts(llm, SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                                             structured=StructuredOutputs(
                                                 regex=r"[0-9]{3}-[a-z]{2,4}"))):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    choices = ("yes", "no", "maybe later")
    got = texts(llm, SamplingParams(temperature=1.0, seed=4, n=4, max_tokens=10,
                                    structured=StructuredOutputs(choice=choices)))
    assert all(t in choices for t, _ in got), got


def test_seeded_draws_are_reproducible_under_a_grammar(llm):
    sp = SamplingParams(temperature=0.9, seed=11, max_tokens=120, structured=JSON)
    assert texts(llm, sp) == texts(llm, sp)


def test_a_grammar_that_does_not_compile_is_refused_at_admission(tiny_checkpoint):
    eng = LLMEngine(make_engine_parts(tiny_checkpoint("llama")))
    for bad in (StructuredOutputs(regex="[a-"), StructuredOutputs(json='{"type": "nope"}'),
                StructuredOutputs(grammar="start: undefined_rule")):
        with pytest.raises(ValueError, match=bad.kind):
            eng.add_request([5, 6, 7], SamplingParams(structured=bad))
    assert not eng.has_unfinished()


def test_spec_needs_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(json="{}", regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputs(choice=[])


def test_the_grammar_state_is_rebuilt_from_the_output_so_far(tiny_checkpoint):
    """The mask after an output that a fresh matcher replays equals the mask of a matcher
    that consumed it token by token."""
    eng = LLMEngine(make_engine_parts(tiny_checkpoint("llama")))
    g = eng.grammars()
    text = '{"name": "ab", "kind": "fox", "age": 3'
    ids = eng.parts.tokenizer.encode(text, add_special_tokens=False)
    class Key:  # stands for a request (weakly referenced, as requests are)
        pass

    def mask(key, out):
        return unpack_bitmask(g.bitmasks([(key, JSON, 0, out)]), g.vocab_size)[0]

    incremental, fresh = Key(), Key()
    for k in range(len(ids) + 1):
        step = mask(incremental, ids[:k])
    replayed = mask(fresh, ids)
    assert step.equal(replayed) and 0 < int(replayed.sum()) < replayed.numel()
    # a shorter output than consumed (a recompute elsewhere): reset and replay, same mask
    assert mask(incremental, ids[:2]).equal(mask(Key(), ids[:2]))


def test_batched_bitmasks_equal_the_masks_one_by_one(tiny_checkpoint):
    """Grammars.bitmasks (llguidance's parallel fill, a bit per token) unpacks to the masks
    a lone matcher gives for each row's output (llguidance's own logit bias), for rows at
    different points of their grammars; the sampler's bitmask path and bool-mask path mask
    the same logits."""
    from pdserve.engine.sampler import SampleRow, apply_token_masks

    eng = LLMEngine(make_engine_parts(tiny_checkpoint("llama")))
    g = eng.grammars()
    ids = eng.parts.tokenizer.encode('{"name": "ab", "kind": "fox", "age": 3',
                                     add_special_tokens=False)

    class Key:
        pass

    keys = [Key() for _ in range(4)]
    outputs = [ids[:k] for k in (0, 2, 5, len(ids))]
    words = g.bitmasks([(key, JSON, 0, out) for key, out in zip(keys, outputs, strict=True)])
    V = g.vocab_size
    assert words.shape == (4, (V + 31) // 32) and words.dtype == torch.int32
    unpacked = unpack_bitmask(words, V)
    for j, out in enumerate(outputs):
        m = g.matcher(JSON)
        assert not out or m.consume_tokens(out)
        bias = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)[:V] != 0
        assert unpacked[j].equal(bias), j
    logits = torch.randn(4, V)
    by_bits, by_bool = logits.clone(), logits.clone()
    params = SamplingParams()
    apply_token_masks(by_bits, [SampleRow(params, 0, 0, [1], 1, bitmask=words[j])
                                for j in range(4)])
    apply_token_masks(by_bool, [SampleRow(params, 0, 0, [1], 1, allowed=unpacked[j])
                                for j in range(4)])
    assert by_bits.equal(by_bool)


def test_disaggregated_equals_one_engine_under_a_grammar(tiny_checkpoint):
    """P draws the first token under the grammar; D rebuilds the state from it and goes on:
    the same tokens as one engine, and valid JSON."""
    path = tiny_checkpoint("llama")
    prompts = random_prompts([12, 30], 512, seed=5)
    params = [SamplingParams(temperature=0.8, seed=21, max_tokens=150, n=2, structured=JSON),
              SamplingParams(temperature=0, max_tokens=150, structured=JSON)]
    got, _ = run_disaggregated(path, prompts, params)
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tok = llm.tokenizer
    for i, out in enumerate(outs):
        for c in out.outputs:
            assert got[(f"r{i}", c.index)] == c.token_ids, (i, c.index)
            jsonschema.validate(json.loads(tok.decode(c.token_ids, skip_special_tokens=True)),
                                SCHEMA)


def test_a_request_whose_masks_leave_no_token_fails_alone(tiny_checkpoint):
    """A grammar and allowed_token_ids that exclude each other (only EOS allowed where the
    grammar needs "yes"): that request is aborted and reported, its blocks freed; the one
    beside it finishes."""
    eng = LLMEngine(make_engine_parts(tiny_checkpoint("llama")))
    eos = eng.eos_token_ids[0]
    bad = eng.add_request([5, 6, 7, 8], SamplingParams(
        max_tokens=5, structured=StructuredOutputs(choice=("yes",)), allowed_token_ids=[eos]),
        request_id="bad")
    good = eng.add_request([9, 10, 11], SamplingParams(temperature=0, max_tokens=5,
                                                       ignore_eos=True), request_id="good")
    while eng.has_unfinished():
        eng.step()
    assert [rid for rid, _ in eng.failed] == ["bad"] and "allows no token" in eng.failed[0][1]
    assert len(good.seqs[0].output_token_ids) == 5 and not bad.seqs[0].output_token_ids
    bm = eng.parts.block_manager
    assert bm.num_free_blocks == bm.num_blocks
