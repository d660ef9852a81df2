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


def test_tensor_parallel_roofline_splits_weights_flops_and_kv_and_adds_all_reduces():
    sys.path.insert(0, str(ROOT / "bench"))
    from serving_gpu import LLAMA3_8B, decode_roofline, shapes

    sh = shapes(LLAMA3_8B)
    copy, matmul = 4.0e12, 800e12
    one = decode_roofline(sh, 32, 1024, copy, matmul)
    two = decode_roofline(sh, 32, 1024, copy, matmul, tp=2, allreduce_ms=0.5)
    # each rank reads half the GEMM weights (norms and the batch's embedding rows whole)
    replicated = 2 * (sh["norm_params"] + 32 * sh["hidden"]) / copy * 1e3
    assert two["gemm_ms"] == pytest.approx((one["gemm_ms"] - replicated) / 2 + replicated)
    assert two["kv_ms"] == pytest.approx(one["kv_ms"] / 2)
    assert two["roofline_ms"] == pytest.approx(two["gemm_ms"] + two["kv_ms"] + 0.5)
    # at batch 256 the GEMMs are compute-bound on one GPU and on each of two
    big1, big2 = (decode_roofline(sh, 256, 1024, copy, matmul, tp=t) for t in (1, 2))
    assert big1["gemm_ms"] == pytest.approx(2 * 256 * sh["gemm_params"] / matmul * 1e3)
    assert big2["gemm_ms"] == pytest.approx(big1["gemm_ms"] / 2)
