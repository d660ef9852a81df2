"""Shared test set-up: bounded threads so several processes share 2 cores, and factories."""

from __future__ import annotations

import os

# Before torch is imported anywhere: tests and the worker processes they start share 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
