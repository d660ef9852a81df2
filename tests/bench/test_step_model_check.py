"""`bench/step_model.py check`: the model fitted on the pure points of bench/mixed_steps.py's
measurement (one H100, bench/data/h100_llama3_8b_mixed.json) and its residual on each mixed
step, computed as the module says (model / measured - 1 with `StepModel.step_s`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from step_model import StepModel, check, main  # noqa: E402

MIXED = ROOT / "bench" / "data" / "h100_llama3_8b_mixed.json"


@pytest.mark.timeout(30)
def test_check_fits_the_pure_points_and_scores_every_mixed_step(tmp_path, capsys) -> None:
    data = json.loads(MIXED.read_text())
    model = StepModel.fit(data)
    # the fit is on the five pure points serving_gpu.py measures, from the same run
    assert [p.name for p in StepModel.points(data)] == ["prefill_8x1k", "prefill_1x8k",
                                                       "decode_b1", "decode_b32", "decode_b256"]
    rows = check(data, model)
    measured = [r for r in data["mixed"] if r["seconds"]]
    mixed = [r for r in rows if r["n"]]
    assert len(mixed) == len(measured) == 12
    for row, m in zip(mixed, measured):
        assert (row["batch"], row["n"]) == (m["batch"], m["n"])
        want = model.step_s(m["n"], m["batch"], m["decode_ctx"])
        assert row["model_s"] == pytest.approx(want)
        assert row["residual"] == pytest.approx(want / m["seconds"] - 1)
    # the decode steps measured beside them are scored as decode-only steps
    alone = [r for r in rows if not r["n"]]
    assert len(alone) == 12
    for row, m in zip(alone, data["mixed"]):
        assert row["model_s"] == pytest.approx(model.decode_s(m["batch"], m["decode_only_ctx"]))
    # the command line prints the table and writes the residuals
    out = tmp_path / "check.json"
    main(["check", str(MIXED), "--out", str(out)])
    text = capsys.readouterr().out
    assert "mixed B=128 n=2048" in text and "mean |residual|" in text
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and StepModel.from_json(saved["model"]) == model
