"""Model runner: turns one step's chunks into tensors, runs the model, returns logits.

It owns no policy: the scheduler decides which tokens run and which blocks they use; the
runner only builds `AttentionMetadata`, calls the model and picks the rows that want logits.
A step whose chunks are all single tokens takes the decode path (paged decode attention);
anything else takes the prefill path (variable-length chunks over prior context), which also
accepts single-token chunks, so mixed batches are fine.

On CUDA (unless `enforce_eager`), decode forwards replay CUDA graphs captured at start for
batch-size buckets (1, 2, 4, 8, then multiples of 8 up to max_num_seqs, at most 512): a
decode step of a small model is hundreds of kernel launches, which a graph replays as one.
A batch is padded up to its bucket with slots that write nowhere (slot -1) and attend to one
token of block 0; their rows are dropped. The graphs read static input buffers and the
attention kernels are sized for max_model_len, so a replay never depends on the batch.
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
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.graph_max_seq_len = 0

    @staticmethod
    def graph_buckets(max_num_seqs: int) -> list[int]:
        top = min(max_num_seqs, 512)
        return sorted({b for b in [1, 2, 4, 8, *range(16, top + 8, 8)] if b <= max(top, 1)}
                      | {top})

    @torch.inference_mode()
    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture one decode graph per bucket (CUDA only). Called once at engine start."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        max_blocks = -(-max_model_len // self.block_size)
        self.graph_max_seq_len = max_model_len
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(self.graph_buckets(max_num_seqs), reverse=True):  # big first: reuse
            buf = {
                "input_ids": torch.zeros(bs, dtype=torch.int64, device=self.device),
                "positions": torch.zeros(bs, dtype=torch.int64, device=self.device),
                "slot_mapping": torch.full((bs,), -1, dtype=torch.int64, device=self.device),
                "block_tables": torch.zeros(bs, max_blocks, dtype=torch.int64, device=self.device),
                "seq_lens": torch.ones(bs, dtype=torch.int64, device=self.device),
            }
            meta = AttentionMetadata(True, buf["slot_mapping"], buf["block_tables"],
                                     buf["seq_lens"], None, 1, max_model_len)
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self.model(buf["input_ids"], buf["positions"], meta, self.pool.tensor, self.ops)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                buf["hidden"] = self.model(buf["input_ids"], buf["positions"], meta,
                                           self.pool.tensor, self.ops)
            self.graphs[bs] = (graph, buf)
        torch.cuda.synchronize(self.device)

    def _replay(self, chunks: Sequence[SeqChunk]) -> torch.Tensor | None:
        """Run a decode step through a captured graph; None if no graph fits."""
        B = len(chunks)
        fits = [b for b in self.graphs if b >= B]
        if not fits:
            return None
        graph, buf = self.graphs[min(fits)]
        bs = self.block_size
        width = buf["block_tables"].shape[1]
        pos = [c.start_pos for c in chunks]
        if max(pos) + 1 > self.graph_max_seq_len:
            return None
        n = buf["input_ids"].shape[0]
        pad = n - B
        host = torch.tensor(
            [[c.token_ids[0] for c in chunks] + [0] * pad,
             pos + [0] * pad,
             [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos)] + [-1] * pad,
             [p + 1 for p in pos] + [1] * pad], dtype=torch.int64)
        tables = torch.zeros(n, width, dtype=torch.int64)
        for i, c in enumerate(chunks):
            need = -(-(pos[i] + 1) // bs)
            tables[i, :need] = torch.as_tensor(list(c.block_table[:need]), dtype=torch.int64)
        host = host.pin_memory() if torch.cuda.is_available() else host
        buf["input_ids"].copy_(host[0], non_blocking=True)
        buf["positions"].copy_(host[1], non_blocking=True)
        buf["slot_mapping"].copy_(host[2], non_blocking=True)
        buf["seq_lens"].copy_(host[3], non_blocking=True)
        buf["block_tables"].copy_(tables, non_blocking=False)
        graph.replay()
        return buf["hidden"][:B]

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
        if is_decode and self.graphs and all(c.num_logits == 1 for c in chunks):
            hidden = self._replay(chunks)
            if hidden is not None:
                return self.model.compute_logits(hidden)
        input_ids, positions, meta, logit_rows = self._metadata(chunks, is_decode)
        hidden = self.model(input_ids, positions, meta, self.pool.tensor, self.ops)
        return self.model.compute_logits(hidden[logit_rows])
