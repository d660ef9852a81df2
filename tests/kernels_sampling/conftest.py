"""Kernel tests need TRITON_INTERPRET=1 before triton is first imported when there is no GPU.

Without a GPU or the interpreter, collect only the torch-only reference tests; the wrapper
tests/test_sampling_interpreter.py runs this folder in a subprocess with the interpreter on.
"""

from __future__ import annotations

import os

import torch

if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    collect_ignore_glob: list[str] = []
else:
    collect_ignore_glob = ["test_triton_*.py"]
