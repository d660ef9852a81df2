"""The load generator's metric definitions on synthetic timestamps (no server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench import BenchConfig, arrival_times, input_lengths, parse_events
from pdserve.bench_metrics import RequestResult, format_table, meets_slo, stats, summarize, tpot


def req(i: int, chunks: list[float], end: float, n: int | None = None, ok: bool = True,
        start: float = 0.0) -> RequestResult:
    return RequestResult(i, ok=ok, start=start, end=end, chunk_times=chunks,
                         num_input_tokens=10, num_output_tokens=len(chunks) if n is None else n,
                         usage_reported=True, error=None if ok else "HTTP 500: x")


def test_percentiles_interpolate_like_numpy() -> None:
    s = stats([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert s["count"] == 4
    assert stats([])["p50"] is None and stats([])["count"] == 0


def test_tpot_is_time_after_the_first_token_per_later_token() -> None:
    assert tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert tpot(1.0, 0.1, 1) is None
    r = req(0, [0.1, 0.15, 0.3, 0.4], end=0.45, n=4)
    assert r.ttft == 0.1 and r.token2 == pytest.approx(0.05)
    assert r.tpot == pytest.approx((0.45 - 0.1) / 3)
    assert r.itls == pytest.approx([0.05, 0.15, 0.1])
    # usage says 7 tokens arrived in 4 chunks: TPOT divides by the tokens, not the chunks
    assert req(1, [0.1, 0.2, 0.3, 0.4], end=0.4, n=7).tpot == pytest.approx(0.05)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [
        req(0, [0.050, 0.07], end=0.090),        # TTFT 50, TPOT 40: good
        req(1, [0.150, 0.16], end=0.170),        # TTFT 150: misses TTFT
        req(2, [0.080, 0.09], end=0.200),        # TPOT 120: misses TPOT
        req(3, [0.100], end=0.100),              # TTFT exactly at the SLO, 1 token: good
        req(4, [], end=0.3, ok=False),           # failed: never good
    ]
    assert [meets_slo(r, 100, 50) for r in results] == [True, False, False, True, False]
    s = summarize(results, duration=2.0, slo_ttft_ms=100, slo_tpot_ms=50)
    assert s["num_good"] == 2 and s["goodput"] == 1.0
    assert s["completed"] == 4 and s["failed"] == 1 and s["errors"] == {"HTTP 500: x": 1}
    assert s["request_throughput"] == 2.0
    assert s["total_output_tokens"] == 7 and s["output_throughput"] == 3.5
    assert s["ttft"]["count"] == 4 and s["itl"]["count"] == 3  # the failed one is not in
    only_ttft = summarize(results, duration=2.0, slo_ttft_ms=100)
    assert only_ttft["num_good"] == 3
    assert summarize(results, duration=2.0)["goodput"] is None
    table = format_table(s, "t")
    assert "Goodput" in table and "Failed requests:" in table and "HTTP 500: x" in table


def test_sse_parsing_skips_role_chunks_and_reads_usage() -> None:
    events = [
        (0.01, b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'),
        (0.05, b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}'),
        (0.06, b': keep-alive comment\ndata: {"choices": [{"index": 0, "delta": {}, '
               b'"finish_reason": "length"}]}'),
        (0.07, b'data: {"choices": [{"index": 0, "text": "b"}]}'),
        (0.08, b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'),
        (0.09, b"data: [DONE]"),
    ]
    r = RequestResult(0, num_input_tokens=99)
    parse_events(events, r)
    assert r.ok and r.chunk_times == [0.05, 0.07]
    assert (r.num_input_tokens, r.num_output_tokens, r.usage_reported) == (3, 2, True)
    bad = RequestResult(1)
    parse_events([(0.1, b'data: {"choices": [{"text": "a"}]}'),
                  (0.2, b'data: {"error": {"message": "boom"}}'), (0.3, b"data: [DONE]")], bad)
    assert not bad.ok and bad.error == "stream error: boom"
    cut = RequestResult(2)
    parse_events([(0.1, b'data: {"choices": [{"text": "a"}]}')], cut)
    assert not cut.ok and "without [DONE]" in cut.error


def test_lengths_and_arrivals_are_seeded() -> None:
    cfg = BenchConfig(num_prompts=2000, input_len_dist="sharegpt", input_len=100)
    lens = input_lengths(cfg, np.random.default_rng(0))
    assert lens == input_lengths(cfg, np.random.default_rng(0))
    assert min(lens) >= 4 and max(lens) <= 800
    assert 85 <= float(np.median(lens)) <= 115  # the median is --input-len
    uni = input_lengths(BenchConfig(num_prompts=500, input_len_dist="uniform", input_len=100,
                                    range_ratio=0.5), np.random.default_rng(0))
    assert min(uni) >= 50 and max(uni) <= 150
    t = arrival_times(4000, 10.0, np.random.default_rng(1))
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    assert t[-1] / 4000 == pytest.approx(0.1, rel=0.1)  # Poisson at 10 req/s
    assert arrival_times(3, math.inf, np.random.default_rng(1)) == [0.0, 0.0, 0.0]


def test_a_workload_file_gives_each_request_its_pair(tmp_path) -> None:
    """--workload: each request draws a (prompt, output) pair of the file, seeded; the
    committed ShareGPT-like mix is one; a bad file is refused when the config is built."""
    from pathlib import Path

    from pdserve.bench import lengths, make_prompts, request_body

    mix = Path(__file__).resolve().parents[2] / "bench" / "data" / "sharegpt_like.json"
    cfg = BenchConfig(num_prompts=400, workload=str(mix))
    pairs = {tuple(p) for p in json.loads(mix.read_text())["pairs"]}
    got = lengths(cfg, np.random.default_rng(0))
    assert got == lengths(cfg, np.random.default_rng(0)) and set(got) <= pairs
    assert len(set(got)) > 300  # drawn across the mix, not one pair
    assert 300 < float(np.median([p for p, _ in got])) < 550  # the file's median prompt: 400
    prompts = make_prompts(cfg, np.random.default_rng(0))
    assert [(n, m) for _, n, m in prompts] == got and all(len(p) == n for p, n, _ in prompts)
    assert request_body(cfg, "m", prompts[0][0], prompts[0][2])["max_tokens"] == got[0][1]
    bad = tmp_path / "bad.json"
    for text in ('{"pairs": []}', '{"pairs": [[0, 5]]}', '[1, 2]', "not json"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="--workload"):
            BenchConfig(workload=str(bad))
