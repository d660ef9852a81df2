"""The engine's configuration: options every engine role (generate, prefill, decode, both)
shares. Role configs extend `EngineConfig` (the workers' `service/config.py`, the proxy's
`pdserve/serve.py`); the builder in `pdserve/config.py` fills them from flags > PDSERVE_*
environment > --config YAML > these defaults. Flag names follow vLLM's where the meaning is
the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.common.options import option


def _positive(v: int | float | None) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def _block_size(v: int) -> str | None:
    if v < 16 or v & (v - 1):
        return "must be a power of two >= 16"
    return None


def _fraction(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _device(v: str) -> str | None:
    if v in ("auto", "cpu", "cuda") or v.isdigit():
        return None
    if v.startswith("cuda:") and v[5:].isdigit():
        return None
    return "must be auto, cpu, cuda, cuda:N or a GPU index N"


@dataclass(frozen=True)
class EngineConfig:
    """Model, memory and batching options of one engine."""

    model: str | None = option(None, help="Local Hugging Face checkpoint directory (config.json "
                               "+ *.safetensors). No hub downloads. Default: the built-in tiny "
                               "model, generated locally on first use.", metavar="PATH")
    tokenizer: str | None = option(None, help="Tokenizer directory (default: the model's).",
                                   metavar="PATH")
    skip_tokenizer_init: bool = option(False, help="Token-ids-only mode: no tokenizer; prompts "
                                       "must be token ids.")
    load_format: Literal["auto", "safetensors", "dummy"] = option(
        "auto", help="auto/safetensors read the checkpoint; dummy makes seeded random-normal "
        "weights for the config (benchmarks).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Weight and activation dtype. auto: float32 on CPU; on GPU the config's "
        "dtype (bfloat16 if that is float32).")
    seed: int = option(0, help="Seed of dummy weights and of requests that bring none.")
    max_model_len: int | None = option(None, check=_positive, help="Longest sequence (prompt + "
                                       "output). Default: the config's max_position_embeddings, "
                                       "capped to what the KV pool holds.")
    block_size: int = option(16, check=_block_size, help="Tokens per KV block.")
    kv_cache_memory_bytes: int | None = option(
        None, check=_positive, help="Bytes for the KV pool. Default: 1 GiB on CPU; on GPU "
        "what --gpu-memory-utilization leaves after weights and activations.")
    gpu_memory_utilization: float = option(
        0.9, check=_fraction, help="Fraction of the GPU's memory this worker may use for its "
        "weights, activations and KV pool: its own share, as in vLLM (other processes' memory "
        "does not count against it, but must leave it free). A local cluster splits the "
        "default between workers that share a GPU.")
    num_gpu_blocks_override: int | None = option(None, check=_positive,
                                                 help="Exact number of KV blocks (tests).")
    max_num_seqs: int = option(256, check=_positive, help="Most sequences in one step.")
    max_num_batched_tokens: int = option(2048, check=_positive,
                                         help="Most tokens in one step (long prompts are chunked).")
    mixed_step_tokens: int | None = option(
        None, check=_positive, help="Most tokens in a step that also decodes running streams "
        "(their tokens first, prompt chunks fill the rest; capped at --max-num-batched-tokens); "
        "a step with no stream decoding takes up to --max-num-batched-tokens. Unset: one "
        "budget for both. A both-role worker keeps its decode steps short (the ITL its "
        "streams see) and still prefills in large chunks while none decodes, as a P does.")
    enable_prefix_caching: bool = option(True, help="Reuse KV blocks of shared prompt prefixes.")
    device: str = option("auto", check=_device, help="auto, cpu, cuda, cuda:N or N (GPU index).")
    kernel_backend: Literal["auto", "torch", "triton"] = option(
        "auto", help="Ops implementation. auto: Triton kernels on CUDA, torch references on "
        "CPU; triton on CPU needs TRITON_INTERPRET=1 (tests).")
    enforce_eager: bool = option(False, help="Never use CUDA graphs (they replay decode steps "
                                 "on GPU; capture takes a few seconds at start).")
    async_scheduling: Literal["auto", "on", "off"] = option(
        "auto", help="Asynchronous decode steps: the host schedules and launches step N+1 "
        "while the GPU runs step N, feeding N's sampled tokens back on the device (rows with "
        "penalties, logprobs, token masks or logit_bias, and steps that admit or join "
        "requests, run synchronously). auto: on with CUDA, off on the CPU (no overlap "
        "there). Tokens are the same either way.")
    tensor_parallel_size: int = option(
        1, check=_positive, help="Split the model over N ranks, one process each (this one "
        "is rank 0; NCCL over N GPUs from --device on, gloo on the CPU): each holds its own "
        "attention and KV heads, MLP slice and vocabulary slice, and its KV heads of the "
        "pool. P/D workers (serve, prefill, decode, worker): on the CPU only for now, their "
        "ranks sharing one /dev/shm pool, so P and D of any two sizes exchange KV.")
    torch_threads: int | None = option(None, check=_positive,
                                       help="torch intra-op threads (default: the cores this "
                                       "process may use, split between tensor-parallel ranks).")
    logprobs_mode: Literal["raw_logprobs", "raw_logits", "processed_logprobs",
                           "processed_logits"] = option(
        "raw_logprobs", help="What `logprobs` report (vLLM's names): raw_* the model's own "
        "distribution, before penalties, biases, masks, temperature and top-k/top-p; "
        "processed_* the one each token was drawn from; *_logits the values before "
        "log-softmax. Prompt logprobs are always raw_logprobs.")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", help="Log level.")
