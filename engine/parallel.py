"""Tensor parallelism: N processes (ranks) run one model, each holding 1/N of its weights.

Rank 0 is the engine's own process: the scheduler, the sampler and every request live
there. Ranks 1..N-1 are followers that rank 0 starts (`python -m pdserve.engine.parallel`),
each with its own model shard and KV pool; they run the forwards rank 0 runs, nothing else.

Sharding (Megatron-style, two all-reduces per decoder layer; `engine/model.py`):
- qkv_proj, gate_up_proj are column-parallel: a rank holds num_heads / N query heads,
  num_kv_heads / N KV heads and intermediate_size / N MLP columns; no communication.
- o_proj, down_proj are row-parallel: each rank multiplies its slice of the input features
  and one all-reduce sums the partial outputs (a bias lives on rank 0 only, so it adds once).
- embed_tokens is vocab-parallel: a rank looks up the ids in its vocabulary slice, zeros the
  others, all-reduce (a sum of one row and zeros: exact). lm_head is vocab-parallel too and
  rank 0 gathers the logit slices. The vocabulary is padded to a multiple of N.
- Each rank's KV pool holds its own KV heads under the same block ids (one block manager).

A step: rank 0's `ModelRunner.execute` sends the step's chunks down each follower's stdin
pipe (`TPLeader.step`; an asynchronous decode step's device token ids follow by broadcast),
and each follower runs the same `execute`, so the collectives inside the model pair up;
only rank 0's logits are whole. Fork block copies go down the pipe too (`send_copies`).
Followers wait for commands on the pipe, never inside a collective, so an idle engine has
no timeout to hit.

Failures: collectives time out after TP_TIMEOUT_S, and gloo fails at once when a peer's
connection drops. A follower that dies makes rank 0's next step raise TensorParallelError
(naming the rank and its exit status); rank 0 then stops the other followers and runs no
more steps. When rank 0 dies, the followers see their pipe close (or their collective fail)
and exit. An exception before a step's first collective (a bad chunk, raised alike on every
rank) leaves the ranks in step and is the caller's to contain; one after it does not:
followers exit and rank 0 raises TensorParallelError.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pdserve.common import UserError
from pdserve.engine.model_runner import EngineDeadError, SeqChunk

if TYPE_CHECKING:
    from pdserve.engine.config import EngineConfig

logger = logging.getLogger(__name__)

TP_TIMEOUT_S = 120.0  # one collective; first steps may compile kernels between two
START_TIMEOUT_S = 120.0  # followers importing torch and joining the group


class TensorParallelError(UserError, EngineDeadError):
    """A tensor-parallel rank died or the ranks fell out of step; the engine is done. The
    message says which rank and how (the CLI prints it as one line)."""


def vocab_shard(vocab_size: int, size: int, rank: int) -> tuple[int, int, int]:
    """(rows per rank, padded; first token id; end token id) of `rank`'s vocabulary slice."""
    per = -(-vocab_size // size)
    start = min(rank * per, vocab_size)
    return per, start, min(start + per, vocab_size)


class TPGroup:
    """One rank's handle on the group: collectives over model tensors (NCCL on CUDA, gloo
    on the CPU), on a process group of its own (not torch.distributed's global default,
    so several engines can live in one process). `calls` counts the collectives issued."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.store = store  # NCCL makes its communicator at the first collective, via the store
        timeout = datetime.timedelta(seconds=TP_TIMEOUT_S)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg: Any = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, size, timeout)
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks (in place when contiguous); every rank gets the same values."""
        self.calls += 1
        x = x.contiguous()
        self.pg.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> None:
        """Rank 0's `x` into every rank's `x` (same shape and dtype)."""
        self.calls += 1
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([x], opts).wait()

    def gather_logits(self, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """x [N, V/size], this rank's logit slice. Rank 0 gets [N, vocab_size] (the slices
        side by side, the padding cut off); the others get `x` back (unused)."""
        self.calls += 1
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            self.pg.gather([], [x], opts).wait()
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.gather([parts], [x], opts).wait()
        logits = torch.cat(parts, dim=-1)
        # cut the padding rows' logits; contiguous, as the sampler's kernels expect
        return logits if logits.shape[-1] == vocab_size else logits[:, :vocab_size].contiguous()

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' `value`s (the KV pool's block count)."""
        self.calls += 1
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())


# ---- the command pipe: length-prefixed pickles, rank 0 -> one follower ---------------------

def _write(f: IO[bytes], msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("!Q", len(data)) + data)
    f.flush()


def _read(f: IO[bytes]) -> Any | None:
    """The next message, or None once rank 0 closed the pipe (or died)."""
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("!Q", head)
    data = f.read(n)
    return pickle.loads(data) if len(data) == n else None


def _status(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """Close the followers' pipes (they exit at EOF); kill those still there after `grace` s."""
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            p.stdin.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class TPLeader:
    """Rank 0's side of the group: starts the followers, sends them each step, stops them.

    `start` returns once every follower joined the group (they then build their shards
    while rank 0 builds its own). `step` wraps each forward on rank 0 (`ModelRunner`),
    `send_copies` each fork copy (`KVPool`); `close` stops the followers (also run when the
    leader is collected or the interpreter exits). After a failure every call raises the
    same TensorParallelError."""

    def __init__(self, procs: list[subprocess.Popen], group: TPGroup, max_tables: int):
        self.procs = procs
        self.group = group
        self.error: TensorParallelError | None = None
        # block tables sent: id(list) -> (the list, entries sent); see _Tables
        self._sent: dict[int, tuple[Sequence[int], int]] = {}
        self._max_tables = max_tables
        self._pidfds: list[int] | None = None  # exit_fds
        self._finalizer = weakref.finalize(self, _stop, procs, 5.0)

    @classmethod
    def start(cls, cfg: EngineConfig, devices: Sequence[torch.device]) -> TPLeader:
        """Start ranks 1..N-1 (`devices[r]` is rank r's) and join the group as rank 0."""
        size = len(devices)
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, size):
                p = subprocess.Popen([sys.executable, "-m", "pdserve.engine.parallel"],
                                     stdin=subprocess.PIPE)
                procs.append(p)
                _write(p.stdin, {"rank": rank, "size": size, "port": store.port,  # type: ignore[arg-type]
                                 "device": str(devices[rank]), "config": cfg})
            _wait_started(store, procs)
            group = TPGroup(store, 0, size, devices[0])
        except BaseException:
            _stop(procs, 0.0)
            raise
        logger.info("tensor parallel: %d ranks (followers' pids %s) on %s", size,
                    [p.pid for p in procs], ", ".join(map(str, devices)))
        return cls(procs, group, _max_tables(cfg))

    def exited(self) -> str | None:
        """'rank R (pid P) was killed by SIGKILL; ...' for followers that are gone, or None."""
        dead = [f"rank {r} (pid {p.pid}) {_status(p.returncode)}"
                for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
        return "; ".join(dead) or None

    def exit_fds(self) -> list[int]:
        """File descriptors that become readable when a follower exits (pidfds; none where
        the kernel lacks them): a worker's idle poll watches them, so a dead rank takes its
        worker down at once, not at the next request's step. Closed with the leader."""
        if self._pidfds is None:
            self._pidfds = []
            for p in self.procs:
                try:
                    self._pidfds.append(os.pidfd_open(p.pid))
                except (AttributeError, OSError):  # no pidfds (or gone and reaped): per step
                    break
            weakref.finalize(self, _close_fds, self._pidfds)
        return list(self._pidfds)

    def check(self) -> None:
        """Raise the group's TensorParallelError if it failed or a follower is gone."""
        if self.error is not None:
            raise self.error
        if self.exited():
            raise self._fail(None)

    @contextlib.contextmanager
    def step(self, chunks: Sequence[SeqChunk], input_ids: torch.Tensor | None) -> Iterator[None]:
        """Around rank 0's forward of `chunks`: the followers start the same forward; a
        failure that leaves the ranks out of step becomes TensorParallelError."""
        self.check()
        calls = self.group.calls
        try:
            msg = [(c.token_ids, c.start_pos, *self._table(c.block_table), c.num_logits)
                   for c in chunks]
            _prune(self._sent, {id(c.block_table) for c in chunks}, self._max_tables)
            self._send(("step", msg, None if input_ids is None else len(input_ids)))
            if input_ids is not None:
                self.group.broadcast(input_ids)
            yield
        except TensorParallelError:
            raise
        except BaseException as e:
            if self.group.calls != calls or self._gone(e):
                error = self._fail(e)
                if isinstance(e, Exception):
                    raise error from e
            raise  # before any collective: every rank raised it alike; still in step

    def _table(self, table: Sequence[int]) -> tuple[int, bool, list[int]]:
        """(key, new, entries): a table list the first time whole, then the entries it
        gained since (the block manager only grows a list in place, or makes a new one).
        Holding the list keeps its id from naming another list meanwhile."""
        key = id(table)
        e = self._sent.get(key)
        new = e is None or e[0] is not table or len(table) < e[1]
        start = 0 if new else e[1]  # type: ignore[index]
        self._sent[key] = (table, len(table))
        return key, new, list(table[start:])

    def send_copies(self, pairs: list[tuple[int, int]]) -> None:
        """Fork block copies (src, dst): the followers make them in their pools before
        their next forward (rank 0 copies its own at once)."""
        self.check()
        self._send(("copy", pairs))

    def close(self) -> None:
        """Stop the followers (idempotent); the engine runs no more steps after."""
        self._finalizer()
        if self.error is None:
            self.error = TensorParallelError("the tensor-parallel ranks were stopped (close()); "
                                             "this engine runs no more steps")

    def _send(self, msg: Any) -> None:
        for p in self.procs:
            try:
                _write(p.stdin, msg)  # type: ignore[arg-type]
            except (BrokenPipeError, OSError, ValueError) as e:
                raise self._fail(e) from e

    def _gone(self, e: BaseException) -> bool:
        return isinstance(e, OSError) or self.exited() is not None

    def _fail(self, cause: BaseException | None) -> TensorParallelError:
        # a peer's sockets close a moment before its exit status shows: give it that moment
        deadline = time.monotonic() + 1.0
        while not self.exited() and time.monotonic() < deadline and cause is not None:
            time.sleep(0.02)
        dead = self.exited()
        why = dead or f"the ranks fell out of step ({type(cause).__name__}: {cause})"
        self.error = TensorParallelError(f"tensor parallelism failed: {why}; this engine "
                                         "runs no more steps")
        logger.error("%s", self.error)
        _stop(self.procs, 0.0)  # the others may wait in a collective: stop them now
        self._finalizer.detach()
        return self.error


def _wait_started(store: dist.TCPStore, procs: list[subprocess.Popen]) -> None:
    """Until every follower has said it is up (it then joins the group), or one exits."""
    keys = [f"up{r}" for r in range(1, len(procs) + 1)]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):  # start-up only: a short poll beats a thread per child
        for r, p in enumerate(procs, start=1):
            if p.poll() is not None:
                raise TensorParallelError(f"tensor-parallel rank {r} (pid {p.pid}) "
                                          f"{_status(p.returncode)} while starting")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel ranks did not start within "
                                      f"{START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


