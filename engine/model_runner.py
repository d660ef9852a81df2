"""Model runner: turns one step's chunks into tensors, runs the model, returns logits.

It owns no policy: the scheduler decides which tokens run and which blocks they use; the
runner only builds `AttentionMetadata`, calls the model and picks the rows that want logits.
A step whose chunks are all single tokens takes the decode path (paged decode attention);
anything else takes the prefill path (variable-length chunks over prior context), which also
accepts single-token chunks, so mixed batches are fine.

Decode steps keep their block tables on the device (`DecodeTables`): one persistent row per
running sequence, written when the sequence first decodes and then only where its table grew
(a new block every block_size tokens), so a step sends the device one small tensor (token,
position, row per sequence, plus the few new table entries) instead of rebuilding every
table. Slot mapping, sequence lengths and the step's table rows are derived on the device
from (position, row). A sequence is known by its block-table list object: the block manager
only ever grows a table in place or gives the sequence a new list (allocation after
preemption, a fork), so a new list is a new row and stale rows are reused.

On CUDA (unless `enforce_eager`), decode forwards replay CUDA graphs captured at start for
batch-size buckets (1, 2, 4, 8, then multiples of 8 up to max_num_seqs, at most 512): a
decode step of a small model is hundreds of kernel launches, which a graph replays as one.
The graph holds the derivation above too. A batch is padded up to its bucket with rows that
write nowhere (slot -1) and attend to one token of block 0; their outputs are dropped. The
graphs read static input buffers and the attention kernels are sized for max_model_len, so
a replay never depends on the batch.

Tensor parallel: the runner is the boundary. Rank 0's `execute` sends the step to the other
ranks (`leader`, `engine/parallel.py`), which run the same `execute` on their shards, graphs
included; the model's collectives pair up inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.model import AttentionMetadata, CausalLM
from pdserve.kernels.ops import KernelOps

if TYPE_CHECKING:
    from pdserve.engine.parallel import TPLeader


class EngineDeadError(RuntimeError):
    """The engine can run no more steps (a tensor-parallel rank died): no request is to
    blame, so the step loop's containment lets it through."""


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

    def __init__(self, model: CausalLM, pool: KVPool, ops: KernelOps, *,
                 max_num_seqs: int | None = None, max_model_len: int | None = None,
                 leader: TPLeader | None = None):
        """`max_num_seqs` and `max_model_len` size the persistent decode tables; without them
        (or for a larger step) decode steps build their tables per step, as prefills do.
        `leader` (tensor parallelism, rank 0): every `execute` is sent to the other ranks
        first, which run the same `execute` on their shards (`engine/parallel.py`)."""
        self.model = model
        self.leader = leader
        self.pool = pool
        self.ops = ops
        self.device = pool.device
        self.block_size = pool.spec.block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.graph_max_seq_len = 0
        self.tables = (DecodeTables(max_num_seqs, -(-max_model_len // self.block_size),
                                    self.device)
                       if max_num_seqs and max_model_len else None)

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
        if self.tables is None or self.tables.capacity < min(max_num_seqs, 512):
            self.tables = DecodeTables(max_num_seqs, -(-max_model_len // self.block_size),
                                       self.device)
        self.graph_max_seq_len = max_model_len
        pool = torch.cuda.graph_pool_handle()
        for bs in sorted(self.graph_buckets(max_num_seqs), reverse=True):  # big first: reuse
            buf = {  # every row padding at capture: position -1 writes nowhere
                "input_ids": torch.zeros(bs, dtype=torch.int64, device=self.device),
                "positions": torch.full((bs,), -1, dtype=torch.int64, device=self.device),
                "rows": torch.full((bs,), self.tables.pad_row, dtype=torch.int64,
                                   device=self.device),
            }
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self._decode_forward(buf["input_ids"], buf["positions"], buf["rows"],
                                     max_model_len, None)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                buf["hidden"] = self._decode_forward(buf["input_ids"], buf["positions"],
                                                     buf["rows"], max_model_len, None)
            self.graphs[bs] = (graph, buf)
        torch.cuda.synchronize(self.device)

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        rows: torch.Tensor, max_seq_len: int, num_table_cols: int | None
                        ) -> torch.Tensor:
        """A decode forward from (token, position, table row) per sequence, everything else
        derived on the device; a row with position -1 is padding (writes no KV). Eager steps
        pass `num_table_cols` (the batch's widest table) to read no more than they need."""
        bs = self.block_size
        tables = self.tables.rows(rows, num_table_cols)
        valid = positions >= 0
        pos = positions.clamp(min=0)
        block = tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1)
        slots = torch.where(valid, block * bs + pos % bs, -1)
        meta = AttentionMetadata(True, slots, tables, pos + 1, None, 1, max_seq_len)
        return self.model(input_ids, pos, meta, self.pool.tensor, self.ops)

    def _decode(self, chunks: Sequence[SeqChunk], input_ids: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """A decode step over the persistent tables (a graph replay where one fits); None
        when the step has more sequences than the tables hold. `input_ids` (device, one per
        chunk) replace the chunks' token ids."""
        tables = self.tables
        if tables is None or len(chunks) > tables.capacity:
            return None
        B = len(chunks)
        pos = [c.start_pos for c in chunks]
        top = max(pos) + 1
        fits = [b for b in self.graphs if b >= B] if top <= self.graph_max_seq_len else []
        n = min(fits) if fits else B
        pad = n - B
        rows = tables.assign(chunks)
        host = torch.tensor([[c.token_ids[0] for c in chunks] + [0] * pad, pos + [-1] * pad,
                             rows + [tables.pad_row] * pad], dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        tables.flush()
        if not fits:
            dev = host.to(self.device, non_blocking=True)
            ids = dev[0] if input_ids is None else input_ids
            return self._decode_forward(ids, dev[1], dev[2], top, -(-top // self.block_size))
        graph, buf = self.graphs[n]
        buf["input_ids"].copy_(host[0], non_blocking=True)
        if input_ids is not None:
            buf["input_ids"][:B].copy_(input_ids, non_blocking=True)
        buf["positions"].copy_(host[1], non_blocking=True)
        buf["rows"].copy_(host[2], non_blocking=True)
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
            fresh_lens=None if is_decode or any(c.start_pos for c in chunks)
            else tuple(len(c.token_ids) for c in chunks),
        )
        return t(input_ids), t(positions), meta, t(logit_rows)

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SeqChunk], input_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Run one step; returns fp32 logits [sum(num_logits), vocab] in chunk order.

        `input_ids`: a decode step's tokens as a device tensor (one per chunk, in order),
        used instead of the chunks' token ids: an asynchronous step feeds the previous step's
        sampled tokens back without reading them on the host. Nothing here waits for the
        device: the logits are ready when the stream reaches them.

        Tensor parallel: rank 0 sends the step to the other ranks first; there only rank 0's
        logits are whole (the others get their vocabulary slice, unused)."""
        if not chunks:
            raise ValueError("execute needs at least one chunk")
        is_decode = all(len(c.token_ids) == 1 for c in chunks)
        if input_ids is not None and not (is_decode and input_ids.shape == (len(chunks),)):
            raise ValueError("input_ids replace the tokens of a decode step: one per chunk")
        if self.leader is not None:
            with self.leader.step(chunks, input_ids):
                return self._execute(chunks, input_ids, is_decode)
        return self._execute(chunks, input_ids, is_decode)

    def _execute(self, chunks: Sequence[SeqChunk], input_ids: torch.Tensor | None,
                 is_decode: bool) -> torch.Tensor:
        if is_decode and all(c.num_logits == 1 for c in chunks):
            hidden = self._decode(chunks, input_ids)
            if hidden is not None:
                return self.model.compute_logits(hidden)
        ids, positions, meta, logit_rows = self._metadata(chunks, is_decode)
        if input_ids is not None:
            ids = input_ids
        hidden = self.model(ids, positions, meta, self.pool.tensor, self.ops)
        return self.model.compute_logits(hidden[logit_rows])


class DecodeTables:
    """Block tables of decoding sequences, kept on the device across steps.

    `capacity` rows plus one all-zero padding row (`pad_row`). `assign` gives each chunk of
    a step its row and queues the entries its table gained since it was last written;
    `flush` writes the queued entries with one indexed store. A row belongs to one table
    list object (held here, so its id is not reused); a row whose table did not run in the
    current step may be given to another."""

    def __init__(self, capacity: int, width: int, device: torch.device):
        self.capacity = capacity
        self.pad_row = capacity
        self.table = torch.zeros(capacity + 1, width, dtype=torch.int64, device=device)
        self.device = device
        self._rows: dict[int, list] = {}  # id(table list) -> [row, list, entries written, step]
        self._free = list(range(capacity - 1, -1, -1))
        self._step = 0
        self._updates: list[int] = []  # row, col, value triples

    def assign(self, chunks: Sequence[SeqChunk]) -> list[int]:
        self._step += 1
        step, rows_of, updates, out = self._step, self._rows, self._updates, []
        for c in chunks:
            t = c.block_table
            e = rows_of.get(id(t))
            if e is None or e[1] is not t:
                e = rows_of[id(t)] = [self._take(), t, 0, step]
            need = len(t)
            if need > e[2]:
                row = e[0]
                for col in range(e[2], need):
                    updates += (row, col, t[col])
                e[2] = need
            e[3] = step
            out.append(e[0])
        return out

    def _take(self) -> int:
        if not self._free:  # reuse the rows of tables that did not run in this step
            stale = [k for k, e in self._rows.items() if e[3] < self._step]
            for k in stale:
                self._free.append(self._rows.pop(k)[0])
        return self._free.pop()

    def flush(self) -> None:
        if not self._updates:
            return
        u = torch.tensor(self._updates, dtype=torch.int64).view(-1, 3).t()
        if self.device.type == "cuda":
            u = u.pin_memory()
        u = u.to(self.device, non_blocking=True)
        self.table.index_put_((u[0], u[1]), u[2])
        self._updates = []

    def rows(self, rows: torch.Tensor, num_cols: int | None) -> torch.Tensor:
        t = self.table if num_cols is None else self.table[:, :num_cols]
        return t.index_select(0, rows)
