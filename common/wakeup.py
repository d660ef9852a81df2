"""A self-pipe that wakes a poll loop from any thread (a step loop's poller watches `fd`).

The worker's step loop sleeps in one `zmq.Poller.poll` on its data-path socket and on the
`fd` of each Waker it was given: the KV endpoints' I/O threads wake it when a transfer event
is ready, a GPU waiter thread when a CUDA event completed, a signal handler when the
process must stop. Nothing on the request path waits on a timer.
"""

from __future__ import annotations

import os


class Waker:
    """`wake()` from any thread (or a signal handler) makes `fd` readable until `drain()`."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._closed = False

    @property
    def write_fd(self) -> int:
        """The pipe's write end (for `signal.set_wakeup_fd`: a signal that lands on another
        thread still wakes the poll, so the main thread runs its Python handler)."""
        return self._w

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def drain(self) -> None:
        """Consume the pending wake-ups (call before looking at what they announced)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._w)
            os.close(self.fd)
