"""Runs tests/kernels_sampling under the Triton interpreter in a fresh process.

TRITON_INTERPRET must be set before triton is first imported, which this process has already
done (or may do) without it; a subprocess gets a clean start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_sampling_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/kernels_sampling", "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) > 0, out[-4000:]
    # -rA lists passed tests: the Triton kernel tests, not only the torch ones, must have run.
    assert "PASSED tests/kernels_sampling/test_triton_sampling.py" in out, out[-4000:]
