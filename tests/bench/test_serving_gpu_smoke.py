"""bench/serving_gpu.py stays runnable: its tiny-shape smoke run on the CPU writes every
figure the GPU run reports (decode through engine.step, the roofline split, prefill, and
transformers' generate beside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_on_cpu_reports_every_figure(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serving_gpu.py"), "--tiny",
                        "--device", "cpu", "--steps", "3", "--runs", "2", "--batches", "1,3",
                        "--ctx", "40", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "serving_gpu.json").read_text())
    for b in (1, 3):
        d = res[f"decode_b{b}"]
        assert d["step_ms"] > 0 and len(d["run_medians_ms"]) == 2
        assert d["roofline_ms"] == pytest.approx(d["gemm_ms"] + d["kv_ms"]) and d["kv_ms"] > 0
        assert isinstance(res[f"transformers_b{b}_step_ms"], float)
    for k in ("prefill_8x1k", "prefill_1x8k"):
        assert res[k]["tokens_per_s"] > 0
    assert "| decode b=3, ctx 40+ (engine.step) |" in r.stdout
