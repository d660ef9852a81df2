"""The shared-memory data plane (CPU pools on one host): D maps P's pool file read-only
in spirit (D never writes it) and copies offered blocks into its own reserved blocks.

Pool files are plain files under /dev/shm named by owner pid and epoch
(`engine/kv_pool.py`), not `multiprocessing.shared_memory` (whose resource tracker unlinks
segments from the attaching side on Python 3.11). `sweep_stale` (`common/shm_files.py`)
removes files whose owner process is gone: every worker runs it at start, `pdserve serve`
when it restarts a local worker or gives up on one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from pdserve.common.shm_files import POOL_FILE, SHM_DIR
from pdserve.engine.kv_pool import DTYPES

logger = logging.getLogger(__name__)

def attach(path: str, shape: list[int], dtype: str) -> torch.Tensor:
    """Map a peer's pool file; raises OSError/ValueError with the reason if it cannot."""
    p = Path(path)
    if p.parent != SHM_DIR or not POOL_FILE.fullmatch(p.name):
        raise ValueError(f"{path!r} is not a pdserve pool file")
    if dtype not in DTYPES:
        raise ValueError(f"unknown pool dtype {dtype!r}")
    numel = math.prod(shape)
    need = numel * DTYPES[dtype].itemsize
    if p.stat().st_size != need:
        raise ValueError(f"{path} holds {p.stat().st_size} bytes, the announced shape needs {need}")
    flat = torch.from_file(str(p), shared=True, size=numel, dtype=DTYPES[dtype])
    return flat.view(shape)


def copy_blocks(dst_pool: torch.Tensor, dst_ids: list[int], src_pool: torch.Tensor,
                src_ids: list[int]) -> None:
    """One gather-scatter of whole blocks (each a contiguous span in both pools)."""
    dst_pool[torch.tensor(dst_ids)] = src_pool[torch.tensor(src_ids)]
