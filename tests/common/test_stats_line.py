"""The periodic stats line (common/stats_line.py): rates between samples at most every
interval, a line only while there is work plus one after it ends, none when off."""

from __future__ import annotations

from pdserve.common.stats_line import StatsLine, Totals


def test_rates_idle_silence_and_off() -> None:
    lines: list[str] = []
    now = {"t": Totals(0, 0, 0, 0)}
    line = StatsLine(lines.append, 10.0, lambda: now["t"])
    line.tick(0.0)  # the first sample: no rates yet
    now["t"] = Totals(2000, 50, 3, 1, ", KV cache usage: 4.0%")
    line.tick(5.0)  # before the interval: nothing sampled
    assert lines == []
    line.tick(10.0)
    assert lines == ["Avg prompt throughput: 200.0 tokens/s, Avg generation throughput: 5.0 "
                     "tokens/s, Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 4.0%"]
    now["t"] = Totals(2000, 150, 0, 0)
    line.tick(30.0)  # 100 tokens in 20 s, then idle: one more line
    assert lines[-1].startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation "
                                "throughput: 5.0 tokens/s, Running: 0 reqs")
    line.tick(40.0)  # idle: the last line said so; silence from here
    line.tick(50.0)
    assert len(lines) == 3 and lines[-1].startswith("Avg prompt throughput: 0.0 tokens/s, "
                                                    "Avg generation throughput: 0.0")
    line.tick(60.0)
    assert len(lines) == 3
    off = StatsLine(lines.append, 0, lambda: Totals(10**6, 10**6, 9, 9))
    off.tick(0.0)
    off.tick(100.0)
    assert len(lines) == 3
