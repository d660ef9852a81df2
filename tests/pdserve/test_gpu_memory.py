"""--gpu-memory-utilization is each worker's own share of its GPU (vLLM's meaning): the KV
budget it leaves, the clear errors when the share is too small or not free, and a local
cluster splitting the default between workers that share a GPU (what each worker is started
with; CI has no GPU, so the workers' processes are not started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import mps
from pdserve.config import ConfigError
from pdserve.engine.setup import gpu_kv_budget
from pdserve.serve import ServeConfig, run_serve, start_local_cluster
from pdserve.supervisor import Managed

GIB = 1 << 30


def test_budget_is_this_workers_share_whatever_others_hold():
    # 80 GiB GPU, this worker's weights 16 GiB, activations 1 GiB, share 0.45 -> 19 GiB of KV
    alone = gpu_kv_budget(0.45, free=64 * GIB, total=80 * GIB, weights=16 * GIB,
                          activations=GIB)
    assert alone == int(80 * GIB * 0.45) - 17 * GIB
    # another worker holding 30 GiB changes nothing while the share is free
    assert gpu_kv_budget(0.45, free=34 * GIB, total=80 * GIB, weights=16 * GIB,
                         activations=GIB) == alone


def test_a_share_that_is_not_free_says_what_to_lower():
    with pytest.raises(ValueError, match=r"only 10.0 GiB of its 80.0 GiB is free \(other "
                       r"processes hold 54.0 GiB\): lower --gpu-memory-utilization"):
        gpu_kv_budget(0.9, free=10 * GIB, total=80 * GIB, weights=16 * GIB, activations=GIB)


def test_a_share_the_weights_fill_says_raise_it():
    with pytest.raises(ValueError, match="leave no KV pool in: raise it"):
        gpu_kv_budget(0.2, free=64 * GIB, total=80 * GIB, weights=16 * GIB, activations=GIB)


def _started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> list[Managed]:
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    monkeypatch.setattr(Managed, "start", lambda self: None)
    cfg = ServeConfig(internal_token="t" * 32, worker_base_port=9100, mps="off", **kw)
    return start_local_cluster(cfg, tmp_path)[1]


def _flag(w: Managed) -> str | None:
    cmd = w.cmd
    return cmd[cmd.index("--gpu-memory-utilization") + 1] \
        if "--gpu-memory-utilization" in cmd else None


def test_local_workers_on_one_gpu_split_the_default(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, local_devices=["0"])  # 1 P + 1 D on GPU 0
    assert [w.role for w in ws] == ["prefill", "decode"]
    assert [_flag(w) for w in ws] == ["0.45", "0.45"]


def test_workers_alone_on_their_gpus_keep_the_default(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, local_devices=["0", "1"])
    assert [_flag(w) for w in ws] == [None, None]  # the workers' own default, 0.9


def test_three_workers_on_one_gpu_and_one_alone(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, num_prefill=2, num_decode=2,
                  local_devices=["0", "0", "1", "0"])
    assert [_flag(w) for w in ws] == ["0.3", "0.3", None, "0.3"]


def test_a_given_value_is_each_workers_own(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, local_devices=["0"], gpu_memory_utilization=0.4)
    assert [_flag(w) for w in ws] == ["0.4", "0.4"]


def test_an_explicit_pool_size_splits_nothing(tmp_path, monkeypatch):
    ws = _started(tmp_path, monkeypatch, local_devices=["0"], kv_cache_memory_bytes=GIB)
    assert [_flag(w) for w in ws] == [None, None]


def test_shares_over_the_whole_gpu_are_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(mps, "gpu_present", lambda env=None: True)
    started = []
    monkeypatch.setattr(Managed, "start", lambda self: started.append(self))
    cfg = ServeConfig(local_devices=["0"], gpu_memory_utilization=0.8, mps="off")
    with pytest.raises(ConfigError, match=r"2 local workers on GPU 0 would ask for 1.60 of it: "
                       r"give at most 0.50"):
        run_serve(cfg)
    assert started == []
