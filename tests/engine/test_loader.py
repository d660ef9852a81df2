"""Weight loading: sharded checkpoints, dtype casts, tied heads, dummy weights."""

from __future__ import annotations

import copy

import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.loader import checkpoint_files
from pdserve.tiny import make_tiny_checkpoint
from tests.factories import hf_model, make_engine_parts, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def greedy(path, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=64, **kwargs)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([9, 20], 512, seed=11)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint, tmp_path):
    single = tiny_checkpoint("llama")
    model = hf_model(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert len(checkpoint_files(sharded)) > 2 and (sharded / "model.safetensors.index.json").exists()
    a = make_engine_parts(single).model.state_dict()
    b = make_engine_parts(sharded).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_checkpoint_is_cast_to_the_engine_dtype(tmp_path, tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path / "bf16", arch="llama")
    m = copy.deepcopy(hf_model(tiny_checkpoint("llama"))).to(torch.bfloat16)  # cached: copy
    m.save_pretrained(path)
    parts = make_engine_parts(path)
    assert parts.dtype == torch.float32  # CPU auto dtype: fp32 whatever the checkpoint holds
    w = parts.model.layers[0].mlp.down_proj.weight
    ref = m.model.layers[0].mlp.down_proj.weight.float()
    assert torch.equal(w, ref)


def test_tied_head_shares_the_embedding(tiny_checkpoint):
    parts = make_engine_parts(tiny_checkpoint("qwen2"))
    assert parts.model_config.tie_word_embeddings
    assert parts.model.lm_head.weight.data_ptr() == parts.model.embed_tokens.weight.data_ptr()


def test_qkv_and_gate_up_are_stacked_in_order(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    ours = make_engine_parts(path).model.layers[1]
    ref = hf_model(path).model.layers[1]
    want = torch.cat([ref.self_attn.q_proj.weight, ref.self_attn.k_proj.weight,
                      ref.self_attn.v_proj.weight])
    assert torch.equal(ours.self_attn.qkv_proj.weight, want)
    want_b = torch.cat([ref.self_attn.q_proj.bias, ref.self_attn.k_proj.bias,
                        ref.self_attn.v_proj.bias])
    assert torch.equal(ours.self_attn.qkv_proj.bias, want_b)
    assert torch.equal(ours.mlp.gate_up_proj.weight,
                       torch.cat([ref.mlp.gate_proj.weight, ref.mlp.up_proj.weight]))


def test_dummy_weights_are_seeded_random_and_never_zero(tiny_checkpoint, tmp_path):
    # dummy needs only config.json
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((tiny_checkpoint("llama3") / "config.json").read_text())
    a = make_engine_parts(cfg_only, load_format="dummy", seed=3).model
    b = make_engine_parts(cfg_only, load_format="dummy", seed=3).model
    c = make_engine_parts(cfg_only, load_format="dummy", seed=4).model
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
        assert (pa != 0).float().mean() > 0.999, name
        assert torch.isfinite(pa).all(), name
    out = greedy(cfg_only, load_format="dummy", skip_tokenizer_init=True)
    assert all(len(t) == 8 for t in out)
