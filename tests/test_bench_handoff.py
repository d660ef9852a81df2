"""bench/handoff.py: its token-2 / ITL / excess arithmetic on synthetic event times, its SSE
decoder, and one short cpu-fake run end to end (fake P and D behind a real proxy)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:  # bench scripts import their neighbours by name
    sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("bench_handoff", ROOT / "bench" / "handoff.py")
handoff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(handoff)


def test_token2_gap_itl_and_excess_from_event_times():
    # (arrival s, tokens carried): token 1 at 50 ms, token 2 at 70 ms, an event with no token,
    # one event with tokens 3 and 4, then tokens 5 and 6 ten ms apart
    events = [(0.050, 1), (0.070, 1), (0.071, 0), (0.080, 2), (0.090, 1), (0.100, 1)]
    times = handoff.token_times(events)
    assert times == [0.050, 0.070, 0.080, 0.080, 0.090, 0.100]
    r = handoff.handoff_numbers(times, sent=0.002)
    assert r["ttft_ms"] == pytest.approx(48.0)
    assert r["token2_gap_ms"] == pytest.approx(20.0)
    # gaps of tokens 3..6 to their predecessors: 10, 0, 10, 10 -> median 10
    assert r["itl_ms"] == pytest.approx(10.0)
    assert r["excess_ms"] == pytest.approx(10.0)
    # too few tokens for an ITL: NaN, never an exception
    short = handoff.handoff_numbers([0.01, 0.02])
    assert short["token2_gap_ms"] == pytest.approx(10.0) and math.isnan(short["excess_ms"])
    s = handoff.summarize([{**handoff.request_record(
        {"status": 200, "error": None, "events": events, "usage_tokens": 6,
         "held_text_events": 0}, 6), "i": 0}])
    assert s["ok"] == 1 and s["zero_token_events"] == 1 and s["multi_token_events"] == 1
    rec = handoff.request_record({"status": 200, "error": None, "events": events,
                                  "usage_tokens": 6, "held_text_events": 0}, 6)
    assert rec["multi_token_at"] == [3] and rec["num_tokens"] == 6
    assert s["excess_ms_p50"] == pytest.approx(10.0) and s["wrong_token_count"] == 0


def test_sse_reader_decodes_chunks_split_anywhere():
    events = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    body = b"".join(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events) + b"0\r\n\r\n"
    for cut in range(1, 12):
        reader, got = handoff.SSEReader(chunked=True), []
        for i in range(0, len(body), cut):
            got += reader.feed(body[i:i + cut])
        assert got == [e.rstrip(b"\n") for e in events] and reader.ended


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cpu_fake_run_end_to_end(tmp_path):
    out = tmp_path / "handoff.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "bench" / "handoff.py"), "--mode", "cpu-fake",
           "--num-requests", "5", "--runs", "1", "--idle-seconds", "3", "--settle-s", "0.5",
           "--out", str(out), "--log-dir", str(tmp_path / "logs")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        stdout, _ = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the script stops its processes on SIGTERM
        stdout, _ = p.communicate(timeout=30)
        pytest.fail(f"bench/handoff.py took over 90 s:\n{stdout.decode()[-3000:]}")
    text = stdout.decode()
    assert p.returncode == 0, text[-3000:]
    assert "| cpu-fake (1 run) |" in text  # the table prints last
    mode = json.loads(out.read_text())["modes"]["cpu-fake"]
    assert "error" not in mode, mode["error"]
    assert mode["ready_s"] > 0 and "prefill/decode" in mode["serves"]
    (run,) = mode["runs"]
    reqs = run["requests"]
    assert len(reqs) == 5 and all(r["error"] is None for r in reqs)
    for r in reqs:
        assert r["num_tokens"] == r["max_tokens"] == 24 and r["usage_tokens"] == 24
        for k in ("ttft_ms", "token2_gap_ms", "itl_ms", "excess_ms"):
            assert math.isfinite(r[k]), (k, r)
        assert r["itl_ms"] > 0
    assert math.isfinite(run["first_ttft_ms"])
    assert mode["metrics"]["proxy"]["pdserve_proxy_routing_decisions_total"]["route=pd"] == 5
    idle = mode["idle_cpu_percent"]
    assert {"proxy", "fake-prefill", "fake-decode"} <= set(idle)
    assert all(v >= 0 for v in idle.values())


class _Recorder:
    """handoff.Cluster's start, recorded (nothing is started)."""

    def __init__(self):
        self.started: list[tuple[str, list[str]]] = []
        self.url, self.launched = "", 0.0

    def start(self, label, cmd, env):
        self.started.append((label, cmd))


def _launch(mode: str, gpu: str, tmp_path: Path) -> _Recorder:
    import argparse

    c = _Recorder()
    args = argparse.Namespace(gpu=gpu, serve_arg=[], worker_arg=[], gpu_max_model_len=8192,
                              gpu_kv_bytes=1 << 30)
    handoff.launch(mode, args, c, tmp_path)
    return c


def _flag(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, w in enumerate(cmd) if w == flag]


def test_gpu_modes_on_two_gpus_put_p_and_d_apart_and_a_both_role_worker_on_each(tmp_path):
    (label, cmd), = _launch("gpu-pd", "0,1", tmp_path).started
    i = cmd.index("--local-devices")
    assert label == "proxy" and cmd[i + 1:i + 3] == ["0", "1"]  # P on GPU 0, D on GPU 1
    c = _launch("gpu-both", "0,1", tmp_path)
    workers = [cmd for label, cmd in c.started if label.startswith("both-worker")]
    assert [_flag(w, "--device") for w in workers] == [["0"], ["1"]]
    proxy = dict(c.started)["proxy"]
    assert len(_flag(proxy, "--worker")) == 2 and _flag(proxy, "--model") == [
        str(tmp_path / "llama-3-8b")]
    # one GPU, as before: one both-role worker, P and D sharing it
    assert [label for label, _ in _launch("gpu-both", "0", tmp_path).started] == [
        "both-worker", "proxy"]
    (_, cmd), = _launch("gpu-pd", "0", tmp_path).started
    i = cmd.index("--local-devices")
    assert cmd[i + 1:i + 3] == ["0", "0"]
    with pytest.raises(SystemExit, match="GPU indices"):
        _launch("gpu-pd", "cuda:0", tmp_path)
