"""`pdserve bench` against a fake OpenAI server whose delays are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdserve.cli import main
from tests.bench.fake_openai import FakeOpenAI

MS = 1e-3
# Tests share 2 cores with whatever else runs, so a single sample may be late by a
# scheduler slice: medians are held to EXACT, every sample to SLACK.
EXACT = 3 * MS  # against the server's own clock: loopback and wake-up only
SLACK = 15 * MS
TOL = 15 * MS  # against the nominal delays: a loaded machine may oversleep


def bench(server: FakeOpenAI, tmp: Path, *args: str) -> dict:
    out = tmp / "r.json"
    code = main(["bench", "--base-url", server.url, "--no-progress", "--result-json", str(out),
                 *args])
    assert code == 0
    return json.loads(out.read_text())


def test_known_delays_are_measured_exactly(tmp_path: Path, capsys) -> None:
    with FakeOpenAI(first_delay=50 * MS, itl=20 * MS, num_tokens=6) as server:
        data = bench(server, tmp_path, "--num-prompts", "6", "--concurrency", "1",
                     "--input-len", "16", "--output-len", "6", "--slo-ttft-ms", "500",
                     "--slo-tpot-ms", "100")
        log = server.requests()
    body = log[0]["body"]  # what a server sees: token ids, ignore_eos, usage asked for
    assert body["model"] == "fake-model" and len(body["prompt"]) == 16
    assert all(5 <= t < 4000 for t in body["prompt"])
    assert body["max_tokens"] == 6 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}

    run = data["runs"][0]
    s = run["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (6, 0, 36)
    # Concurrency 1: the client's i-th request is the server's i-th. Every figure is compared
    # with the server's own clock (what it really did), then with the nominal delays.
    ttft_lag, gap_err, e2e_lag = [], [], []
    for r, srv in zip(run["requests"], log):
        sent = [t - srv["arrived"] for t in srv["sent"]]  # token writes, from arrival
        gaps = [b - a for a, b in zip(sent, sent[1:])]
        assert r["ok"] and r["num_output_tokens"] == 6 and r["usage_reported"]
        ttft_lag.append(r["ttft_s"] - sent[0])  # + the request's trip to the server
        e2e_lag.append(r["e2e_s"] - sent[-1])
        gap_err += [abs(a - b) for a, b in zip(r["itl_s"], gaps)]
        assert r["token2_s"] == r["itl_s"][0]
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 5)
        assert r["tpot_s"] == pytest.approx((sent[-1] - sent[0]) / 5, abs=SLACK / 5)
    assert all(-EXACT < x < SLACK for x in ttft_lag + e2e_lag) and max(gap_err) < SLACK
    assert np.median(ttft_lag) < EXACT and np.median(e2e_lag) < EXACT
    assert np.median(gap_err) < EXACT / 3
    assert s["ttft"]["p50"] == pytest.approx(0.050, abs=TOL)
    assert s["token2"]["p50"] == pytest.approx(0.020, abs=TOL)
    assert s["tpot"]["p50"] == pytest.approx(0.020, abs=TOL / 5)
    assert s["e2e"]["p50"] == pytest.approx(0.150, abs=TOL)
    assert s["itl"]["count"] == 30 and s["itl"]["p50"] == pytest.approx(0.020, abs=TOL / 4)
    assert s["duration_s"] == pytest.approx(0.900, abs=4 * TOL)  # 6 in a row x 150 ms
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(36 / s["duration_s"])
    assert s["num_good"] == 6 and s["goodput"] == pytest.approx(s["request_throughput"])
    printed = capsys.readouterr().out
    assert "Successful requests:" in printed and "TPOT" in printed and "Goodput" in printed


def test_chat_endpoint_skips_the_role_chunk(tmp_path: Path) -> None:
    with FakeOpenAI(first_delay=40 * MS, itl=10 * MS, num_tokens=3) as server:
        data = bench(server, tmp_path, "--endpoint", "chat", "--num-prompts", "2",
                     "--input-len", "5", "--output-len", "3", "--model", "fake-model",
                     "--concurrency", "1")
        log = server.requests()
    assert log[0]["body"]["messages"][0]["content"].count(" ") == 4  # five words
    for r, srv in zip(data["runs"][0]["requests"], log):
        # the role chunk goes out at once; TTFT is the first content chunk
        assert r["ok"] and 0 < r["ttft_s"] - (srv["sent"][0] - srv["arrived"]) < SLACK
        assert r["ttft_s"] == pytest.approx(0.040, abs=TOL)


def test_failures_are_counted_never_dropped(tmp_path: Path, capsys) -> None:
    with FakeOpenAI(first_delay=5 * MS, itl=2 * MS, num_tokens=3, fail_every=3,
                    break_every=4) as server:
        data = bench(server, tmp_path, "--num-prompts", "12", "--concurrency", "1",
                     "--output-len", "3")
    run = data["runs"][0]
    s = run["summary"]
    # arrivals 3, 6, 9, 12 get HTTP 500; 4 and 8 break mid-stream (12 failed already)
    assert (s["num_requests"], s["completed"], s["failed"]) == (12, 6, 6)
    assert s["errors"] == {"HTTP 500: {\"error\": {\"message\": \"injected failure\"}}": 4,
                           "stream error: injected mid-stream failure": 2}
    assert len(run["requests"]) == 12
    failed = [r for r in run["requests"] if not r["ok"]]
    assert all(r["error"] and r["ttft_s"] is None for r in failed)
    assert s["ttft"]["count"] == 6 and s["total_output_tokens"] == 18
    assert "Failed requests:                            6" in capsys.readouterr().out


def test_result_json_shape_and_several_rates(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with FakeOpenAI(first_delay=5 * MS, itl=2 * MS, num_tokens=2) as server:
        data = bench(server, tmp_path, "--num-prompts", "5", "--request-rate", "200", "inf",
                     "--output-len", "2", "--plot-dir", str(tmp_path / "plots"),
                     "--api-key", "sk-secret", "--slo-ttft-ms", "100")
    assert set(data) == {"tool", "date", "model", "config", "runs"}
    assert data["config"]["api_key"] == "***" and data["config"]["request_rate"] == ["200", "inf"]
    assert [r["request_rate"] for r in data["runs"]] == ["200", "inf"]
    for run in data["runs"]:
        assert set(run) == {"request_rate", "concurrency", "started_at", "summary", "requests"}
        assert {"ttft", "token2", "tpot", "itl", "e2e", "goodput", "request_throughput",
                "output_throughput", "failed", "errors", "duration_s"} <= set(run["summary"])
        assert set(run["summary"]["tpot"]) == {"mean", "p50", "p90", "p99", "count"}
        req = run["requests"][0]
        assert {"index", "ok", "error", "start_s", "ttft_s", "token2_s", "tpot_s", "e2e_s",
                "chunk_times_s", "itl_s", "num_input_tokens", "num_output_tokens"} <= set(req)
    # Poisson at 200/s spreads the starts; inf sends all at once
    assert max(r["start_s"] for r in data["runs"][0]["requests"]) > 0.001
    assert max(r["start_s"] for r in data["runs"][1]["requests"]) < 0.05
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["goodput_vs_rate.png", "latency_cdf_rate_200.png", "latency_cdf_rate_inf.png"]


def test_an_unreachable_server_is_a_clear_error(capsys) -> None:
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "cannot read the model name" in capsys.readouterr().err


def test_plot_dir_is_checked_before_any_request(tmp_path: Path, capsys, monkeypatch) -> None:
    """--plot-dir that cannot be honoured stops the command at once (exit 2, one line), not
    after the whole load has run."""
    import pdserve.bench_metrics as bm

    with FakeOpenAI(first_delay=5 * MS, itl=2 * MS, num_tokens=2) as server:
        monkeypatch.setattr(bm, "_pyplot", lambda: None)  # as without matplotlib
        args = ["bench", "--base-url", server.url, "--no-progress", "--num-prompts", "3"]
        assert main([*args, "--plot-dir", str(tmp_path / "plots")]) == 2
        assert "--plot-dir needs matplotlib" in capsys.readouterr().err
        monkeypatch.setattr(bm, "_pyplot", lambda: object())  # matplotlib there
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        assert main([*args, "--plot-dir", str(blocker / "plots")]) == 2
        assert "--plot-dir" in capsys.readouterr().err
        assert server.requests() == []  # nothing was sent
