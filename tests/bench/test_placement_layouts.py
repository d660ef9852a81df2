"""bench/placement_goodput.py's layouts (issue 26): which workers each name starts, on which
GPU, and what the proxy is told — without starting anything (a recording cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import placement_goodput as pg  # noqa: E402


class Recorder(pg.Cluster):
    def __init__(self, out: Path):
        super().__init__(out)
        self.workers: list[tuple] = []
        self.proxy_args: tuple = ()
        self.ready = ""

    def engine(self, name, role, gpu, budget, args, mixed=None):
        self.workers.append(("engine", name, role, gpu, budget, mixed))
        return f"http://{name}"

    def fake(self, name, role, scale, budget, mixed=None):
        self.workers.append(("fake", name, role, None, budget, mixed))
        return f"http://{name}"

    def proxy(self, ready, *args, timeout=120.0):
        self.ready, self.proxy_args = ready, args
        return "http://proxy"


def args(gpus: str = "") -> argparse.Namespace:
    return argparse.Namespace(time_scale=1.0 if gpus else 8.0,
                              gpu_list=[g for g in gpus.split(",") if g])


def test_real_engines_one_per_gpu_and_the_proxy_serves_their_model(tmp_path):
    c = Recorder(tmp_path / "1p1d")
    pg.start_layout(c, "1p1d", args("0,1"))
    assert c.workers == [("engine", "P", "prefill", "0", 2048, None),
                         ("engine", "D", "decode", "1", 2048, None)]
    assert c.ready == "1 P + 1 D"
    a = list(c.proxy_args)
    # the proxy refuses workers of a model other than its own: it is given theirs
    assert a[a.index("--model") + 1] == str(c.gpu_model()) and "--skip-tokenizer-init" in a
    assert (c.gpu_model() / "config.json").exists()
    assert a[:4] == ["--prefill", "http://P", "--decode", "http://D"]


def test_four_gpu_layouts(tmp_path):
    c = Recorder(tmp_path / "1p3d")
    pg.start_layout(c, "1p3d", args("0,1,2,3"))
    assert [(w[2], w[3]) for w in c.workers] == [("prefill", "0"), ("decode", "1"),
                                                 ("decode", "2"), ("decode", "3")]
    assert c.ready == "1 P + 3 D"
    c = Recorder(tmp_path / "4flex")
    pg.start_layout(c, "4flex-2048m512", args("0,1,2,3"))
    assert [(w[2], w[3], w[4], w[5]) for w in c.workers] == [
        ("both", str(i), 2048, 512) for i in range(4)]
    a = list(c.proxy_args)
    assert c.ready == "4 both-role" and a[a.index("--placement") + 1] == "slo"
    assert a[a.index("--slo-ttft-ms") + 1] == "1000.0"  # unscaled on real engines


def test_fakes_keep_their_two_worker_layouts_and_scale(tmp_path):
    c = Recorder(tmp_path / "flex")
    pg.start_layout(c, "flex-512-loose", args())
    assert [w[:3] for w in c.workers] == [("fake", "A", "both"), ("fake", "B", "both")]
    a = list(c.proxy_args)
    assert "--model" not in a and a[a.index("--slo-itl-ms") + 1] == "400.0"  # 50 ms x 8


@pytest.mark.parametrize("name, gpus", [("1p1d", "0,1,2,3"), ("2both-512", "0,1,2,3"),
                                        ("3p1d", ""), ("1x1y", "0,1")])
def test_a_layout_that_does_not_fit_is_refused(tmp_path, name, gpus):
    with pytest.raises(SystemExit):
        pg.start_layout(Recorder(tmp_path / "x"), name, args(gpus))
