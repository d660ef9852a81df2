"""Shared test set-up: bounded threads so several processes share 2 cores, and factories."""

from __future__ import annotations

import os

# Before torch is imported anywhere: tests and the worker processes they start share 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _import_pypi_kernels() -> None:
    """transformers >= 5.25 imports the PyPI package `kernels` (Hub kernels) when it is
    installed; pytest puts this checkout's root first on sys.path, where our own `kernels/`
    folder (the engine's Triton kernels, installed as `pdserve.kernels`) would shadow it and
    break every transformers model import. Import the installed one first, from the
    site-packages only, so `kernels` names it for the whole session."""
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: nothing to shadow
    finally:
        sys.path[:] = saved


_import_pypi_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip gpu-marked tests where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch) -> path of a tiny random checkpoint (made once per session)."""
    from pdserve.tiny import make_tiny_checkpoint

    made: dict[str, object] = {}

    def get(arch: str = "llama"):
        if arch not in made:
            made[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)
        return made[arch]

    return get
