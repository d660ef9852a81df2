"""Build an engine's parts from its config, once, at start: device, dtype, model, weights,
KV pool (sized from a memory budget), block manager, model runner, tokenizer.

Refuses to start with a message naming the option when the pieces cannot fit: a
max_model_len above the config's, a KV pool that cannot hold one sequence of max_model_len
(an explicit max_model_len is refused; a defaulted one is capped and logged), or a
--tensor-parallel-size that does not divide the heads or the MLP.

Tensor parallel (`engine/parallel.py`): `prepare` and `build_shard` are what every rank
runs alike; `build_engine` is rank 0 (it starts the others before building its shard).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

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
from pdserve.engine.parallel import TPGroup, TPLeader
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
    tp: TPLeader | None = None  # tensor parallel: the other ranks, stopped by close()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (idempotent; nothing to do without them)."""
        if self.tp is not None:
            self.tp.close()


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


def set_torch_threads(num: int | None, share: int = 1) -> int:
    """Bound intra-op threads so several processes can share a small machine. Unset: the
    cores this process may use, split between `share` processes (tensor-parallel ranks)."""
    if num is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num = (cores or 1) // share
    torch.set_num_threads(max(1, int(num or 1)))
    return torch.get_num_threads()


def build_model(model_config: ModelConfig, cfg: EngineConfig, model_path: str,
                device: torch.device, dtype: torch.dtype, max_positions: int,
                progress: bool = True, tp: TPGroup | None = None) -> CausalLM:
    """Allocate the model (this rank's shard under `tp`) on `device` without initialising
    it, then load or draw weights."""
    with torch.device("meta"):
        model = CausalLM(model_config, max_positions, tp)
    # cast on the meta device first: an 8B model never exists in fp32 on the GPU
    model = model.to(dtype).to_empty(device=device)
    model.post_init(max_positions)
    if cfg.load_format == "dummy":
        init_dummy(model, cfg.seed)
    else:
        load_safetensors(model, model_path, progress=progress)
    return model.eval()


def plan_kv_blocks(cfg: EngineConfig, model_config: ModelConfig, device: torch.device,
                   dtype: torch.dtype, max_model_len: int, tp_size: int = 1) -> int:
    """Number of KV blocks: the override, else the memory budget / bytes per block (a
    tensor-parallel rank's blocks hold its 1/tp_size of the KV heads)."""
    if cfg.num_gpu_blocks_override is not None:
        return cfg.num_gpu_blocks_override
    per_block = bytes_per_block(model_config.num_hidden_layers, cfg.block_size,
                                model_config.num_key_value_heads // tp_size,
                                model_config.head_dim, dtype)
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


@dataclass(frozen=True)
class RankSetup:
    """What every tensor-parallel rank derives from the config alike (rank 0 and followers)."""

    config: EngineConfig
    model_path: str
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    max_model_len_note: str | None


