"""Build an engine's parts from its config, once, at start: device, dtype, model, weights,
KV pool (sized from a memory budget), block manager, model runner, tokenizer.

Refuses to start with a message naming the option when the pieces cannot fit: a
max_model_len above the config's, or a KV pool that cannot hold one sequence of
max_model_len (an explicit max_model_len is refused; a defaulted one is capped and logged).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from pdserve.common import UserError
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.builtin_model import builtin_model_path
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_pool import DTYPES, KVPool, KVPoolSpec, bytes_per_block
from pdserve.engine.loader import init_dummy, load_safetensors
from pdserve.engine.model import CausalLM
from pdserve.engine.model_config import ModelConfig, resolve_max_model_len
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.tokenizer import Tokenizer, load_tokenizer
from pdserve.kernels.ops import get_ops

logger = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 1 << 30


class EngineSetupError(UserError, RuntimeError):
    """The engine cannot start with this configuration; the message says which option."""


@dataclass
class EngineParts:
    config: EngineConfig
    model_path: str
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    model: CausalLM
    pool: KVPool
    block_manager: BlockManager
    runner: ModelRunner
    sampler: Sampler
    tokenizer: Tokenizer | None


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineSetupError(f"--device {spec}: no CUDA device is available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise EngineSetupError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
        # make it the current device: kernels launch on, and CUDA graphs capture on, the
        # current device's stream (a graph captured on cuda:0 cannot hold cuda:1's kernels)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(spec: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cpu":
        return torch.float32  # exact reference path; bf16 matmuls are slow on CPU anyway
    dtype = DTYPES[model_config.dtype]
    return torch.bfloat16 if dtype == torch.float32 else dtype


def set_torch_threads(num: int | None) -> int:
    """Bound intra-op threads so several processes can share a small machine."""
    if num is None:
        num = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, int(num or 1)))
    return torch.get_num_threads()


def build_model(model_config: ModelConfig, cfg: EngineConfig, model_path: str,
                device: torch.device, dtype: torch.dtype, max_positions: int,
                progress: bool = True) -> CausalLM:
    """Allocate the model on `device` without initialising it, then load or draw weights."""
    with torch.device("meta"):
        model = CausalLM(model_config, max_positions)
    # cast on the meta device first: an 8B model never exists in fp32 on the GPU
    model = model.to(dtype).to_empty(device=device)
    model.post_init(max_positions)
    if cfg.load_format == "dummy":
        init_dummy(model, cfg.seed)
    else:
        load_safetensors(model, model_path, progress=progress)
    return model.eval()


def plan_kv_blocks(cfg: EngineConfig, model_config: ModelConfig, device: torch.device,
                   dtype: torch.dtype, max_model_len: int) -> int:
    """Number of KV blocks: the override, else the memory budget / bytes per block."""
    if cfg.num_gpu_blocks_override is not None:
        return cfg.num_gpu_blocks_override
    per_block = bytes_per_block(model_config.num_hidden_layers, cfg.block_size,
                                model_config.num_key_value_heads, model_config.head_dim, dtype)
    if cfg.kv_cache_memory_bytes is not None:
        budget = cfg.kv_cache_memory_bytes
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_kv_budget(cfg.gpu_memory_utilization, free, total,
                               torch.cuda.memory_allocated(device),
                               _activation_reserve(cfg, model_config, dtype), device)
    else:
        budget = CPU_KV_BUDGET_BYTES
        # on CPU never allocate more than the batch could ever use
        need = cfg.max_num_seqs * -(-max_model_len // cfg.block_size)
        budget = min(budget, need * per_block)
    return max(budget // per_block, 0)


def gpu_kv_budget(utilization: float, free: int, total: int, weights: int, activations: int,
                  device: torch.device | str = "cuda") -> int:
    """Bytes for the KV pool on a GPU. `utilization` is this engine's own share of the GPU
    (vLLM's meaning): its weights (`weights`, what torch holds now), its activations and its
    pool fit in utilization x total, whatever other processes hold; a share that is not
    free is a ValueError that says what to lower."""
    gib = 1 << 30
    budget = int(total * utilization) - weights - activations
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization} gives this worker {total * utilization / gib:.1f} "
            f"GiB of {device}'s {total / gib:.1f} GiB, which the weights ({weights / gib:.1f} GiB) "
            f"and activations ({activations / gib:.1f} GiB) leave no KV pool in: raise it")
    if budget + activations > free:
        raise ValueError(
            f"--gpu-memory-utilization {utilization} asks for {budget / gib:.1f} GiB of KV pool "
            f"(+{activations / gib:.1f} GiB of activations) on {device}, but only "
            f"{free / gib:.1f} GiB of its {total / gib:.1f} GiB is free (other processes hold "
            f"{(total - free - weights) / gib:.1f} GiB): lower --gpu-memory-utilization (local "
            f"workers on one GPU split it by default) or set --kv-cache-memory-bytes")
    return budget


def _activation_reserve(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> int:
    """A conservative bound on one step's activations (the kernels issue replaces it with a
    profiled peak)."""
    itemsize = dtype.itemsize
    t = cfg.max_num_batched_tokens
    per_token = (4 * mc.hidden_size + 3 * mc.intermediate_size
                 + (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim) * itemsize
    logits = cfg.max_num_seqs * mc.vocab_size * 4 * 3
    return 2 * t * per_token + logits + (256 << 20)


def build_engine(cfg: EngineConfig, progress: bool = True,
                 pool_shm_epoch: int | None = None) -> EngineParts:
    """Everything an engine needs, or an EngineSetupError naming what to change.
    `pool_shm_epoch` puts a CPU pool in a /dev/shm file (P, for the shm transport)."""
    set_torch_threads(cfg.torch_threads)
    model_path = cfg.model if cfg.model is not None else str(builtin_model_path())
    model_config = ModelConfig.from_pretrained(model_path)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, model_config, device)
    max_model_len, note = resolve_max_model_len(model_config, cfg.max_model_len)
    if note:
        logger.warning(note)
    tokenizer = None
    if not cfg.skip_tokenizer_init:
        tokenizer = load_tokenizer(cfg.tokenizer or model_path)
        if tokenizer is not None and len(tokenizer) > model_config.vocab_size:
            raise EngineSetupError(
                f"tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
                f"{model_config.vocab_size}: wrong --tokenizer?")
    model = build_model(model_config, cfg, model_path, device, dtype, max_model_len, progress)
    num_blocks = plan_kv_blocks(cfg, model_config, device, dtype, max_model_len)
    capacity = num_blocks * cfg.block_size
    if capacity < max_model_len:
        if cfg.max_model_len is not None or capacity < cfg.block_size:
            raise EngineSetupError(
                f"the KV pool holds {capacity} tokens ({num_blocks} blocks of {cfg.block_size}) "
                f"but max_model_len is {max_model_len}: lower --max-model-len or give the pool "
                "more memory (--kv-cache-memory-bytes / --gpu-memory-utilization)")
        logger.warning("max_model_len capped from %d to %d: the KV pool holds %d tokens",
                       max_model_len, capacity, capacity)
        max_model_len = capacity
    spec = KVPoolSpec(num_blocks, model_config.num_hidden_layers, cfg.block_size,
                      model_config.num_key_value_heads, model_config.head_dim, dtype)
    pool = KVPool(spec, device, shm_epoch=pool_shm_epoch if device.type == "cpu" else None)
    ops = get_ops(cfg.kernel_backend, device.type)
    runner = ModelRunner(model, pool, ops, max_num_seqs=min(cfg.max_num_seqs, 512),
                         max_model_len=max_model_len)
    if device.type == "cuda" and not cfg.enforce_eager:
        t0 = time.monotonic()
        runner.capture_decode_graphs(cfg.max_num_seqs, max_model_len)
        logger.info("captured %d decode CUDA graphs in %.1f s", len(runner.graphs),
                    time.monotonic() - t0)
    logger.info("engine: %s on %s in %s, max_model_len %d, ops %s", model_config.architecture,
                device, str(dtype).removeprefix("torch."), max_model_len, ops.name)
    return EngineParts(
        config=cfg, model_path=model_path, model_config=model_config, device=device, dtype=dtype,
        max_model_len=max_model_len, model=model, pool=pool,
        block_manager=BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching),
        runner=runner, sampler=Sampler(_race_for(device), logprobs_mode=cfg.logprobs_mode),
        tokenizer=tokenizer,
    )


def _race_for(device: torch.device):
    """The exponential-race draw: the fused Triton kernel on GPU, the reference on CPU
    (bit-equal uniforms either way)."""
    from pdserve.kernels import sampling

    return sampling.exponential_race if device.type == "cuda" else sampling.exponential_race_ref
