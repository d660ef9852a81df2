"""Throttled warnings: a flood of one kind logs one line per interval, with the count."""

from __future__ import annotations

import logging

from pdserve.common.logs import Throttled


def test_a_flood_logs_one_line_per_kind_per_interval(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pdserve.common.logs.time.monotonic", lambda: now[0])
    log = Throttled(logging.getLogger("flood-test"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="flood-test"):
        for i in range(40_000):  # a garbage-frame flood in one second
            log.warning("malformed", "malformed message %d", i)
            log.warning("refused", "refused %d", i)
            now[0] += 1 / 40_000
        now[0] += 10.0
        log.warning("malformed", "malformed message %d", 40_000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["malformed message 0", "refused 0",
                     "malformed message 40000 (and 39999 more like it in the last 11 s)"]
