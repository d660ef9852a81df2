"""Tiny random Hugging Face checkpoints, written with transformers itself: tests, demos and
CI exercise the real loader and tokenizer on real files without any download.

`make_tiny_checkpoint(dir, arch=...)` writes config.json, model.safetensors and a small
byte-level BPE tokenizer trained on a fixed text. Weights are drawn with a larger spread than
transformers' default init so that logits are well separated: greedy comparisons against
transformers then test the math, not near-ties.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ARCHS = ("llama", "llama3", "qwen2", "mistral")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A prefill worker computes the KV cache of a
prompt and samples the first token; a decode worker continues with continuous batching.
Blocks of sixteen tokens move between pools. Hello, world! How are you today? 0123456789
Serving engineers measure time to first token, inter-token latency and goodput under load.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str = "llama", **overrides: Any):
    """A transformers config object of the given family, tiny but with GQA and >1 layer."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    common: dict[str, Any] = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, initializer_range=0.25,
    )
    if arch == "llama":
        common.update(rope_theta=10000.0)
    if arch == "llama3":
        # original context 64 < the prompts the tests use, so llama3 scaling matters
        common.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    common.update(overrides)
    if arch in ("llama", "llama3"):
        return LlamaConfig(**common)
    if arch == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        return Qwen2Config(**common)
    common.setdefault("sliding_window", 4096)  # wider than max_model_len: plain attention
    return MistralConfig(**common)


def make_tiny_checkpoint(
    path: str | os.PathLike, arch: str = "llama", seed: int = 0, with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a random checkpoint of `arch` to `path` (fp32 safetensors) and return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)  # not all-ones: a wrong norm weight must show
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    if with_tokenizer:
        _train_tokenizer(config.vocab_size).save_pretrained(out)
    return out
