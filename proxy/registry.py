"""The proxy's view of its workers: identity, health, load, and compatibility.

Each worker is known by its HTTP base URL. At start and every `interval` the registry reads
GET /health (and /info until known); two failures in a row eject the worker (its in-flight
requests fail over at once), a success readmits it. Its data-path link pings the step loop
twice a second: silent past `silence_limit` it is ejected too (a frozen process, a wedged
loop), readmitted when it answers again. A worker whose /info does not match
the proxy's model (config or tokenizer hash) or the other workers' KV layout is refused,
with the reason shown in the proxy's /health. Load comes from every data-path frame (D's
STEP frames, P's FIRST answers, a report after any message no step answered); what was routed
or sent since and not yet acknowledged by a report is counted on top, so a burst does not
herd onto one worker, nor overfill it, between reports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx
import zmq

from pdserve.common import wire
from pdserve.common.compat import compat_mismatch
from pdserve.common.logs import Throttled
from pdserve.proxy import metrics
from pdserve.proxy.workers import WorkerLink

logger = logging.getLogger(__name__)

PREFIX_MEMORY = 50_000  # block hashes remembered per worker (LRU)
flood = Throttled(logger, 60.0)


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (A and AAAA records), without blocking the loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


@dataclass(eq=False)
class Worker:
    url: str
    role: str = "unknown"
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    link: WorkerLink | None = None
    healthy: bool = False
    refused: str | None = None
    status: str = "unknown"  # as its /health says it: ok, warming, dead (with `reason`)
    reason: str = ""
    failures: int = 0
    active: int = 0  # requests this proxy has in flight on it
    prefixes: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None (LRU)
    joined: bool = False  # added at runtime (POST /workers, discovery), not the command line
    found_by: tuple[str, str, int] | None = None  # the discovery entry whose DNS names it
    drain: bool = False  # drained: no new requests; it leaves once idle
    drain_by: str = ""  # who drains it: "operator" (POST .../drain) or "discovery"
    drained_itself: bool = False  # its /health said "draining" (SIGTERM) since it last served

    @property
    def draining(self) -> bool:
        """No new requests: an operator drains it, or it drains itself (SIGTERM)."""
        return self.drain or self.status == "draining"

    @property
    def load(self) -> dict[str, Any]:
        return self.link.load if self.link is not None else {}

    @property
    def usable(self) -> bool:
        return self.healthy and self.refused is None and self.link is not None and \
            self.link.alive and not self.draining

    def score(self) -> float:
        """Lower is better: queued + running as last reported, plus what is on its way."""
        load = self.load
        base = load.get("num_requests_running", 0) + load.get("num_requests_waiting", 0)
        pending = load.get("pending_prefill_tokens", 0) / 512.0  # P: queued prompt work
        sent = self.link.in_flight()[0] if self.link is not None else 0
        return base + pending + sent + 2.0 * load.get("kv_cache_usage_perc", 0.0)

    def has_room(self) -> bool:
        """Whether a request sent now starts at once rather than queueing on the worker (the
        admission queue's test), counting what is on its way there (`WorkerLink.in_flight`)
        on top of its latest report. A P: no prompt pending and none sent it unacknowledged
        (else what comes now waits for the step in progress, then for its own), and less
        than one step's token budget routed to it (requests routed together share a step).
        A D or both-role worker: its sequences under max_num_seqs. One that answered busy
        has none until its next report; one that reported nothing yet has room."""
        link, load, limits = self.link, self.load, self.info.get("limits", {})
        if link.busy:
            return False
        if self.role == "prefill":
            return load.get("pending_prefill_tokens", 0) == 0 and link.unacked == 0 and \
                link.in_flight()[1] < limits.get("max_num_batched_tokens", float("inf"))
        seqs = load.get("num_requests_running", 0) + load.get("num_requests_waiting", 0)
        return seqs + link.in_flight()[0] < limits.get("max_num_seqs", float("inf"))

    def assign(self, rid: str, hashes: list[int], prompt_tokens: int) -> None:
        """Request `rid` goes to this worker: count it as on its way (`release` when it ends)
        and remember its prompt's blocks (the worker's prefix cache will hold them)."""
        self.active += 1
        self.link.routed[rid] = prompt_tokens
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > PREFIX_MEMORY:
            self.prefixes.popitem(last=False)

    def release(self, rid: str) -> None:
        """Request `rid` ended here; if it ended before anything was sent (refused, its client
        gone), it is no longer on its way. What was sent, the worker's reports account for."""
        self.active -= 1
        self.link.routed.pop(rid, None)

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            n += 1
        return n

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "role": self.role, "name": self.name, "healthy": self.healthy,
                "status": "draining" if self.drain else self.status,
                **({"reason": self.reason} if self.reason else {}),
                **({"joined": True} if self.joined else {}),
                "refused": self.refused, "active": self.active,
                "data_path": None if self.link is None else
                ("ok" if self.link.alive else f"silent for {self.link.silence():.1f} s"),
                "transport": self.load.get("kv_transports") or self.info.get("kv_peers"),
                "load": {k: v for k, v in self.load.items() if isinstance(v, int | float)}}