def prepare(cfg: EngineConfig, device: str | None = None) -> RankSetup:
    """Threads, model config, device (`device` overrides cfg.device: a follower's GPU),
    dtype and max_model_len; EngineSetupError when the model cannot be split as asked."""
    tp = cfg.tensor_parallel_size
    set_torch_threads(cfg.torch_threads, share=tp)
    model_path = cfg.model if cfg.model is not None else str(builtin_model_path())
    model_config = ModelConfig.from_pretrained(model_path)
    problem = model_config.tensor_parallel_problem(tp)
    if problem:
        raise EngineSetupError(f"--tensor-parallel-size: {problem}")
    dev = resolve_device(device or cfg.device)
    if tp > 1 and device is None and dev.type == "cuda" \
            and dev.index + tp > torch.cuda.device_count():
        raise EngineSetupError(
            f"--tensor-parallel-size {tp} from {dev} needs GPUs {dev.index}..{dev.index + tp - 1}"
            f" but there are {torch.cuda.device_count()}")
    dtype = resolve_dtype(cfg.dtype, model_config, dev)
    max_model_len, note = resolve_max_model_len(model_config, cfg.max_model_len)
    return RankSetup(cfg, model_path, model_config, dev, dtype, max_model_len, note)


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Each rank's device: the CPU for all, or consecutive GPUs from rank 0's."""
    if device.type != "cuda":
        return [device] * size
    return [torch.device("cuda", device.index + r) for r in range(size)]


def build_shard(s: RankSetup, progress: bool = True, tp: TPGroup | None = None,
                leader: TPLeader | None = None, pool_shm_epoch: int | None = None
                ) -> tuple[CausalLM, KVPool, ModelRunner, int]:
    """One rank's model (its shard under `tp`), KV pool (its KV heads), runner and the
    max_model_len the pool allows. Every rank of a group calls it at once: the block count
    is agreed on (the smallest), and CUDA graph capture runs the model's collectives."""
    cfg, mc = s.config, s.model_config
    size = tp.size if tp is not None else 1
    model = build_model(mc, cfg, s.model_path, s.device, s.dtype, s.max_model_len, progress, tp)
    num_blocks = plan_kv_blocks(cfg, mc, s.device, s.dtype, s.max_model_len, size)
    if tp is not None:
        num_blocks = tp.min_int(num_blocks)  # one block manager: the same ids on every rank
    max_model_len = s.max_model_len
    capacity = num_blocks * cfg.block_size
    if capacity < max_model_len:
        if cfg.max_model_len is not None or capacity < cfg.block_size:
            raise EngineSetupError(
                f"the KV pool holds {capacity} tokens ({num_blocks} blocks of {cfg.block_size}) "
                f"but max_model_len is {max_model_len}: lower --max-model-len or give the pool "
                "more memory (--kv-cache-memory-bytes / --gpu-memory-utilization)")
        if tp is None or tp.rank == 0:
            logger.warning("max_model_len capped from %d to %d: the KV pool holds %d tokens",
                           max_model_len, capacity, capacity)
        max_model_len = capacity
    spec = KVPoolSpec(num_blocks, mc.num_hidden_layers, cfg.block_size,
                      mc.num_key_value_heads // size, mc.head_dim, s.dtype)
    if tp is None:
        pool = rank_pool = KVPool(spec, s.device,
                                  shm_epoch=pool_shm_epoch if s.device.type == "cpu" else None)
    else:
        pool, rank_pool = _tp_pools(spec, s.device, tp, leader, pool_shm_epoch)
    ops = get_ops(cfg.kernel_backend, s.device.type)
    runner = ModelRunner(model, rank_pool, ops, max_num_seqs=min(cfg.max_num_seqs, 512),
                         max_model_len=max_model_len, leader=leader)
    if s.device.type == "cuda" and not cfg.enforce_eager:
        t0 = time.monotonic()
        runner.capture_decode_graphs(cfg.max_num_seqs, max_model_len)
        logger.info("captured %d decode CUDA graphs in %.1f s", len(runner.graphs),
                    time.monotonic() - t0)
    return model, pool, runner, max_model_len


SHARED_POOL_KEY = "kv_pool_file"  # rank 0 -> the others, in the group's store: path or ""


def _tp_pools(spec: KVPoolSpec, device: torch.device, tp: TPGroup, leader: TPLeader | None,
              shm_epoch: int | None) -> tuple[KVPool, KVPool]:
    """(the engine's pool, this rank's pool) under tensor parallelism. With `shm_epoch` (rank
    0 of a P/D worker, CPU) the pool is one /dev/shm file holding every KV head in the tp=1
    layout: rank 0 makes it and puts its path in the store, the others map it, and each
    rank's attention gets a view of its heads (`KVPool.head_shard`); the engine's pool is
    the whole file (what kv_transfer moves and the compat record describes), and a fork's
    block copy on rank 0 copies every rank's heads at once. Without it (offline engines, or
    GPUs) each rank allocates its own heads and rank 0 mirrors fork copies down the pipe."""
    full_spec = replace(spec, num_kv_heads=spec.num_kv_heads * tp.size)
    if tp.rank == 0:
        full = KVPool(full_spec, device, shm_epoch=shm_epoch) if shm_epoch is not None else None
        tp.store.set(SHARED_POOL_KEY, str(full.shm_path) if full is not None else "")
    else:  # rank 0 set it after the block count was agreed (min_int above)
        path = tp.store.get(SHARED_POOL_KEY).decode()
        full = KVPool.attach(path, full_spec) if path else None
    if full is None:
        pool = KVPool(spec, device, mirror=leader.send_copies if leader is not None else None)
        return pool, pool
    # rank r's KV heads are the r-th slice: the column-parallel qkv_proj's order (model.py)
    start = tp.rank * spec.num_kv_heads
    return full, full.head_shard(start, start + spec.num_kv_heads)


def build_engine(cfg: EngineConfig, progress: bool = True,
                 pool_shm_epoch: int | None = None) -> EngineParts:
    """Everything an engine needs, or an EngineSetupError naming what to change.
    `pool_shm_epoch` puts a CPU pool in a /dev/shm file (P, for the shm transport).
    With tensor_parallel_size N > 1 this process is rank 0 and starts the other N - 1
    (`engine/parallel.py`); `EngineParts.close()` stops them. Both together (a P/D worker)
    make one pool file of every rank's heads (`_tp_pools`): CPU only for now."""
    s = prepare(cfg)
    if cfg.tensor_parallel_size > 1 and pool_shm_epoch is not None and s.device.type != "cpu":
        raise EngineSetupError(
            f"--tensor-parallel-size {cfg.tensor_parallel_size} on {s.device}: P/D workers shard "
            "a model on the CPU only for now (moving the KV of GPU shards, cuda_ipc or tcp, is "
            "not built yet); `pdserve generate` and LLM(tensor_parallel_size=N) run on GPUs")
    if s.max_model_len_note:
        logger.warning(s.max_model_len_note)
    model_config = s.model_config
    tokenizer = None
    if not cfg.skip_tokenizer_init:
        tokenizer = load_tokenizer(cfg.tokenizer or s.model_path)
        if tokenizer is not None and len(tokenizer) > model_config.vocab_size:
            raise EngineSetupError(
                f"tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
                f"{model_config.vocab_size}: wrong --tokenizer?")
    leader = None
    if cfg.tensor_parallel_size > 1:
        leader = TPLeader.start(cfg, rank_devices(s.device, cfg.tensor_parallel_size))
    try:
        model, pool, runner, max_model_len = build_shard(
            s, progress, leader.group if leader else None, leader, pool_shm_epoch)
    except BaseException as e:
        if leader is None:
            raise
        dead = leader.exited()
        leader.close()
        if dead and not isinstance(e, UserError):
            raise EngineSetupError(f"tensor parallelism: {dead} while the engine started "
                                   "(its log is above)") from e
        raise
    logger.info("engine: %s on %s in %s, max_model_len %d, ops %s%s", model_config.architecture,
                s.device, str(s.dtype).removeprefix("torch."), max_model_len, runner.ops.name,
                f", tensor parallel over {cfg.tensor_parallel_size} ranks" if leader else "")
    return EngineParts(
        config=cfg, model_path=s.model_path, model_config=model_config, device=s.device,
        dtype=s.dtype, max_model_len=max_model_len, model=model, pool=pool,
        block_manager=BlockManager(pool.spec.num_blocks, cfg.block_size,
                                   cfg.enable_prefix_caching),
        runner=runner, sampler=Sampler(_race_for(s.device), logprobs_mode=cfg.logprobs_mode),
        tokenizer=tokenizer, tp=leader,
    )


def _race_for(device: torch.device):
    """The exponential-race draw: the fused Triton kernel on GPU, the reference on CPU
    (bit-equal uniforms either way)."""
    from pdserve.kernels import sampling

    return sampling.exponential_race if device.type == "cuda" else sampling.exponential_race_ref
