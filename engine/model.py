"""Llama-family decoder (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral) over the paged KV cache.

One class serves all three: they differ only in config (qkv bias, tied embeddings, rope
scaling), which `ModelConfig` resolves. Tokens of the whole batch are packed into one
[T, hidden] tensor; `AttentionMetadata` says which sequence each token belongs to and where
its K/V lives. Every op goes through `KernelOps` so the same code runs the torch references
on CPU and Triton kernels on GPU.

Parameters use fused layouts (qkv_proj, gate_up_proj) for fewer, larger matmuls; the loader
maps Hugging Face's separate q/k/v and gate/up tensors into them.

Tensor parallel (`tp`, a `TPGroup`; `engine/parallel.py`): every module holds this rank's
shard (its heads, MLP columns, vocabulary rows) and the sums across ranks are explicit:
one all-reduce after o_proj, one after down_proj, one after the embedding lookup, and the
logit slices gathered on rank 0. Without `tp` nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pdserve.engine.model_config import ModelConfig
from pdserve.engine.rope import cos_sin_cache
from pdserve.kernels.attention import dense_prefill_wanted
from pdserve.kernels.ops import KernelOps

if TYPE_CHECKING:
    from pdserve.engine.parallel import TPGroup


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
    # prefill of fresh sequences only (each chunk from position 0): their lengths, on the
    # host (the step may take dense_prefill_attention); None otherwise
    fresh_lens: tuple[int, ...] | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None):
        super().__init__()
        self.layer = layer
        self.tp = tp
        # column-parallel qkv: this rank's query heads and KV heads (tensor_parallel_problem
        # checked they divide); row-parallel o_proj (its bias on rank 0 only: the loader)
        size = tp.size if tp is not None else 1
        self.num_heads = cfg.num_attention_heads // size
        self.num_kv_heads = cfg.num_key_value_heads // size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self, qkv: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ops: KernelOps,
    ) -> torch.Tensor:
        """qkv: this layer's qkv projection [T, q + 2 kv] (the decoder layer computes it
        with the norm fused in) -> the o_proj output [T, hidden]."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # rotate q and k, write k and v into the cache (k is cached only), attend: at decode
        # one kernel on the GPU, at prefill the rotation + write kernel, then attention
        if meta.is_decode:
            out = ops.rotary_decode_attention(
                q, k, v, positions, rope[0], rope[1], kv_cache, self.layer, meta.slot_mapping,
                meta.block_tables, meta.seq_lens, self.scale, meta.max_seq_len,
            )
        elif ops.dense_prefill_attention is not None and dense_prefill_wanted(meta.fresh_lens,
                                                                               q.device):
            q, k = ops.rotary_write_kv(q, k, v, positions, rope[0], rope[1], kv_cache,
                                       self.layer, meta.slot_mapping, return_k=True)
            out = ops.dense_prefill_attention(q, k, v, meta.fresh_lens, self.scale)
        else:
            q = ops.rotary_write_kv(q, k, v, positions, rope[0], rope[1], kv_cache, self.layer,
                                    meta.slot_mapping)
            out = ops.prefill_attention(
                q, kv_cache, self.layer, meta.block_tables, meta.query_start_loc,
                meta.seq_lens, self.scale, meta.max_query_len, meta.max_seq_len,
            )
        out = ops.linear(out.reshape(T, self.q_size), self.o_proj.weight, self.o_proj.bias)[0]
        return out if self.tp is None else self.tp.all_reduce(out)  # sum over the ranks' heads


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size // (tp.size if tp is not None else 1)  # this rank's slice
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, gate_up: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        """gate_up: the gate_up projection [T, 2 I] (computed with the norm fused in) ->
        down(silu(gate) * up) [T, hidden], the SiLU-and-mul fused into the down projection."""
        out = ops.linear(gate_up, self.down_proj.weight, None, prologue="silu")[0]
        return out if self.tp is None else self.tp.all_reduce(out)  # sum over the ranks' slices


class RMSNormWeight(nn.Module):
    """Holds the weight; the op (with the fused residual add) is `ops.rms_norm`."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None):
        super().__init__()
        self.input_layernorm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, tp)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        meta: AttentionMetadata, kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        ops: KernelOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # residual stream: r = r + f(norm(r)); the add and the norm are fused into the next
        # projection (ops.linear's "norm" prologue: one launch at decode's few rows)
        n, attn, mlp = self.input_layernorm, self.self_attn, self.mlp
        qkv, residual = ops.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias, prologue="norm",
                                   residual=residual, norm_weight=n.weight, eps=n.eps)
        x = attn(qkv, positions, meta, kv_cache, rope, ops)
        n = self.post_attention_layernorm
        gate_up, residual = ops.linear(x, mlp.gate_up_proj.weight, None, prologue="norm",
                                       residual=residual, norm_weight=n.weight, eps=n.eps)
        return mlp(gate_up, ops), residual


class CausalLM(nn.Module):
    """The whole model: embeddings, decoder layers, final norm, LM head. Under `tp` the
    embedding and the head hold this rank's vocabulary rows [vocab_start, vocab_start +
    vocab_rows), the last rank's padded with zero rows."""

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.vocab_rows, self.vocab_start = cfg.vocab_size, 0
        if tp is not None:
            from pdserve.engine.parallel import vocab_shard

            self.vocab_rows, self.vocab_start, _ = vocab_shard(cfg.vocab_size, tp.size, tp.rank)
        self.embed_tokens = nn.Embedding(self.vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNormWeight(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, self.vocab_rows, bias=False)
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
        x = self.embed_tokens(input_ids) if self.tp is None else self._embed_shard(input_ids)
        residual = None
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta, kv_cache, rope, ops)
        x, _ = ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)
        return x

    def _embed_shard(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: this rank's rows, zeros for ids it does not hold, summed
        over the ranks (one row and zeros: exact)."""
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        x = self.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32 (tensor parallel: on rank 0; the
        other ranks get their own slice back)."""
        logits = self.lm_head(hidden).float()
        if self.tp is None:
            return logits
        return self.tp.gather_logits(logits, self.config.vocab_size)
