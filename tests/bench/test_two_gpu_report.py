"""bench/two_gpu_report.py (issue 25's table): each Must-show bar is judged from the
script's JSON files, and rows measured with P and D on one GPU are labelled a dry run,
never "met"."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from two_gpu_report import report  # noqa: E402


def write(out: Path, cross: bool, pct: float, slowdown: float, excess: float) -> None:
    where = "GPU0->GPU1" if cross else "same GPU"
    (out / "kernels").mkdir(parents=True)
    (out / "kernels" / "kv_transfer.json").write_text(json.dumps({"rows": [
        {"kind": "kernel", "where": where, "tokens": t, "mib": t / 8, "gather_gbs": 1.0,
         "copy_gbs": 1.0, "pct_of_copy": pct} for t in (1024, 4096, 16384)]}))
    (out / "pull16k").mkdir()
    (out / "pull16k" / "pull_beside_decode.json").write_text(json.dumps({
        "batch": 32, "tokens": 16384, "cross_gpu": cross, "src_device": "cuda:0",
        "dst_device": "cuda:1" if cross else "cuda:0", "methods": [
            {"method": "bounded-8", "pull_ms": 7.0, "pct_of_copy": 15.0, "step_ms_alone": 6.0,
             "step_ms_beside": 6.0 * (1 + slowdown / 100), "slowdown_pct": slowdown}]}))
    med = {"ttft_ms_p50": 300.0, "token2_gap_ms_p50": 12.0, "itl_ms_p50": 6.0,
           "excess_ms_p50": excess, "excess_ms_p90": excess + 1}
    (out / "handoff.json").write_text(json.dumps({
        "args": {"gpu": "0,1" if cross else "0,0"},
        "modes": {"gpu-pd": {"median": med}, "gpu-both": {"median": {**med,
                                                                     "ttft_ms_p50": 298.0}}}}))


def test_bars_met_across_gpus(tmp_path):
    write(tmp_path, cross=True, pct=96.0, slowdown=9.0, excess=5.0)
    text = "\n".join(report(tmp_path))
    assert text.count("| met |") == 3  # 4k and 16k gathers, the decode step
    assert "excess p50 5.00 <= 0.5 x ITL p50 6.00 + 3 ms: met" in text
    assert "P/D TTFT p50 300.00 <= both-role TTFT p50 298.00 + 5 ms: met" in text
    assert "| 1024 |" in text and "NOT" not in text and "dry run" not in text


def test_bars_missed_are_said(tmp_path):
    write(tmp_path, cross=True, pct=94.0, slowdown=16.0, excess=6.5)
    text = "\n".join(report(tmp_path))
    assert text.count("NOT met") == 4  # two gathers, the step, the excess


def verdicts(text: str) -> list[str]:
    return re.findall(r"(?:NOT met|\bmet\b|not measured)(?: \([^)]*\))?", text)


def test_one_gpu_rows_are_a_dry_run(tmp_path):
    write(tmp_path, cross=False, pct=99.0, slowdown=1.0, excess=1.0)
    found = verdicts("\n".join(report(tmp_path)))
    assert found == ["met (dry run, one GPU: not the bar)"] * 5


def test_missing_files_are_not_measured(tmp_path):
    assert verdicts("\n".join(report(tmp_path))) == ["not measured"] * 2
