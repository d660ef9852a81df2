"""Attention over the paged, block-major KV cache: prefill (variable-length chunks with prior
context) and decode (one query per sequence). Both read K/V of a layer through the sequence's
block table; the new tokens' K/V are already written (`write_kv`) before these run.

References gather each sequence's blocks into a padded [B, max_seq_len] view and run a masked
softmax for the whole batch at once: no per-sequence loop, exact fp32 math, O(B * L) memory.
"""

from __future__ import annotations

import torch


def _gather_kv(
    kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of `layer` for each sequence: [B, max_seq_len, Hkv, D] (tail beyond a sequence's
    length is whatever its padded blocks hold; callers mask it)."""
    block_size = kv_cache.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    kv = kv_cache[tables, layer]  # [B, nb, 2, bs, Hkv, D]
    B, nb, _, bs, H, D = kv.shape
    k = kv[:, :, 0].reshape(B, nb * bs, H, D)[:, :max_seq_len]
    v = kv[:, :, 1].reshape(B, nb * bs, H, D)[:, :max_seq_len]
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], mask [B, Sq, Sk] (True = attend) -> [B, Sq, Hq, D]."""
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv  # GQA: query heads [h * group, (h + 1) * group) read KV head h
    qg = q.view(B, Sq, Hkv, group, D).permute(0, 2, 3, 1, 4).float()  # [B, Hkv, G, Sq, D]
    kt = k.permute(0, 2, 3, 1).float().unsqueeze(2)  # [B, Hkv, 1, D, Sk]
    scores = torch.matmul(qg, kt) * scale  # [B, Hkv, G, Sq, Sk], fp32
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).float().unsqueeze(2))  # [B, Hkv, G, Sq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, Sq, Hq, D).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    max_query_len: int, max_seq_len: int,
) -> torch.Tensor:
    """Causal attention for a batch of variable-length chunks.

    q [T, Hq, D]: the chunks' queries packed back to back; sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1] and has seq_lens[b] tokens in the cache in all
    (its prior context plus this chunk). Query i of sequence b sits at position
    seq_lens[b] - q_len[b] + i and attends to cache positions <= that. Returns [T, Hq, D].
    """
    B = seq_lens.shape[0]
    T = q.shape[0]
    device = q.device
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    ctx_lens = seq_lens - q_lens
    seq_of_token = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=T)
    row_of_token = torch.arange(T, device=device) - query_start_loc[seq_of_token]
    q_pad = q.new_zeros(B, max_query_len, q.shape[1], q.shape[2])
    q_pad[seq_of_token, row_of_token] = q
    k, v = _gather_kv(kv_cache, layer, block_tables, max_seq_len)
    rows = torch.arange(max_query_len, device=device)
    cols = torch.arange(max_seq_len, device=device)
    mask = (cols[None, None, :] <= (ctx_lens[:, None, None] + rows[None, :, None])) & (
        cols[None, None, :] < seq_lens[:, None, None]
    )
    out = _attend(q_pad, k, v, mask, scale)
    return out[seq_of_token, row_of_token]


def decode_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int,
) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] attends to the seq_lens[b] cached tokens of its
    sequence (its own K/V included). Returns [B, Hq, D]."""
    k, v = _gather_kv(kv_cache, layer, block_tables, max_seq_len)
    cols = torch.arange(max_seq_len, device=q.device)
    mask = (cols[None, :] < seq_lens[:, None])[:, None, :]  # [B, 1, Sk]
    return _attend(q.unsqueeze(1), k, v, mask, scale).squeeze(1)
