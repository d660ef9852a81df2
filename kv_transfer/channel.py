"""ZMQ plumbing shared by both sides: socket options (the tcp data sockets' too), and the
I/O thread that owns sockets.

ZMQ sockets are not thread-safe, so each endpoint (KVReceiver on D, KVSender on P) runs one
I/O thread that owns all its sockets. The engine's step loop never blocks on it: it puts
commands on a queue (waking the thread through an inproc pipe) and drains events, which
wake the step loop in turn: its poller watches `events_fd` (a self-pipe written on each
event), so a transfer's end reaches the loop at once, not at its next timer.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.common.wakeup import Waker

logger = logging.getLogger(__name__)

HEARTBEAT_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


def configure(sock: zmq.Socket, max_msg_bytes: int) -> None:
    """Options every data-path socket gets: no lingering on close, ZMTP heartbeats (a dead
    peer's connection is dropped), and a cap on message size (bigger ones drop the peer)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)


SAME_HOST_SOCKET_BUFFER = 256 << 10


def configure_data_socket(sock: socket.socket) -> None:
    """Options of a connected tcp data socket (either end): no Nagle delay on the batch
    headers; TCP keepalive, so a connection whose peer host vanished errors out in ~25 s
    instead of blocking its thread for good; and, when both ends are on this host, small
    send and receive buffers: the receiver's copy then reads what the sender's copy just
    wrote while it is still in the CPU's caches (2-core box, 2 connections, 4k tokens:
    ~4.4 -> 6.3-6.9 GB/s; 128-256 KiB best, 64 KiB and >= 1 MiB worse). Across hosts the
    kernel's autotuning stays (the window must cover the bandwidth-delay product)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; elsewhere the system's keepalive defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if same_host(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SAME_HOST_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SAME_HOST_SOCKET_BUFFER)


def same_host(sock: socket.socket) -> bool:
    """Whether a connected socket's two ends are on this host (loopback, or one address)."""
    try:
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
        return local == peer or ipaddress.ip_address(peer).is_loopback
    except (OSError, ValueError):
        return False


class IOThread:
    """Runs `poll_once` in a daemon thread until `close`; commands from other threads are
    queued with `submit` and run inside the thread, in order."""

    def __init__(self, name: str):
        self.ctx = zmq.Context()
        self._commands: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self.poller = zmq.Poller()
        self.poller.register(self._wake_rx, zmq.POLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._events_waker = Waker()

    @property
    def events_fd(self) -> int:
        """Readable while events wait to be drained: register it with the consumer's poller."""
        return self._events_waker.fd

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run fn() in the I/O thread soon. Safe from any thread; never blocks."""
        self._commands.put(fn)
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the thread has wake-ups pending already

    def emit(self, event: Any) -> None:
        self._events.put(event)
        self._events_waker.wake()

    def events(self) -> list[Any]:
        """Drain the events produced so far (non-blocking). An event emitted after the
        wake-ups were drained wakes `events_fd` again: none is left unannounced."""
        self._events_waker.drain()
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def next_timeout_ms(self) -> int:
        """Override: how long the poll may sleep (until the nearest deadline)."""
        return 50

    def handle(self, sock: zmq.Socket) -> None:
        """Override: a socket registered with `self.poller` is readable."""

    def tick(self, now: float) -> None:
        """Override: called every loop iteration (deadlines)."""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready = dict(self.poller.poll(self.next_timeout_ms()))
                if self._wake_rx in ready:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                while True:
                    try:
                        fn = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    fn()
                for sock in ready:
                    if sock is not self._wake_rx:
                        self.handle(sock)
                self.tick(time.monotonic())
            except zmq.ContextTerminated:
                return
            except Exception:  # one bad message must not kill the data path
                logger.exception("%s: error in the I/O loop", self._thread.name)
        self.on_close()

    def on_close(self) -> None:
        """Override: close sockets (runs in the I/O thread)."""

    def close(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            self._events_waker.close()
            return
        self._stop.set()
        self.submit(lambda: None)
        self._thread.join(timeout)
        with self._wake_lock:
            self.ctx.destroy(linger=0)  # closes every socket left (the thread has ended)
        self._events_waker.close()