class Registry:
    """All workers; `start()` fetches their /info and begins health checks."""

    def __init__(self, urls: dict[str, list[str]], token: str = "", expected: dict | None = None,
                 interval: float = 1.0, silence_limit: float = 2.0,
                 discover: list[tuple[str, str, int]] | None = None):
        self.workers = [Worker(u, role) for role, us in urls.items() for u in us]
        # (role, DNS name, port): every address the name resolves to is such a worker,
        # re-resolved before each round of health checks (`--discover`)
        self.discover = list(discover or [])
        self.resolve = _resolve  # (host, port) -> addresses; tests put a fake here
        # URLs an operator drained out while their name still lists them: discovery does not
        # take them back until the name stops listing them (or an operator adds them)
        self.drained_out: dict[str, tuple[str, str, int]] = {}  # URL -> its discovery entry
        self._tasks: set[asyncio.Task] = set()  # a joining worker's check, a leaver's close
        self._checks: set[asyncio.Task] = set()  # (those of them that are checks)
        self.token = token
        self.expected = expected or {}  # the proxy's own config/tokenizer hashes
        self.interval = interval
        self.silence_limit = silence_limit  # of a worker's data path before it is ejected
        self.reference: dict[str, Any] | None = None
        self.http: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self.admitted = asyncio.Event()  # set once a worker was first usable (accepted, healthy)
        # set once two rounds of health checks ended: a worker whose first check failed
        # (a loaded host answering late) gets a second before requests hear "nobody serves"
        self.checked = asyncio.Event()
        self.served_once = False  # whether `ready()` was ever true (restarts are waited for)
        self.on_transfer = self.on_report = None
        # both-role workers prefill for others too (`--placement slo`: flexible roles)
        self.flexible_roles = False

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self) -> None:
        """Begin health checks in the background (the first round at once): the proxy
        serves, and answers /health with the reason, while workers come up."""
        self.http = httpx.AsyncClient(timeout=5.0, headers=self._headers())
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def ready(self) -> bool:
        """Whether a request can be served now: a D (with or without a P: alone it prefills
        prompts itself) or a both-role worker is usable."""
        ok = bool({"decode", "both"} & {w.role for w in self.workers if w.usable})
        self.served_once = self.served_once or ok
        return ok

    def serves(self) -> str:
        """What the proxy can serve now, in words (its /health says it)."""
        n = {r: len(self.usable(r)) for r in ("prefill", "decode", "both")}
        if n["prefill"] and (n["decode"] or n["both"]):
            how = f"prefill/decode: {n['prefill']} P + " + " + ".join(
                x for x in (f"{n['decode']} D" if n["decode"] else "",
                            f"{n['both']} both-role as D" if n["both"] else "") if x)
        elif n["decode"]:
            how = f"decode workers only ({n['decode']} D, no P: D prefills every prompt)"
        else:
            how = ""
        if n["both"] and not n["prefill"]:
            how = (how + "; " if how else "") + f"{n['both']} both-role worker(s)"
        warming = [w.name or w.url for w in self.workers if w.status == "warming"]
        if warming:
            how = (how + "; " if how else "") + f"warming up: {', '.join(warming)}"
        return how or "nothing: no decode or both-role worker is usable"

    async def _loop(self) -> None:
        rounds = 0
        while True:
            try:
                await self.discover_workers()
                await self.check_all()
            except Exception:  # noqa: BLE001 - health checks must go on
                logger.exception("health check round failed")
            rounds += 1
            if rounds >= 2:
                self.checked.set()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers))
        for w in list(self.workers):
            self._leave_if_done(w)

    # ---- membership at runtime (POST /workers, POST /workers/{name}/drain, --discover) -----

    async def discover_workers(self) -> None:
        """--discover: the addresses each name resolves to now are its workers; new ones
        join, those no longer listed drain (they leave once idle). A failed lookup changes
        nothing (a DNS blip must not drain a cluster)."""
        for entry in self.discover:
            role, host, port = entry
            try:
                addresses = await self.resolve(host, port)
            except OSError as e:
                flood.warning(f"dns-{host}", "discovery: cannot resolve %s (%s); workers kept",
                              host, e)
                continue
            urls = {f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}"
                    for a in addresses}
            for url, by in list(self.drained_out.items()):
                if by == entry and url not in urls:  # dropped from the records: forgotten
                    del self.drained_out[url]
            for url in sorted(urls - self.drained_out.keys()):
                w, _ = self.add(url, role, by="discovery")
                w.found_by = w.found_by or entry
            for w in list(self.workers):
                if w.found_by == entry and w.url not in urls and not w.drain:
                    logger.info("discovery: %s no longer lists %s: draining it", host, w.url)
                    self.start_drain(w, by="discovery")

    def add(self, url: str, role: str = "unknown", by: str = "operator") -> tuple[Worker, bool]:
        """A worker joins (its URL; its role as its /info says, `role` until then): checked
        at once, routed to once its /health says ok. Returns it and whether it is new (a URL
        already known is that worker; one being drained is taken back, by an operator, or
        by discovery from its own drain)."""
        url = url.rstrip("/")
        if by == "operator":
            self.drained_out.pop(url, None)
        for w in self.workers:
            if w.url == url:
                if w.drain and (by == "operator" or w.drain_by == by):
                    w.drain = False
                    logger.info("worker %s (%s): drain called off, serving again",
                                w.name or w.url, w.role)
                return w, False
        w = Worker(url, role, joined=True)
        self.workers.append(w)
        logger.info("worker %s joins (%s)", url, role)
        if self._task is not None:  # started: its first check now, not at the next round
            self._checks.add(self._background(self._check(w)))
        return w, True

    def find(self, key: str) -> Worker | None:
        """A worker by its name (as its /info says) or its URL."""
        key = key.rstrip("/")
        return next((w for w in self.workers if key in (w.name, w.url)), None)

    def drains_itself(self, w: Worker) -> None:
        """`w` said it drains (its /health, or an Error "draining" to a request): nothing new
        goes to it; a worker that joined at runtime leaves once it is gone."""
        if not w.drained_itself:
            logger.info("worker %s (%s) drains itself%s", w.name or w.url, w.role,
                        f": {w.reason}" if w.reason else "")
        w.status, w.drained_itself, w.failures = "draining", True, 0

    def start_drain(self, w: Worker, by: str = "operator") -> None:
        """No new requests for `w`; the ones it runs finish; then it leaves the registry."""
        if not w.drain:
            w.drain, w.drain_by = True, by
            logger.info("worker %s (%s) draining: %d request(s) to finish", w.name or w.url,
                        w.role, w.active)
        self._leave_if_done(w)

    def _leave_if_done(self, w: Worker) -> None:
        """A drained worker with nothing in flight, or one that joined at runtime, drained
        itself (SIGTERM) and is now gone, leaves."""
        gone = w.joined and w.drained_itself and w.status == "unreachable" and w.active == 0
        if not ((w.drain and w.active == 0) or gone) or w not in self.workers:
            return
        self.workers.remove(w)
        if w.found_by is not None and w.drain_by == "operator":
            self.drained_out[w.url] = w.found_by
        logger.info("worker %s (%s) left", w.name or w.url, w.role)
        for labels in [(w.url, w.role)] + [(w.url, w.role, k) for k in w.load]:
            try:
                (metrics.WORKER_HEALTHY if len(labels) == 2 else metrics.WORKER_LOAD).remove(
                    *labels)
            except KeyError:  # never exported
                pass
        if w.link is not None:
            link, w.link = w.link, None
            self._background(link.close())

    def _background(self, coro) -> asyncio.Task:
        """Run `coro` beside the caller, holding its task (the loop keeps only weak references)
        until it ends; `close` awaits what is left."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._checks.discard)
        return task

    async def _check(self, w: Worker) -> None:
        assert self.http is not None
        try:
            if not w.info:
                r = await self.http.get(w.url + "/info")
                r.raise_for_status()
                self._admit(w, r.json())
            r = await self.http.get(w.url + "/health")
            ok = r.status_code == 200
            try:
                body = r.json()
                w.status, w.reason = str(body.get("status", "")), str(body.get("reason") or "")
            except (ValueError, AttributeError):
                w.status, w.reason = ("ok" if ok else "failing"), ""
        except httpx.TimeoutException as e:
            # a worker saturating its CPU can answer HTTP slowly while its step loop answers
            # the link's pings: only one silent there too counts as failing
            ok = w.healthy and w.link is not None and w.link.alive
            logger.debug("health check of %s timed out (%s)%s", w.url, e,
                         "; its data path answers, kept" if ok else "")
        except (httpx.HTTPError, ValueError) as e:
            ok = False
            w.status, w.reason = "unreachable", str(e)
            logger.debug("health check of %s failed: %s", w.url, e)
        if w.status == "draining":  # SIGTERM: it finishes what it runs, takes nothing new
            self.drains_itself(w)
            return  # alive: its link stays, and the requests on it finish
        if ok:
            w.drained_itself = False
        if ok and w.refused is None and w.info and w.link is None:
            self._connect(w)  # ready: its step loop runs and answers the link's pings
        if ok:
            came = not w.healthy and w.refused is None
            w.healthy, w.failures = True, 0
            if came:
                self.admitted.set()  # usable now: /info accepted, /health answered, linked
                logger.info("worker %s (%s) admitted", w.name or w.url, w.role)
                self._introduce(w)
                if self.on_report is not None:
                    self.on_report()  # room for requests waiting
            return
        w.failures += 1
        if w.healthy and w.failures >= 2:
            w.healthy = False
            logger.warning("worker %s (%s) ejected: health checks failing", w.name or w.url,
                           w.role)
            metrics.WORKER_EJECTIONS.labels(w.url, w.role, "health").inc()
            if w.link is not None:
                w.link.fail_all(f"worker {w.name or w.url} is unreachable")

    def _admit(self, w: Worker, info: dict[str, Any]) -> None:
        w.info, w.role, w.name = info, info.get("role", w.role), info.get("name", w.url)
        compat = info.get("compat", {})
        w.refused = self._mismatch(compat)
        if w.refused:
            logger.error("worker %s refused: %s", w.url, w.refused)
            return
        if self.reference is None:
            self.reference = compat

    def _connect(self, w: Worker) -> None:
        """Open the data-path link of a worker whose /health said ok (not while it warms
        up: its step loop, which answers the pings, is not running yet)."""
        w.link = WorkerLink(w.info["data_address"], self.token, silence_limit=self.silence_limit)
        w.link.on_transfer, w.link.on_report = self.on_transfer, self.on_report
        w.link.on_dead = lambda w=w: metrics.WORKER_EJECTIONS.labels(
            w.url, w.role, "data_path").inc()

    def _introduce(self, w: Worker) -> None:
        """A P or D just became usable: have each P open its KV session to each D now, not
        at the first request (a cuda_ipc handshake maps P's pool into D). Both-role workers
        are D's (they take a P's KV) and, with flexible roles, P's too."""
        def kv(d: Worker) -> str | None:
            a = d.info.get("kv_address")
            return a if isinstance(a, str) else None

        prefillers, decoders = self.prefillers(), self.usable("decode") + self.usable("both")
        pairs = [(w, d) for d in decoders if w in prefillers and d is not w] + \
                [(p, w) for p in prefillers if w in decoders and p is not w]
        by_p: dict[int, tuple[Worker, list[str]]] = {}
        for p, d in pairs:
            if kv(d) is not None:
                by_p.setdefault(id(p), (p, []))[1].append(kv(d))
        for p, kvs in by_p.values():
            if p.usable:
                try:
                    p.link.send(wire.Connect(kv=kvs))
                except zmq.ZMQError as e:  # a link closing: the first offer connects instead
                    logger.debug("connect to %s not sent: %s", p.url, e)

    def prefillers(self) -> list[Worker]:
        """The usable workers that can prefill for another: P's, and with flexible roles the
        both-role workers that say they can (`acts_as_prefill` in /info)."""
        return self.usable("prefill") + ([w for w in self.usable("both")
                                          if w.info.get("acts_as_prefill")]
                                         if self.flexible_roles else [])

    def _mismatch(self, compat: dict[str, Any]) -> str | None:
        for key, want in self.expected.items():
            if compat.get(key) != want:
                return f"{key} {compat.get(key)!r} does not match the proxy's model ({want!r})"
        why = compat_mismatch(self.reference, compat) if self.reference is not None else None
        return f"not like the other workers: {why}" if why else None

    def usable(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role and w.usable]

    def max_model_len(self) -> int:
        lens = [w.info["compat"]["max_model_len"] for w in self.workers
                if w.info and w.refused is None]
        return min(lens) if lens else 0

    def snapshot(self) -> list[dict[str, Any]]:
        return [w.snapshot() for w in self.workers]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._checks:  # a joining worker's first check: cut short
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # links close to the end
        for w in self.workers:
            if w.link is not None:
                await w.link.close()
        if self.http is not None:
            await self.http.aclose()
