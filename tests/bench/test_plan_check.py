"""bench/plan_check.py (issue 22's consistency check): a summary's own time scale and
window decide how its points are simulated, and a point off by more than the tolerance
fails the check (exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def summary(path: Path, strict: float, **extra) -> Path:
    rows = [{"rate": 2.0, "num_prompts": 40, "goodput_strict": strict, "goodput_loose": 2.0}]
    path.write_text(json.dumps({"layout": "1p1d", "rows": rows, "routes": [],
                                "fakes": {"P": {"steps": 10, "step_overrun_ms": 0.2}},
                                **extra}))
    return path


def check(*paths: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "plan_check.py"), *map(str, paths),
                           "--model", "h200-llama3-8b", "--sim-seeds", "1", "--num-prompts", "40",
                           "--out", str(out)], capture_output=True, text=True, timeout=280,
                          cwd=ROOT)


def test_each_summary_is_simulated_at_its_own_scale(tmp_path):
    """At 2 req/s two GPUs' worth of 1 P + 1 D meets the strict SLO for every request, at
    either scale; a fake run that met it for none is off by the whole rate."""
    a = summary(tmp_path / "a.json", 2.0)  # no time_scale recorded: --time-scale (4)
    b = summary(tmp_path / "b.json", 2.0, time_scale=8.0, window=20.0, num_prompts=40)
    r = check(a, b, out=tmp_path / "ok.json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "ok.json").read_text())["rows"]
    assert sorted(x["time_scale"] for x in rows) == [4.0, 8.0]
    assert all(x["sim_strict"] == pytest.approx(2.0) for x in rows)
    bad = summary(tmp_path / "bad.json", 0.0, time_scale=8.0)
    r = check(bad, out=tmp_path / "bad_out.json")
    assert r.returncode == 1 and "100.0%" in r.stdout


def test_layout_names_count_their_workers():
    sys.path.insert(0, str(ROOT / "bench"))
    from plan_check import layout_workers

    assert [layout_workers(n) for n in ("1p1d", "1p1d-slo", "1p3d", "3p1d", "4both-256",
                                        "4flex-2048m512", "2both-512", "flex-512",
                                        "both-2048m512")] == [2, 2, 4, 4, 4, 4, 2, 2, 2]
