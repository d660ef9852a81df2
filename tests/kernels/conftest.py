"""Triton kernel tests need TRITON_INTERPRET=1 set before triton is first imported, or a GPU.

Without either, this folder is not collected: the wrapper tests/test_kernels_interpreter.py
runs it in a subprocess with the interpreter on. Under the interpreter the gpu-marked tests
are skipped (tests/conftest.py skips them without CUDA); on a GPU machine without the
interpreter the CPU (interpreter) cases are skipped and the gpu-marked ones run.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET or torch.cuda.is_available():
    collect_ignore_glob: list[str] = []
else:
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cpu = pytest.mark.skip(reason="CPU cases run under the Triton interpreter only")
    skip_gpu = pytest.mark.skip(reason="gpu cases run compiled, not under the interpreter")
    for item in items:
        if "tests/kernels/" not in item.nodeid.replace("\\", "/"):
            continue
        if "gpu" in item.keywords and INTERPRET:
            item.add_marker(skip_gpu)
        elif "gpu" not in item.keywords and not INTERPRET:
            item.add_marker(skip_cpu)
