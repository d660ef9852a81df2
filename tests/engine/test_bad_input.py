"""Bad input gets a clear error naming what is wrong: checkpoints, configs, prompts, params."""

from __future__ import annotations

import json
import shutil

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.llm_engine import PromptTooLongError
from pdserve.engine.loader import CheckpointError
from pdserve.engine.model_config import ModelConfigError
from pdserve.engine.setup import EngineSetupError
from tests.factories import make_engine_parts


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises((CheckpointError, ModelConfigError), match="does not exist|no-such"):
        make_engine_parts(tmp_path / "no-such")


def test_missing_weights(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        make_engine_parts(path)


def test_corrupt_weights_file(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        make_engine_parts(path)


def test_garbage_weights_file(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        make_engine_parts(path)


def test_checkpoint_that_does_not_fit_the_config(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    shape_error = r"tensor .model\.layers\.0\.mlp\.\w+\.weight. has shape \(\d+, \d+\), config.json implies"
    with pytest.raises(CheckpointError, match=shape_error):
        make_engine_parts(path)


def test_checkpoint_missing_a_layer(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\): model\.layers\.2\."):
        make_engine_parts(path)


def test_corrupt_config_json(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json"):
        make_engine_parts(path)


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        make_engine_parts(path)


def test_prompt_over_max_model_len(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, max_model_len=64,
              num_gpu_blocks_override=32)
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        llm.generate({"prompt_token_ids": [5] * 64}, use_tqdm=False)
    # nothing was queued or leaked by the refused call
    assert not llm.engine.has_unfinished()
    assert llm.parts.block_manager.num_free_blocks == 32
    out = llm.generate({"prompt_token_ids": [5] * 63},
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1  # stops at max_model_len
    assert out[0].outputs[0].finish_reason == "length"


def test_bad_prompt_in_a_batch_fails_before_any_work(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 10**6]}],
                     use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids must be a list of integers"):
        llm.generate({"prompt_token_ids": ["a"]}, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_text_prompt_without_tokenizer(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, skip_tokenizer_init=True,
              num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="token-ids-only"):
        llm.generate("hello", use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) <= 3 and out[0].outputs[0].text == ""


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"seed": "x"}, "seed"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": -1}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"seed": 2**64}, "seed"),
])
def test_invalid_sampling_values(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_unknown_llm_option(tiny_checkpoint):
    with pytest.raises(TypeError, match="max_modle_len"):
        LLM(str(tiny_checkpoint("llama")), max_modle_len=5)


def test_max_model_len_over_the_config(tiny_checkpoint):
    with pytest.raises(ModelConfigError, match="max_position_embeddings"):
        make_engine_parts(tiny_checkpoint("llama"), max_model_len=100_000)


def test_pool_too_small_for_an_explicit_max_model_len(tiny_checkpoint):
    with pytest.raises(EngineSetupError, match="KV pool holds 64 tokens.*max_model_len is 512"):
        make_engine_parts(tiny_checkpoint("llama"), num_gpu_blocks_override=4, max_model_len=512)


def test_pool_too_small_caps_a_defaulted_max_model_len(tiny_checkpoint, caplog):
    parts = make_engine_parts(tiny_checkpoint("llama"), num_gpu_blocks_override=4)
    assert parts.max_model_len == 64
    assert "max_model_len capped from 512 to 64" in caplog.text


def test_memory_budget_sizes_the_pool(tiny_checkpoint):
    # tiny llama: 2 layers x 2 (K, V) x 16 slots x 2 heads x 16 dims x 4 bytes = 8 KiB a block
    parts = make_engine_parts(tiny_checkpoint("llama"), num_gpu_blocks_override=None,
                              kv_cache_memory_bytes=100 * 8192 + 5)
    assert parts.pool.spec.bytes_per_block == 8192
    assert parts.block_manager.num_blocks == 100
    assert tuple(parts.pool.tensor.shape) == (100, 2, 2, 16, 2, 16)


def test_stop_token_ids_outside_the_vocabulary_are_refused_before_any_work(tiny_checkpoint):
    """The poison request of the fault campaign: stop ids >= vocab size with min_tokens used to
    crash the sampler (an IndexError that killed the worker)."""
    llm = LLM(str(tiny_checkpoint("llama")), use_tqdm_on_load=False, num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match=r"stop_token_ids id\(s\) \[5000\] outside the vocab"):
        llm.generate({"prompt_token_ids": [5, 6]},
                     SamplingParams(stop_token_ids=[5000], min_tokens=2, max_tokens=4),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_a_tiny_temperature_is_raised_to_the_minimum():
    assert SamplingParams(temperature=1e-300).temperature == 0.01
    assert SamplingParams(temperature=0.0).greedy


def test_a_request_that_fails_the_step_is_contained(tiny_checkpoint):
    """A request that gets past validation and still breaks the step (here: stop ids forced
    past the check) is aborted alone; the others finish with the tokens they would have
    drawn without it, and every block is free afterwards."""
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sequence import Request
    from tests.factories import random_prompts

    path = tiny_checkpoint("llama")
    prompts = random_prompts([9, 17, 30], 512, seed=3)
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=6, ignore_eos=True)

    def run(poison: bool):
        engine = LLMEngine(make_engine_parts(path))
        reqs = [engine.add_request(p, params, request_id=f"r{i}") for i, p in enumerate(prompts)]
        if poison:
            bad = SamplingParams(min_tokens=3, max_tokens=6)
            object.__setattr__(bad, "stop_token_ids", [10**6])  # what check_prompt refuses
            engine.scheduler.add(Request("bad", [5, 6, 7], bad, seed=1))
        while engine.has_unfinished():
            engine.step()
        assert engine.bm.num_free_blocks == engine.bm.num_blocks
        return [r.seqs[0].output_token_ids for r in reqs], engine.failed

    clean, none = run(poison=False)
    contained, failed = run(poison=True)
    assert contained == clean and none == []
    assert [rid for rid, _ in failed] == ["bad"] and "IndexError" in failed[0][1]


def test_an_engine_fault_is_not_blamed_on_requests(tiny_checkpoint):
    """When every request of a step fails alone, the fault is the engine's: step() raises."""
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(make_engine_parts(tiny_checkpoint("llama")))
    for i in range(2):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=3), request_id=f"r{i}")

    def broken(chunks):
        raise RuntimeError("device lost")

    engine.parts.runner.execute = broken
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert engine.failed == []
