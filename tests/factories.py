"""Factories shared by tests: tiny checkpoints, engines, prompts."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from pdserve.engine.config import EngineConfig
from pdserve.engine.setup import EngineParts, build_engine


def make_engine_parts(path: str | Path, **kwargs) -> EngineParts:
    """An engine on CPU in fp32 with a small pool (256 blocks unless told otherwise)."""
    kwargs.setdefault("num_gpu_blocks_override", 256)
    kwargs.setdefault("device", "cpu")
    return build_engine(EngineConfig(model=str(path), **kwargs), progress=False)


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts of the given lengths (ids >= 2: clear of bos/eos of the tiny models)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


@cache
def hf_model(path: Path):
    """The transformers model of a checkpoint, fp32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
