"""`pdserve serve --mps`: when a local cluster starts a private MPS daemon, what its workers
get, and the daemon's start and stop through a stand-in `nvidia-cuda-mps-control` (an
executable script that records how it was called: CI has no GPU). The GPU run
(bench/gpu_handoff.sh) shows the real daemon serving P/D."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pdserve import mps
from pdserve.config import ConfigError, build_config
from pdserve.serve import ServeConfig, start_local_cluster, start_mps
from pdserve.supervisor import Managed

FAKE = """#!{python}
import json, os, sys
rec = {{"argv": sys.argv[1:], "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
        "log": os.environ.get("CUDA_MPS_LOG_DIRECTORY"),
        "stdin": "" if "-d" in sys.argv else sys.stdin.read()}}
with open({record!r}, "a") as f:
    f.write(json.dumps(rec) + "\\n")
if "-d" in sys.argv and os.environ.get("FAKE_MPS_FAIL"):
    print("An instance of this daemon is already running", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def fake_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in nvidia-cuda-mps-control first on PATH; returns its record file."""
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.jsonl"
    exe = bindir / mps.CONTROL
    exe.write_text(FAKE.format(python=sys.executable, record=str(record)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return record


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_gpu_index_of_device_strings() -> None:
    assert [mps.gpu_index(d, True) for d in ("auto", "cuda", "0", "cuda:3", "cpu")] == \
        [0, 0, 0, 3, None]
    assert mps.gpu_index("auto", False) is None  # auto on a host with no GPU: the CPU
    assert mps.shared_gpus(["0", "cuda:0", "1"], True) == [0]
    assert mps.shared_gpus(["0", "1"], True) == []
    assert mps.shared_gpus(["auto", "auto"], False) == []


def test_plan_per_mode() -> None:
    env = {"PATH": "/nowhere"}
    ctl = "/usr/bin/" + mps.CONTROL
    p = mps.plan("auto", ["0", "0"], env, has_gpu=True, control=ctl)
    assert p.start and "share GPU 0" in p.reason
    p = mps.plan("auto", ["0", "1"], env, has_gpu=True, control=ctl)
    assert not p.start and not p.under and "no two local workers share a GPU" in p.reason
    p = mps.plan("auto", ["auto", "auto"], env, has_gpu=False, control=ctl)
    assert not p.start and not p.warn  # a CPU cluster: nothing to say
    p = mps.plan("off", ["0", "0"], env, has_gpu=True, control=ctl)
    assert not p.start and not p.under
    # sharing a GPU with no daemon at hand: a warning that says what it costs
    p = mps.plan("auto", ["0", "0"], env, has_gpu=True, control="")
    assert not p.start and p.warn and "time slices" in p.reason
    # a daemon the environment names is used, none started
    p = mps.plan("auto", ["0", "0"], {**env, "CUDA_MPS_PIPE_DIRECTORY": "/x"}, has_gpu=True,
                 control=ctl)
    assert not p.start and p.under and "/x" in p.reason
    assert mps.plan("on", ["0", "1"], env, has_gpu=True, control=ctl).start
    with pytest.raises(mps.MpsError, match="no NVIDIA GPU"):
        mps.plan("on", ["cpu"], env, has_gpu=False, control=ctl)
    with pytest.raises(mps.MpsError, match="not on PATH"):
        mps.plan("on", ["0", "0"], env, has_gpu=True, control="")


def test_daemon_starts_with_private_folders_and_quits(tmp_path: Path, fake_control: Path) -> None:
    d = mps.Daemon(tmp_path / "cluster")
    d.start()
    assert d.running and d.pipe_dir.is_dir() and d.log_dir.is_dir()
    d.stop()
    d.stop()  # once only
    started, quit_ = calls(fake_control)
    assert started["argv"] == ["-d"] and started["pipe"] == str(d.pipe_dir)
    assert started["log"] == str(d.log_dir)
    assert quit_["argv"] == [] and quit_["stdin"] == "quit\n" and quit_["pipe"] == str(d.pipe_dir)


def test_daemon_that_fails_says_why(tmp_path: Path, fake_control: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    d = mps.Daemon(tmp_path)
    with pytest.raises(mps.MpsError, match="exited with code 1: An instance of this daemon"):
        d.start()
    assert not d.running
    d.stop()  # nothing to stop: no quit sent
    assert len(calls(fake_control)) == 1


def _cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[mps.Daemon | None,
                                                                          list[Managed]]:
    """start_mps + start_local_cluster as `pdserve serve` calls them, with GPUs shown and the
    workers' processes not started (CI has no GPU): what each worker would run with."""
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    monkeypatch.setattr(Managed, "start", lambda self: None)
    cfg = ServeConfig(internal_token="t" * 32, worker_base_port=9100, **kw)
    daemon, under = start_mps(cfg, tmp_path)
    _, workers = start_local_cluster(cfg, tmp_path, daemon.env if daemon else
                                     ({} if under else None))
    return daemon, workers


def test_local_workers_on_one_gpu_run_under_the_clusters_daemon(
        tmp_path: Path, fake_control: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, workers = _cluster(tmp_path, monkeypatch, local_devices=["0", "0"],
                               mps_decode_percent=40)
    assert daemon is not None and daemon.running
    p, d = workers
    for w in workers:
        assert w.env["CUDA_MPS_PIPE_DIRECTORY"] == str(daemon.pipe_dir)
        assert w.env["CUDA_MPS_LOG_DIRECTORY"] == str(daemon.log_dir)
    # the SM limit is D's alone
    assert d.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in p.env
    daemon.stop()
    assert [c["argv"] for c in calls(fake_control)] == [["-d"], []]


def test_no_daemon_where_no_gpu_is_shared_or_mps_is_off(
        tmp_path: Path, fake_control: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kw in ({"local_devices": ["0", "1"]}, {"local_devices": ["0", "0"], "mps": "off"}):
        daemon, workers = _cluster(tmp_path, monkeypatch, mps_decode_percent=40, **kw)
        assert daemon is None
        for w in workers:
            assert not any(k.startswith("CUDA_MPS_") for k in w.env)
    assert calls(fake_control) == []


def test_mps_on_without_the_control_program_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control here
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    if (mps.SYSTEM_PIPE_DIR / "control").exists():
        pytest.skip("a system MPS daemon runs here")
    with pytest.raises(ConfigError, match="nvidia-cuda-mps-control is not on PATH"):
        start_mps(ServeConfig(mps="on", local_devices=["0", "0"]), tmp_path)


def test_prefill_first_pairs_p_and_d_on_the_same_gpu(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill first (the default): each D sharing a GPU with a P binds a turns socket, and
    every P on that GPU is told it; workers on GPUs of their own get nothing; with
    --no-prefill-first nobody does."""
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    monkeypatch.setattr(Managed, "start", lambda self: None)
    kw = dict(internal_token="t" * 32, mps="off", num_prefill=2, num_decode=2,
              local_devices=["0", "1", "0", "2"])  # P0 P1 D0 D2
    argv = ["--internal-token", kw["internal_token"], "--mps", "off", "--num-prefill", "2",
            "--num-decode", "2", "--local-devices", *kw["local_devices"], "--no-prefill-first"]
    cfg = build_config(ServeConfig, argv, env={})
    assert not cfg.prefill_first and ServeConfig().prefill_first
    (tmp_path / "off").mkdir()
    _, off = start_local_cluster(cfg, tmp_path / "off")
    assert not any(f in w.cmd for w in off for f in ("--gpu-turns-notify", "--gpu-turns-socket"))
    _, (p0, p1, d0, d2) = start_local_cluster(ServeConfig(**kw), tmp_path)

    def flag(w: Managed, name: str) -> list[str] | None:
        if name not in w.cmd:
            return None
        i = w.cmd.index(name) + 1
        return w.cmd[i:i + 1] if name == "--gpu-turns-socket" else w.cmd[i:]

    sock = flag(d0, "--gpu-turns-socket")
    assert sock and sock[0].startswith(str(tmp_path))
    assert flag(p0, "--gpu-turns-notify") == sock
    for w in (p1, d2):
        assert flag(w, "--gpu-turns-notify") is None and flag(w, "--gpu-turns-socket") is None
