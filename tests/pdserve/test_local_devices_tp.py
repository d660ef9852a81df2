"""`pdserve serve --local-devices` under `--tensor-parallel-size N`: each local worker takes
the next N devices (its ranks' GPUs, consecutive from its --device) and is started with
them; groups that are not one GPU and the next N - 1 (or all cpu) are refused before
anything starts (the workers' processes are not started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import mps
from pdserve.config import ConfigError, build_config
from pdserve.serve import ServeConfig, start_local_cluster
from pdserve.supervisor import Managed


def _started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> list[Managed]:
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    monkeypatch.setattr(Managed, "start", lambda self: None)
    cfg = build_config(ServeConfig, ["--internal-token", "t" * 32, "--worker-base-port",
                                     "9100", "--mps", "off", *argv], env={})
    return start_local_cluster(cfg, tmp_path)[1]


def _arg(w: Managed, flag: str) -> str | None:
    return w.cmd[w.cmd.index(flag) + 1] if flag in w.cmd else None


def test_each_worker_takes_its_ranks_devices(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, "--tensor-parallel-size", "2",
                  "--local-devices", "0", "1", "2", "3")
    assert [(w.role, _arg(w, "--device"), _arg(w, "--tensor-parallel-size")) for w in ws] == [
        ("prefill", "0", "2"), ("decode", "2", "2")]


def test_groups_cycle_like_single_devices(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, "--tensor-parallel-size", "2", "--num-decode", "2",
                  "--local-devices", "cuda:2", "cuda:3", "cuda:0", "cuda:1")
    assert [_arg(w, "--device") for w in ws] == ["cuda:2", "cuda:0", "cuda:2"]


def test_cpu_ranks(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, "--tensor-parallel-size", "2",
                  "--local-devices", "cpu", "cpu")
    assert [_arg(w, "--device") for w in ws] == ["cpu", "cpu"]


def test_one_rank_keeps_the_old_meaning(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, "--num-decode", "2", "--local-devices", "1", "0")
    assert [_arg(w, "--device") for w in ws] == ["1", "0", "1"]


@pytest.mark.parametrize("devices, needle", [
    (["0", "1", "2"], "lists 3 devices: with --tensor-parallel-size 2 give 2 per worker"),
    (["0", "2"], r"consecutive GPUs from its first \(e.g. 0 1\)"),
    (["1", "0"], r"consecutive GPUs from its first \(e.g. 1 2\)"),
    (["cpu", "0"], "or all on cpu"),
])
def test_groups_that_cannot_be_ranks_are_refused_before_start(tmp_path, monkeypatch, devices,
                                                               needle):
    with pytest.raises(ConfigError, match=needle):
        _started(tmp_path, monkeypatch, "--tensor-parallel-size", "2",
                 "--local-devices", *devices)


def test_a_gpu_cluster_with_ranks_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """GPU P/D workers refuse tp > 1 at start: serve says so first, with what to do."""
    from pdserve.serve import run_serve

    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    started = []
    monkeypatch.setattr(Managed, "start", lambda self: started.append(self))
    for argv in (["--local-devices", "0", "1", "2", "3"], []):  # [] = the default device
        cfg = build_config(ServeConfig, ["--tensor-parallel-size", "2", "--mps", "off", *argv],
                           env={})
        with pytest.raises(ConfigError, match=r"--tensor-parallel-size 2 with workers on GPU "
                           r"\((0, 2|auto)\): P/D workers shard a model on the CPU only"):
            run_serve(cfg)
    assert started == []
    # on the CPU it goes ahead (the workers' start is what this test stubs)
    from pdserve.serve import local_tp_problem

    cpu = build_config(ServeConfig, ["--tensor-parallel-size", "2", "--device", "cpu"], env={})
    assert local_tp_problem(cpu, [("prefill", None), ("decode", None)], True) is None
