"""Warnings that a flood cannot multiply: `Throttled.warning(kind, msg, *args)` logs the first
line of each kind, then at most one line per kind per `interval` seconds, each saying how many
lines of that kind it stands for. Kinds are fixed strings of the code (never the peer's
input), so the table stays small. One thread per instance, as the loops that use it are."""

from __future__ import annotations

import logging
import time


class Throttled:
    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last logged, skipped since)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._kinds.get(kind, (float("-inf"), 0))
        if now - last < self.interval:
            self._kinds[kind] = (last, skipped + 1)
            return
        self._kinds[kind] = (now, 0)
        if skipped:
            msg += f" (and {skipped} more like it in the last {now - last:.0f} s)"
        self.logger.warning(msg, *args)
