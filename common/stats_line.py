"""The periodic stats line a process logs while it works, in vLLM's words:

    Avg prompt throughput: 2048.0 tokens/s, Avg generation throughput: 96.3 tokens/s,
    Running: 4 reqs, Waiting: 0 reqs, KV cache usage: 3.1%

`StatsLine.tick()` is called often (a worker's step loop, the proxy's timer); at most every
`interval` seconds it samples the process's totals and logs the rates since the last line, when
there was anything to say: tokens moved or requests running or waiting, plus one line after the
process goes idle (so the last rates read 0), then silence until work comes back.
`interval` <= 0: never. Torch-free (the proxy uses it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Totals:
    """What a process reports at one moment: token totals since start, current queues."""

    prompt_tokens: float
    generation_tokens: float
    running: int
    waiting: int
    tail: str = ""  # more of the line (", KV cache usage: 3.1%")


class StatsLine:
    def __init__(self, log: Callable[[str], None], interval: float,
                 sample: Callable[[], Totals]):
        self.log = log
        self.interval = interval
        self.sample = sample
        self._last: Totals | None = None
        self._last_t = 0.0
        self._active = False

    def tick(self, now: float | None = None) -> None:
        if self.interval <= 0:
            return
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last_t < self.interval:
            return
        totals = self.sample()
        last, dt = self._last, now - self._last_t
        self._last, self._last_t = totals, now
        if last is None or dt <= 0:
            return  # the first sample: rates need two
        prompt = (totals.prompt_tokens - last.prompt_tokens) / dt
        gen = (totals.generation_tokens - last.generation_tokens) / dt
        active = bool(prompt or gen or totals.running or totals.waiting)
        if active or self._active:
            self.log(f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation "
                     f"throughput: {gen:.1f} tokens/s, Running: {totals.running} reqs, "
                     f"Waiting: {totals.waiting} reqs{totals.tail}")
        self._active = active
