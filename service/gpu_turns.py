"""Prefill first on a shared GPU: P and D processes on one GPU take turns (`pdserve serve
--prefill-first`).

On one GPU, a prompt that P prefills while D runs decode steps beside it runs slower (time
slices, or shared SMs under MPS): its TTFT loses to a both-role worker's, whose scheduler
runs the prefill chunk in place of a decode step. With turns, P tells each D on its GPU when
it has prefill work and when it has none (one datagram per change, over a Unix socket that D
binds); D starts no decode step while a P is busy, for at most `max_hold` at a time: after a
hold runs out D takes one step, then may hold again. So the prompt runs at nearly full speed
and decode streams stall meanwhile, as on a both-role worker. P's turn lasts until the KV of
the prompts it prefilled has reached D (at most 20 ms past each prefill,
prefill_half.TURN_KV_GRACE_S): a decode step started as P goes idle would run while the pull
copies, and the request would join only the step after it. One step is never held: the one
that carries a just-joined request's first D token (its token 2), which would otherwise wait
for the next prompt's whole prefill (WorkerLoop.urgent_step). D waits on its socket (its step
loop polls the fd), never on a timer, and a P that died busy holds D for `max_hold` once
(its socket is gone: P's next start announces again).

Datagram: b"B" or b"I" (busy / idle) followed by the sender's name, so D follows several Ps.
"""

from __future__ import annotations

import logging
import os
import socket

from pdserve.service import metrics

logger = logging.getLogger(__name__)


class TurnAnnouncer:
    """P's side: tell each D's socket when this P has prefill work and when not."""

    def __init__(self, paths: list[str], name: str):
        self.paths = list(paths)
        self.name = name.encode()
        self.busy = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0

    def set(self, busy: bool) -> None:
        if busy == self.busy:
            return
        self.busy = busy
        msg = (b"B" if busy else b"I") + self.name
        for path in self.paths:
            try:
                self.sock.sendto(msg, path)
                self.sent += 1
            except OSError as e:  # D not up yet, restarting, or its queue full: no turn
                logger.debug("gpu turns: %s unreachable: %s", path, e)

    def close(self) -> None:
        self.set(False)
        self.sock.close()


class TurnListener:
    """D's side: whether to hold its next decode step, and until when at most."""

    def __init__(self, path: str, max_hold_s: float):
        self.path = path
        self.max_hold_s = max_hold_s
        if os.path.exists(path):
            os.unlink(path)  # a previous run's socket file
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.busy: set[bytes] = set()  # the Ps now busy
        self.hold_start: float | None = None
        self.holds = 0  # holds begun (a metric of how often D yielded)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def drain(self) -> None:
        while True:
            try:
                msg = self.sock.recv(512)
            except (BlockingIOError, InterruptedError):
                return
            if msg[:1] == b"B":
                self.busy.add(msg[1:])
            elif msg[:1] == b"I":
                self.busy.discard(msg[1:])
        # (an unknown datagram is ignored: the socket is in the cluster's private folder)

    def hold_until(self, now: float) -> float | None:
        """None: D may step now. Else the time D's hold ends (unless a P goes idle first)."""
        self.drain()
        if not self.busy:
            self.hold_start = None
            return None
        if self.hold_start is None:
            self.hold_start = now
            self.holds += 1
            metrics.GPU_TURN_HOLDS.inc()
        until = self.hold_start + self.max_hold_s
        return until if now < until else None

    def stepped(self, now: float) -> None:
        """D took a step: a hold that ran out starts over after it."""
        if self.hold_start is not None and now >= self.hold_start + self.max_hold_s:
            self.hold_start = None

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
