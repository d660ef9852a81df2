"""`pdserve plan` (pdserve/plan/planner.py): layout names, the workload it simulates, the
recommendation, and the command itself (a real process: table, JSON, SVG, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pdserve.plan.planner import (
    PlanConfig,
    default_layouts,
    default_rates,
    goodput,
    held_rate,
    parse_layout,
    recommend,
    requests_for,
)
from pdserve.proxy.placement import SLO

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ROOT / "bench" / "data" / "sharegpt_like.json"
STRICT, LOOSE = SLO(1.0, 0.025), SLO(2.0, 0.05)


def test_layout_names() -> None:
    lay = parse_layout("1p3d", 4, STRICT, LOOSE)
    assert [w.role for w in lay.workers] == ["prefill"] + ["decode"] * 3
    assert lay.placement == "threshold"
    assert parse_layout("1p1d-slo", 2, STRICT, LOOSE).placement == "slo"
    lay = parse_layout("both-2048m512", 3, STRICT, LOOSE)
    assert [(w.role, w.max_num_batched_tokens, w.mixed_step_tokens) for w in lay.workers] == \
        [("both", 2048, 512)] * 3 and lay.placement == "threshold"
    lay = parse_layout("2flex-1024-loose", 2, STRICT, LOOSE)
    assert lay.placement == "slo" and lay.slo == LOOSE and lay.gpus == 2
    assert parse_layout("flex-512", 2, STRICT, LOOSE).slo == STRICT
    for bad, why in (("3p1d", "is not 2 GPUs"), ("0p2d", "is not 2 GPUs"),
                     ("3both-512", "3 workers on 2 GPUs"), ("both-512-loose", "malformed"),
                     ("pd", "not kPmD")):
        with pytest.raises(ValueError, match=why):
            parse_layout(bad, 2, STRICT, LOOSE)
    assert default_layouts(3) == ["1p2d", "2p1d", "both-256", "both-512", "both-2048",
                                  "flex-512"]


def test_the_requests_are_pdserve_benchs() -> None:
    """The same length mix and arrivals as `pdserve bench --workload W --num-prompts N
    --seed S --request-rate R` (its first run's generator)."""
    import numpy as np

    from pdserve.bench import BenchConfig, arrival_times, make_prompts

    cfg = PlanConfig(workload=str(WORKLOAD), window=10, num_prompts=30, seed=4)
    reqs = requests_for(cfg, 8.0)
    assert len(reqs) == 80  # rate x window, at least --num-prompts
    rng = np.random.default_rng([4, 0])
    prompts = make_prompts(BenchConfig(num_prompts=80, workload=str(WORKLOAD), seed=4), rng)
    arrivals = arrival_times(80, 8.0, rng)
    assert [(r.arrival, r.prompt_tokens, r.max_tokens) for r in reqs] == \
        [(t, n, m) for t, (_, n, m) in zip(arrivals, prompts)]
    pairs = {tuple(p) for p in json.loads(WORKLOAD.read_text())["pairs"]}
    assert all((r.prompt_tokens, r.max_tokens) in pairs for r in reqs)
    assert len(requests_for(cfg, 1.0)) == 30
    rates = default_rates(PlanConfig(workload=str(WORKLOAD)))
    assert len(rates) == 8 and rates == sorted(rates) and rates[0] > 0


def test_goodput_counts_requests_meeting_every_bound() -> None:
    def req(ttft: float, gaps: list[float], ok: bool = True) -> dict:
        tpot = sum(gaps) / len(gaps) if gaps else None
        return {"ok": ok, "ttft_s": ttft if ok else None, "itl_s": gaps, "tpot_s": tpot}

    rs = [req(0.5, [0.02] * 10), req(1.5, [0.02] * 10), req(0.5, [0.02] * 99 + [0.04]),
          req(0.5, [0.02] * 201 + [0.04] * 2), req(0.5, [], ok=False)]
    # the 100-gap request's p99 is its worst gap; the 203-gap one's is not (2 of 203 above)
    assert goodput(rs, 10.0, 1.0, itl_s=0.025) == (4.0, 0.4)
    assert goodput(rs, 10.0, 2.0, tpot_s=0.05) == (8.0, 0.8)


def test_the_recommendation_is_the_layout_holding_the_highest_rate() -> None:
    rows = {"a": [{"rate": 1, "attained": 1.0, "goodput": 1.0},
                  {"rate": 2, "attained": 0.8, "goodput": 1.6},
                  {"rate": 3, "attained": 0.95, "goodput": 2.9}],  # lost at 2: holds 1
            "b": [{"rate": 1, "attained": 0.95, "goodput": 0.95},
                  {"rate": 2, "attained": 0.92, "goodput": 1.84},
                  {"rate": 3, "attained": 0.5, "goodput": 1.5}],
            "c": [{"rate": 1, "attained": 0.5, "goodput": 0.5}]}
    assert [held_rate(rows[k], 0.9) for k in "abc"] == [1, 2, 0]
    assert recommend(rows, 0.9) == ["b", "a", "c"]


def plan(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pdserve", "plan", *args], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=100)


@pytest.mark.slow
def test_the_command_prints_a_table_a_recommendation_and_writes_json_and_svg(
        tmp_path: Path) -> None:
    r = plan("--gpus", "2", "--workload", str(WORKLOAD), "--layouts", "1p1d", "both-512",
             "--rates", "10", "80", "--window", "4", "--num-prompts", "20", "--jobs", "2",
             "--out", "out", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| 1p1d |" in r.stdout and "| both-512 |" in r.stdout
    assert "recommended: " in r.stdout or "no layout keeps" in r.stdout
    doc = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert set(doc["layouts"]) == {"1p1d", "both-512"} and doc["recommended"] in doc["layouts"]
    for rows in doc["layouts"].values():
        assert [x["rate"] for x in rows] == [10, 80]
        for x in rows:
            assert 0 <= x["attained"] <= 1 and x["goodput"] == pytest.approx(
                x["rate"] * x["attained"])
            assert x["num_requests"] == max(20, round(x["rate"] * 4))
            assert x["ttft_p50_s"] is not None and x["ttft_p50_s"] <= x["ttft_p99_s"]
    assert doc["layouts"]["1p1d"][0]["routes"].get("pd", 0) > 0
    svg = ET.parse(tmp_path / "out" / "goodput.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2


@pytest.mark.parametrize("args,message", [
    (["--layouts", "3p1d"], "layout '3p1d': 3 P + 1 D is not 2 GPUs"),
    (["--step-model", "nope.json"], "--step-model nope.json: no such file"),
    (["--rates", "-1"], "must be > 0"),
    (["--workload", "lengths.json"], "--workload lengths.json: needs pairs of positive lengths"),
    (["--workload", "missing.json"], "--workload missing.json: not a length mix"),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "lengths.json").write_text('{"pairs": [[0, 5]]}')
    r = plan(*args, "--rates", "1", "--jobs", "2", tmp=tmp_path) if "--rates" not in args \
        else plan(*args, tmp=tmp_path)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_explains(tmp_path: Path) -> None:
    r = plan("--help", tmp=tmp_path)
    assert r.returncode == 0
    for flag in ("--gpus", "--step-model", "--layouts", "--workload", "--slo-ttft-ms",
                 "--slo-itl-ms", "--attainment", "--out"):
        assert flag in r.stdout