# ---- a follower (ranks 1..N-1) ------------------------------------------------------------

def _max_tables(cfg: EngineConfig) -> int:
    return 4 * max(cfg.max_num_seqs, 64)


def _prune(tables: dict[int, Any], keys: set[int], limit: int) -> None:
    """Forget the tables of sequences not in this step once there are more than `limit`.
    Rank 0 and the followers prune alike, after the same steps."""
    if len(tables) > limit:
        for k in [k for k in tables if k not in keys]:
            del tables[k]


class _Tables:
    """A follower's copies of rank 0's block-table lists, each kept as one list object that
    grows as rank 0's does: the decode tables (`DecodeTables`) know a sequence by its list
    object and write the device only the entries it gained."""

    def __init__(self, limit: int) -> None:
        self.lists: dict[int, list[int]] = {}
        self.limit = limit

    def get(self, key: int, new: bool, entries: list[int]) -> list[int]:
        if new:
            self.lists[key] = table = entries
        else:
            table = self.lists[key]
            table.extend(entries)
        return table


def _follower(stdin: IO[bytes]) -> int:
    init = _read(stdin)
    if init is None:
        return 0
    rank, size, cfg = init["rank"], init["size"], init["config"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's; it then stops us
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s")
    from pdserve.engine.setup import build_shard, prepare

    store = dist.TCPStore("127.0.0.1", init["port"], size, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    store.set(f"up{rank}", b"1")
    try:
        setup = prepare(cfg, init["device"])
        group = TPGroup(store, rank, size, setup.device)
        _, pool, runner, _ = build_shard(setup, progress=False, tp=group)
    except UserError as e:  # rank 0 reads the same files and says so itself
        logger.error("%s", e)
        return 1
    tables = _Tables(_max_tables(cfg))
    while True:
        msg = _read(stdin)
        if msg is None or msg[0] == "stop":
            return 0
        if msg[0] == "copy":
            pool.copy_blocks(msg[1])
            continue
        _, encoded, num_ids = msg
        # a table this rank lacks is a bug that would corrupt KV: it ends the follower
        chunks = [SeqChunk(ids, start, tables.get(key, new, entries), n)
                  for ids, start, key, new, entries, n in encoded]
        _prune(tables.lists, {e[2] for e in encoded}, tables.limit)
        calls = group.calls
        try:
            input_ids = None
            if num_ids is not None:
                input_ids = torch.empty(num_ids, dtype=torch.int64, device=group.device)
                group.broadcast(input_ids)
            runner.execute(chunks, input_ids)
        except Exception:
            if group.calls == calls:  # rank 0 raised the same, before any collective
                logger.debug("step failed before its first collective", exc_info=True)
                continue
            logger.exception("a step failed after a collective (rank 0 gone, or the ranks "
                             "out of step); exiting")
            return 1


if __name__ == "__main__":
    try:
        code = _follower(sys.stdin.buffer)
    except KeyboardInterrupt:
        code = 1
    except Exception:  # noqa: BLE001 - a collective failed: rank 0 is gone or failing
        logger.exception("tensor-parallel follower failed")
        code = 1
    sys.stderr.flush()
    os._exit(code)  # no teardown of a group whose peers may be gone
