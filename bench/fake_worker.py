"""Fake engines that speak the real data path, with known delays: for measuring the proxy.

    python bench/fake_worker.py --role both|prefill|decode --port 9100 --ttft-ms 20 --itl-ms 10

A fake worker binds the same sockets as `pdserve worker`: a ZMQ ROUTER on port+1 for the
data path (common/wire.py messages) and HTTP on port for /health, /info and /load. Its
/info carries the compatibility record of the proxy's model (`--model`, default the built-in
one: the same config and tokenizer hashes, block size, pool layout, ... as a real worker),
so the proxy's registry admits it. No model runs; every answer comes after a fixed delay:

- both:    Generate -> first Step row `--ttft-ms` after it arrived -> one row every
           `--itl-ms` until max_tokens (finish "length").
- prefill: Prefill -> First `--ttft-ms` after it arrived (then Transfer ok, as if the KV
           had moved at once).
- decode:  Reserve -> Reserved at once; Join -> rows every `--itl-ms` after the Join;
           Generate (the proxy skipped P) as both.

Timing modes. Default (exact): every request keeps its own clock (token k at
first + (k − 1)·itl, anchored so a late loop catches up rather than drifting), and rows due
together share one STEP frame per proxy. `--batch`: one global step clock of period
`--itl-ms`, like a real D: every running request gets one token per step and each step is
one STEP frame per proxy (a request joins the first step at least one period after its
previous token). One process emits well over 10^5 tokens/s in `--batch` mode.

`--step-model PATH` (a fitted model from bench/step_model.py, e.g.
pdserve/plan/models/h200_llama3_8b.json): the fixed delays give way to an engine's step loop
whose steps take the time the model gives (wall clock, `--time-scale` times it), so a cluster
of fakes on a CPU box runs with GPU-like costs. `--ttft-ms`, `--itl-ms` and `--batch` are
ignored there. Each step: every decoding sequence gets one token (one Step frame per proxy
per step), then prompt chunks fill the rest of `--max-num-batched-tokens` (requests running
first, then new ones up to `--max-num-seqs`, in arrival order); a prompt whose last chunk
ran gets its next token at the step's end.

- both:    Generate -> chunked prefill mixed with the decodes -> one token per step; and
           as D (Reserve, Join) and as P (Prefill: its prompt chunks run in the same steps
           as the rest, then First and the modelled transfer) for flexible roles.
- prefill: prefill-only steps; First at the end of the step that ran a prompt's last chunk,
           then Transfer ok after the modelled transfer (prompt tokens x KV bytes per token /
           `--transfer-gbps`, GB/s); no Transfer when there is no D (kv None) or every
           choice ended at its first token. P holds the prompt's KV until then.
- decode:  Reserve -> Reserved at once; Join -> the request decodes from the first step
           after its KV is in, taken as one modelled transfer after the Join (the Join trails
           P's first token by the proxy's hop, which a fake cannot see); a Join of a record
           with output so far (a re-submission) recomputes prompt + output in chunks first;
           Generate (the proxy skipped P) as both.

Between steps (and during one: the step is a sleep) the loop reads the data path, so Ping
gets Pong at once; what arrives during a step joins the next one. Load reports carry the
counts a real worker's do, KV usage against the model's pool (`--kv-capacity-tokens`), and
the measured `prefill_tokens_per_s` (prompt tokens / step seconds over steps that prefilled)
and `decode_step_ms` (steps without prompt tokens, with `decode_batch`), weighted and
rounded as common/step_rates.py's StepRates (alpha 0.2; absent until measured). Like the
fixed-delay modes, no report carries `acked`, so the proxy resets its unacknowledged counts
on each report. No preemption: the KV pool is reported, not enforced.

Emitted tokens cycle through ids of plain English words in the model's tokenizer, so the
proxy's detokenizer releases text for every token, as with a real model's output.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import zmq

from pdserve.common.step_rates import StepRates
from pdserve.common.wire import (
    DATA_PATH,
    Abort,
    Connect,
    DataMessage,
    Error,
    First,
    Generate,
    Join,
    Ping,
    Pong,
    Prefill,
    RequestRecord,
    Reserve,
    Reserved,
    Step,
    TokenRow,
    Transfer,
    WireError,
)
from pdserve.plan.step_engine import KV_BLOCK, Job, StepEngine, StepPlan, engine_load
from pdserve.plan.step_model import load as load_step_model

logger = logging.getLogger("fake_worker")
_WORDS = " the of and to in is you that it was for on are as with his they at be this have"


@dataclass(eq=False)
class _Stream:
    """One request being decoded: its running choices and their tokens left."""

    identity: bytes
    rid: str
    left: dict[int, int]  # choice -> tokens still to emit
    due: float  # next token's time (exact mode) or the earliest step it may join (batch)
    tokens: itertools.cycle = field(repr=False)


def compat_info(model: str | None, max_model_len: int) -> dict[str, Any]:
    """The compatibility record a real worker on `model` would report (service/loop.py)."""
    from pdserve.common.compat import CompatRecord
    from pdserve.engine.builtin_model import builtin_model_path
    from pdserve.engine.kv_pool import POOL_LAYOUT
    from pdserve.engine.model_config import ModelConfig

    path = model or str(builtin_model_path())
    mc = ModelConfig.from_pretrained(path)
    record = CompatRecord.build(path, None, dtype="float32", block_size=16,
                                pool_layout=POOL_LAYOUT, num_layers=mc.num_hidden_layers,
                                num_kv_heads=mc.num_key_value_heads, head_dim=mc.head_dim,
                                max_model_len=max_model_len)
    return {**record.to_dict(), "_eos": list(mc.eos_token_ids), "_vocab": mc.vocab_size,
            "_path": path}


def word_token_ids(model_path: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    ids = tok.encode(_WORDS, add_special_tokens=False).ids
    return list(dict.fromkeys(ids)) or [100]


class FakeWorker:
    """The data-path loop (main thread) plus an HTTP thread; see the module docstring."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.role = args.role
        self.ttft = args.ttft_ms / 1e3
        self.itl = args.itl_ms / 1e3
        compat = compat_info(args.model, args.max_model_len)
        self.eos, self.vocab = compat.pop("_eos"), compat.pop("_vocab")
        self.word_ids = word_token_ids(compat.pop("_path"))
        self.compat = compat
        self.name = args.name or f"fake-{self.role}@127.0.0.1:{args.port}"
        self.data_address = f"tcp://{args.host}:{args.port + 1}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop a frame: the proxy reads them all
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(self.data_address)
        self.token = args.internal_token or ""
        self.timers: list[tuple[float, int, str, Any]] = []  # (due, tie, kind, payload)
        self._tie = itertools.count()
        self.streams: dict[str, _Stream] = {}
        self.reserved: dict[str, tuple[bytes, RequestRecord]] = {}  # D: rid -> (proxy, rec)
        self.pending: dict[str, tuple[bytes, RequestRecord]] = {}  # first token not sent yet
        self.seq = 0
        self.num_tokens = 0
        self.next_step = 0.0
        self.stop = threading.Event()

    # ---- ops HTTP ------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        self.seq += 1
        return {"role": self.role, "seq": self.seq, "time": time.time(),
                "num_requests_running": len(self.streams),
                "num_requests_waiting": len(self.pending) + len(self.reserved),
                "kv_cache_usage_perc": 0.0, "num_free_blocks": 1 << 20,
                "pending_prefill_tokens": 0, "fake_tokens_emitted": self.num_tokens}

    def http_load(self) -> dict[str, Any]:
        return self.load()

    def info(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "version": "fake", "compat": self.compat,
                "model_path": self.args.model, "data_address": self.data_address,
                "eos_token_ids": self.eos, "vocab_size": self.vocab, "num_kv_blocks": 1 << 20}

    def serve_http(self) -> ThreadingHTTPServer:
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                routes = {"/health": lambda: {"status": "ok", "role": worker.role,
                                              "name": worker.name},
                          "/info": worker.info, "/load": worker.http_load}
                make = routes.get(self.path.split("?")[0])
                body = json.dumps(make() if make else {"error": "not found"}).encode()
                self.send_response(200 if make else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:  # health checks every second: quiet
                pass

        server = ThreadingHTTPServer((self.args.host, self.args.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        return server

    # ---- data path -----------------------------------------------------------------------

    def send(self, identity: bytes, msg: DataMessage) -> None:
        try:
            self.sock.send_multipart([identity, DATA_PATH.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the proxy is gone: it would time out anyway
            logger.debug("dropped %s: %s", type(msg).__name__, e)

    def at(self, due: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.timers, (due, next(self._tie), kind, payload))

    def on_message(self, identity: bytes, msg: DataMessage, now: float) -> None:
        rid = getattr(msg, "rid", None)
        if self.token and msg.t != self.token:
            raise WireError("wrong internal token", rid)
        kind = msg.__struct_config__.tag
        if isinstance(msg, Ping):  # the proxy's liveness probe (proxy/workers.py)
            self.send(identity, Pong(n=msg.n, load=self.load()))
        elif isinstance(msg, Connect):  # open KV sessions ahead: a fake moves no KV
            pass
        elif isinstance(msg, Reserve) and self.role != "prefill":
            self.reserved[msg.rec.request_id] = (identity, msg.rec)
            self.send(identity, Reserved(rid=msg.rec.request_id, kv="tcp://127.0.0.1:0"))
        elif isinstance(msg, Generate if self.role != "prefill" else Prefill):
            self.pending[msg.rec.request_id] = (identity, msg.rec)
            self.at(now + self.ttft, "first", msg.rec.request_id)
        elif isinstance(msg, Join) and self.role == "decode":
            identity, rec = self.reserved.pop(rid, (None, None))
            if rec is None:
                raise WireError(f"unknown request id {rid!r}", rid)
            self.start_stream(identity, rec, [r.choice_index for r in msg.first], now)
        elif isinstance(msg, Abort):
            for table in (self.streams, self.reserved, self.pending):
                table.pop(rid, None)
        else:
            raise WireError(f"a fake {self.role} worker does not take {kind}", rid)

    def start_stream(self, identity: bytes, rec: RequestRecord, choices: list[int],
                     last: float) -> None:
        """Decode the remaining tokens of `choices` (their first token is already out)."""
        left = (rec.params.max_tokens or 16) - 1 - len(rec.output_token_ids)
        if left <= 0 or not choices:
            return
        s = _Stream(identity, rec.request_id, dict.fromkeys(choices, left), last + self.itl,
                    itertools.cycle(self.word_ids))
        self.streams[s.rid] = s
        if not self.args.batch:
            self.at(s.due, "token", s.rid)

    def first_token(self, rid: str, now: float) -> None:
        identity, rec = self.pending.pop(rid, (None, None))
        if rec is None:
            return  # aborted meanwhile
        choices = rec.choice_indices()
        done = "length" if (rec.params.max_tokens or 16) <= 1 else None
        rows = [TokenRow(rid, c, self.word_ids[0], None, done) for c in choices]
        self.num_tokens += len(rows)
        if self.role == "prefill":
            self.send(identity, First(rid=rid, out=rows, load=self.load()))
            self.send(identity, Transfer(rid=rid, ok=True, transport="fake"))
            return
        self.send(identity, Step(seq=self.seq, out=rows, load=self.load()))
        self.start_stream(identity, rec, choices, now)

    def emit(self, streams: list[_Stream]) -> None:
        """One token for every running choice of `streams`, one STEP frame per proxy."""
        frames: dict[bytes, list] = {}
        for s in streams:
            rows = frames.setdefault(s.identity, [])
            tok = next(s.tokens)
            for c in list(s.left):
                s.left[c] -= 1
                rows.append(TokenRow(s.rid, c, tok, None, None if s.left[c] else "length"))
                if not s.left[c]:
                    del s.left[c]
            if not s.left:
                self.streams.pop(s.rid, None)
            self.num_tokens += len(rows)
        if frames:
            load = self.load()
            for identity, rows in frames.items():
                self.send(identity, Step(seq=load["seq"], out=rows, load=load))

    def fire(self, now: float) -> None:
        due_streams = []
        while self.timers and self.timers[0][0] <= now:
            due, _, kind, rid = heapq.heappop(self.timers)
            if kind == "first":
                self.first_token(rid, now)
            elif (s := self.streams.get(rid)) is not None:
                due_streams.append(s)
                s.due = due + self.itl  # on its own clock: a late loop catches up, no drift
        if due_streams:
            self.emit(due_streams)
            for s in due_streams:
                if s.rid in self.streams:
                    self.at(s.due, "token", s.rid)
        if self.args.batch and self.streams and now >= self.next_step:
            ready = [s for s in self.streams.values() if s.due <= now]
            if not ready:  # idle until the earliest request may join
                self.next_step = min(s.due for s in self.streams.values())
                return
            for s in ready:
                s.due = 0.0  # in the batch now: every step from here on
            self.emit(ready)
            # the next step one period on; a late loop skips the missed steps (no bursts)
            self.next_step += self.itl
            if self.next_step <= now:
                self.next_step = now + self.itl

    def run(self) -> None:
        http = self.serve_http()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        logger.info("%s ready: http=http://%s:%d data=%s ttft=%.1fms itl=%.1fms%s", self.name,
                    self.args.host, self.args.port, self.data_address, self.ttft * 1e3,
                    self.itl * 1e3, " batch" if self.args.batch else "")
        while not self.stop.is_set():
            now = time.monotonic()
            nxt = self.timers[0][0] if self.timers else now + 0.05
            if self.args.batch and self.streams:
                nxt = min(nxt, self.next_step)
            wait_ms = max(0.0, min(nxt - now, 0.05)) * 1e3
            # zmq polls whole milliseconds and may wake late: poll until ~1 ms before the
            # timer, then sleep the rest, so it fires within ~0.1 ms of its time
            ready = poller.poll(max(0, int(wait_ms) - 1))
            if not ready and wait_ms < 50:
                time.sleep(max(0.0, nxt - time.monotonic()))
            if ready:
                while True:
                    try:
                        identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)[:2]
                    except zmq.Again:
                        break
                    try:
                        self.on_message(identity, DATA_PATH.decode(frame), time.monotonic())
                    except WireError as e:
                        self.send(identity, Error(rid=e.rid, reason=str(e)))
            self.fire(time.monotonic())
        http.shutdown()
        self.sock.close(0)
        self.ctx.term()


class StepModelWorker(FakeWorker):
    """`--step-model`: the data path of FakeWorker over a StepEngine whose steps take the
    modelled time (module docstring)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.model = load_step_model(args.step_model).scaled(args.time_scale)
        kv_bytes = args.kv_bytes_per_token or self.model.kv_bytes_per_token
        per_token = kv_bytes / (args.transfer_gbps * 1e9) * args.time_scale \
            if args.transfer_gbps > 0 else 0.0
        self.capacity = args.kv_capacity_tokens or self.model.kv_capacity_tokens or 1 << 20
        self.engine = StepEngine(self.model, self.role, args.max_num_batched_tokens,
                                 args.max_num_seqs, per_token, args.mixed_step_tokens)
        self.rates = StepRates()
        # host time per step beyond the model's (bench/plan_check.py --step-overhead-ms):
        # over steps that follow one another with work left, the start of one minus the
        # start of the one before minus its modelled time (the sleep's lateness, finishing
        # it: frames out and reports, scheduling the next)
        self.overrun_s, self.overrun_steps = 0.0, 0
        self.busy_since: tuple[float, float] | None = None  # the last step (start, model s)
        self.snapshot = self.load()

    def load(self) -> dict[str, Any]:
        self.seq += 1
        load = {**engine_load(self.engine, self.role, self.capacity, self.rates),
                "seq": self.seq, "time": time.time(), "fake_tokens_emitted": self.num_tokens,
                "fake_steps": self.overrun_steps,
                "fake_step_overrun_ms": round(1e3 * self.overrun_s / max(1, self.overrun_steps),
                                              3)}
        self.snapshot = load
        return load

    def http_load(self) -> dict[str, Any]:
        return self.snapshot  # the step loop's latest (its tables are not for other threads)

    def info(self) -> dict[str, Any]:
        info = {**super().info(), "num_kv_blocks": self.capacity // KV_BLOCK,
                "limits": {"max_num_seqs": self.args.max_num_seqs,
                           "max_num_batched_tokens": self.args.max_num_batched_tokens,
                           "mixed_step_tokens": self.args.mixed_step_tokens}}
        if self.role != "prefill":  # takes a P's KV (nothing listens: the transfer is modelled)
            info["kv_address"] = f"tcp://{self.args.host}:{self.args.port + 2}"
        if self.role == "both":  # prefills for a D too (flexible roles)
            info["acts_as_prefill"] = True
        return info

    def new_job(self, identity: bytes, rec: RequestRecord, left: int, prefill: int,
                **kw: Any) -> Job:
        return Job(identity, rec, dict.fromkeys(rec.choice_indices(), left), prefill,
                    itertools.cycle(self.word_ids), **kw)

    def on_message(self, identity: bytes, msg: DataMessage, now: float) -> None:
        rid = getattr(msg, "rid", None)
        if self.token and msg.t != self.token:
            raise WireError("wrong internal token", rid)
        e = self.engine
        rec = getattr(msg, "rec", None)
        if rec is not None and (rec.request_id in e.jobs or rec.request_id in e.reserved):
            raise WireError(f"request id {rec.request_id} is already in flight", rec.request_id)
        max_tokens = (rec.params.max_tokens or 16) if rec is not None else 0
        if isinstance(msg, Ping):
            self.send(identity, Pong(n=msg.n, load=self.load()))
        elif isinstance(msg, Connect):
            pass
        elif isinstance(msg, Reserve) and self.role != "prefill":
            e.reserved[rec.request_id] = (identity, rec)
            self.send(identity, Reserved(rid=rec.request_id, kv=self.info()["kv_address"]))
        elif (isinstance(msg, Generate) and self.role != "prefill") or \
                (isinstance(msg, Prefill) and self.role != "decode"):
            if rec.output_token_ids:
                raise WireError("a new request must have no output so far", rec.request_id)
            p = isinstance(msg, Prefill)  # a both-role worker prefills for a D as P does
            left = 1 if p else max(1, max_tokens)
            e.add(self.new_job(identity, rec, left, len(rec.prompt_token_ids),
                               kv=msg.kv if p else None, p=p))
        elif isinstance(msg, Join) and self.role != "prefill":
            identity, rec = e.reserved.pop(rid, (None, None))
            if rec is None:
                raise WireError(f"unknown request id {rid!r}", rid)
            left = (rec.params.max_tokens or 16) - 1 - len(rec.output_token_ids)
            choices = [r.choice_index for r in msg.first]
            if left <= 0 or not choices:
                return
            ctx = len(rec.prompt_token_ids) + len(rec.output_token_ids)
            job = Job(identity, rec, dict.fromkeys(choices, left), 0,
                       itertools.cycle(self.word_ids))
            if rec.output_token_ids:  # a re-submission: recompute prompt + output + last
                job.prefill = ctx + 1
                e.add(job)
            else:  # the prompt's KV comes from P
                job.kv_len = ctx
                e.arrive(job, now)
        elif isinstance(msg, Abort):
            e.abort(rid)
        else:
            raise WireError(f"a fake {self.role} worker does not take "
                            f"{msg.__struct_config__.tag}", rid)

    def finish(self, plan: StepPlan, started: float) -> None:
        now = time.monotonic()
        out = self.engine.complete(plan, now)
        self.rates.observe(plan.prefill_tokens, plan.num_seqs, now - started,
                           decodes=len(plan.decodes))
        load = self.load()
        frames: dict[bytes, list[TokenRow]] = {}
        for job, rows in out:
            self.num_tokens += len(rows)
            if job.p:
                self.send(job.identity, First(rid=job.rid, out=rows, load=load))
            else:
                frames.setdefault(job.identity, []).extend(rows)
        for identity, rows in frames.items():
            self.send(identity, Step(seq=load["seq"], out=rows, load=load))

    def receive(self, poller: zmq.Poller, until: float) -> None:
        """Handle what arrives before `until` (returns after the first batch)."""
        wait_ms = max(0.0, until - time.monotonic()) * 1e3
        # zmq polls whole milliseconds and may wake late: poll until ~1 ms before, then sleep
        if not poller.poll(max(0, int(wait_ms) - 1)):
            time.sleep(max(0.0, until - time.monotonic()))
            return
        while True:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            try:
                self.on_message(identity, DATA_PATH.decode(frame), time.monotonic())
            except WireError as e:
                self.send(identity, Error(rid=e.rid, reason=str(e)))

    def run(self) -> None:
        http = self.serve_http()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        m = self.model
        logger.info("%s ready: http=http://%s:%d data=%s step model %s x%g: floor %.2f ms, "
                    "%.1fk prompt tokens/s", self.name, self.args.host, self.args.port,
                    self.data_address, self.args.step_model, self.args.time_scale,
                    m.floor_s * 1e3, 1 / m.token_s / 1e3)
        step: tuple[StepPlan, float, float] | None = None  # (plan, started, ends)
        while not self.stop.is_set():
            now = time.monotonic()
            for job in self.engine.due(now):  # P: transfers ended
                self.send(job.identity, Transfer(rid=job.rid, ok=True, transport="fake",
                                                 load=self.load()))
            if step is None and (plan := self.engine.schedule()) is not None:
                step = (plan, now, now + plan.seconds)
                if self.busy_since is not None:  # back to back: the time between the steps
                    self.overrun_s += now - sum(self.busy_since)
                    self.overrun_steps += 1
            elif step is None:  # nothing to run: the next step starts fresh
                self.busy_since = None
            until = now + 0.05 if step is None else step[2]
            nxt = self.engine.next_due()
            if nxt is not None:
                until = min(until, nxt)
            self.receive(poller, until)
            if step is not None and time.monotonic() >= step[2]:
                self.finish(step[0], step[1])
                self.busy_since = (step[1], step[0].seconds) if self.engine.has_work() else None
                step = None
        http.shutdown()
        self.sock.close(0)
        self.ctx.term()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("both", "prefill", "decode"), default="both")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100, help="HTTP port; the data path is port+1")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="request -> first token")
    p.add_argument("--itl-ms", type=float, default=10.0, help="gap between later tokens")
    p.add_argument("--batch", action="store_true", help="one global step clock (like a real D)")
    p.add_argument("--model", default=None, help="checkpoint the proxy serves (default: built-in)")
    p.add_argument("--max-model-len", type=int, default=65536)
    p.add_argument("--internal-token", default=os.environ.get("PDSERVE_INTERNAL_TOKEN") or None,
                   help="checked on every data-path message, as a real worker does (default: "
                   "$PDSERVE_INTERNAL_TOKEN; none: no check)")
    p.add_argument("--name", default=None)
    m = p.add_argument_group("--step-model mode (module docstring)")
    m.add_argument("--step-model", default=None, metavar="PATH",
                   help="a fitted step model (bench/step_model.py), or serving_gpu.py's JSON")
    m.add_argument("--time-scale", type=float, default=1.0,
                   help="every modelled time (steps, transfers) times this")
    m.add_argument("--max-num-batched-tokens", type=int, default=2048)
    m.add_argument("--mixed-step-tokens", type=int, default=None,
                   help="the budget of a step that decodes (the engine's option)")
    m.add_argument("--max-num-seqs", type=int, default=256)
    m.add_argument("--transfer-gbps", type=float, default=20.0,
                   help="P -> D KV transfer rate, GB/s (10^9 bytes); 0: instant")
    m.add_argument("--kv-bytes-per-token", type=int, default=0,
                   help="KV bytes per prompt token moved (default: the model's)")
    m.add_argument("--kv-capacity-tokens", type=int, default=0,
                   help="the KV pool load reports count against (default: the model's)")
    args = p.parse_args(argv)
    if args.time_scale <= 0 or args.max_num_batched_tokens <= 0 or args.max_num_seqs <= 0:
        p.error("--time-scale, --max-num-batched-tokens and --max-num-seqs must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    worker = (StepModelWorker if args.step_model else FakeWorker)(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    worker.run()


if __name__ == "__main__":
    main()
