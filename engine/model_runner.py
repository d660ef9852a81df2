"""Model runner: turns one step's chunks into tensors, runs the model, returns logits.

It owns no policy: the scheduler decides which tokens run and which blocks they use; the
runner only builds `AttentionMetadata`, calls the model and picks the rows that want logits.
A step whose chunks are all single tokens takes the decode path (paged decode attention);
anything else takes the prefill path (variable-length chunks over prior context), which also
accepts single-token chunks, so mixed batches are fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model import AttentionMetadata, CausalLM
from pdserve.kernels.ops import KernelOps


@dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence runs in this step.

    token_ids: the new tokens (a prefill chunk, or the one token to decode);
    start_pos: how many of the sequence's tokens are already in the KV cache;
    block_table: the sequence's block ids, covering start_pos + len(token_ids) slots;
    num_logits: how many trailing tokens of the chunk want logits (0 for a non-final
    prefill chunk, 1 for the last chunk or a decode, len(token_ids) for prompt logprobs).
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    num_logits: int = 1


class ModelRunner:
    """Runs forwards of one model over one KV pool. Not thread-safe; one step at a time."""

    def __init__(self, model: CausalLM, pool: KVPool, ops: KernelOps):
        self.model = model
        self.pool = pool
        self.ops = ops
        self.device = pool.device
        self.block_size = pool.spec.block_size

    def _metadata(self, chunks: Sequence[SeqChunk], is_decode: bool) -> tuple[
        torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor
    ]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logit_rows: list[int] = []
        max_blocks = 0
        for c in chunks:
            n = len(c.token_ids)
            if n == 0:
                raise ValueError("a chunk must hold at least one token")
            end = c.start_pos + n
            if len(c.block_table) * bs < end:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
            input_ids.extend(c.token_ids)
            pos = range(c.start_pos, end)
            positions.extend(pos)
            slots.extend(c.block_table[p // bs] * bs + p % bs for p in pos)
            logit_rows.extend(range(starts[-1] + n - c.num_logits, starts[-1] + n))
            starts.append(starts[-1] + n)
            seq_lens.append(end)
            max_blocks = max(max_blocks, -(-end // bs))
        tables = [list(c.block_table[:max_blocks]) + [0] * (max_blocks - len(c.block_table[:max_blocks]))
                  for c in chunks]

        def t(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=self.device)

        meta = AttentionMetadata(
            is_decode=is_decode,
            slot_mapping=t(slots),
            block_tables=t(tables),
            seq_lens=t(seq_lens),
            query_start_loc=None if is_decode else t(starts),
            max_query_len=max(len(c.token_ids) for c in chunks),
            max_seq_len=max(seq_lens),
        )
        return t(input_ids), t(positions), meta, t(logit_rows)

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run one step; returns fp32 logits [sum(num_logits), vocab] in chunk order."""
        if not chunks:
            raise ValueError("execute needs at least one chunk")
        is_decode = all(len(c.token_ids) == 1 for c in chunks)
        input_ids, positions, meta, logit_rows = self._metadata(chunks, is_decode)
        hidden = self.model(input_ids, positions, meta, self.pool.tensor, self.ops)
        return self.model.compute_logits(hidden[logit_rows])
