"""Llama-family decoder (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral) over the paged KV cache.

One class serves all three: they differ only in config (qkv bias, tied embeddings, rope
scaling), which `ModelConfig` resolves. Tokens of the whole batch are packed into one
[T, hidden] tensor; `AttentionMetadata` says which sequence each token belongs to and where
its K/V lives. Every op goes through `KernelOps` so the same code runs the torch references
on CPU and Triton kernels on GPU.

Parameters use fused layouts (qkv_proj, gate_up_proj) for fewer, larger matmuls; the loader
maps Hugging Face's separate q/k/v and gate/up tensors into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve.engine.model_config import ModelConfig
from pdserve.engine.rope import cos_sin_cache
from pdserve.kernels.ops import KernelOps


@dataclass
class AttentionMetadata:
    """Where each token of a forward lives. Built by the model runner for one step.

    Prefill form (is_decode False): sequences' chunks packed back to back;
    query_start_loc [B+1], seq_lens [B] (cached tokens after this step), block_tables [B, nb].
    Decode form: one token per sequence, query_start_loc unused.
    slot_mapping [T]: where token t's K/V is written.
    """

    is_decode: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor | None
    max_query_len: int
    max_seq_len: int


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ops: KernelOps,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # rotate q and k, write k and v into the cache (one kernel on the GPU); k is cached only
        q = ops.rotary_write_kv(q, k, v, positions, rope[0], rope[1], kv_cache, self.layer,
                                meta.slot_mapping)
        if meta.is_decode:
            out = ops.decode_attention(
                q, kv_cache, self.layer, meta.block_tables, meta.seq_lens, self.scale,
                meta.max_seq_len,
            )
        else:
            out = ops.prefill_attention(
                q, kv_cache, self.layer, meta.block_tables, meta.query_start_loc,
                meta.seq_lens, self.scale, meta.max_query_len, meta.max_seq_len,
            )
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class RMSNormWeight(nn.Module):
    """Holds the weight; the op (with the fused residual add) is `ops.rms_norm`."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        meta: AttentionMetadata, kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        ops: KernelOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # residual stream: r = r + f(norm(r)); the add is fused into the next norm
        n = self.input_layernorm
        x, residual = ops.rms_norm(x, n.weight, n.eps, residual)
        x = self.self_attn(x, positions, meta, kv_cache, rope, ops)
        n = self.post_attention_layernorm
        x, residual = ops.rms_norm(x, n.weight, n.eps, residual)
        return self.mlp(x, ops), residual


class CausalLM(nn.Module):
    """The whole model: embeddings, decoder layers, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init(max_positions)

    def post_init(self, max_positions: int) -> None:
        """Tie the head to the embedding and build the rotary caches on the model's device.
        Called again after the model moves off the meta device or changes dtype: moves can
        untie parameters, and the caches must stay fp32."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = cos_sin_cache(cfg.rope, cfg.head_dim, max_positions,
                                 device=self.embed_tokens.weight.device)
        # fp32 caches, not parameters: the loader never touches them
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_cache: torch.Tensor, ops: KernelOps,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normed)."""
        x = self.embed_tokens(input_ids)
        residual = None
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta, kv_cache, rope, ops)
        x, _ = ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        return self.lm_head(hidden).float()
