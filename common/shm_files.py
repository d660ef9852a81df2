"""Names of the KV pool files CPU workers keep in /dev/shm, and the sweep of dead owners'
files. Torch-free: `pdserve serve` sweeps when it restarts a local worker or gives up on one,
and every worker sweeps at start (a killed worker cannot unlink its own file)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "pdserve-kv"
POOL_FILE = re.compile(rf"{SHM_PREFIX}-(\d+)-([0-9a-f]+)\.pool")  # owner pid, epoch


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink pool files whose owner process no longer exists; returns what was removed."""
    removed = []
    for f in directory.glob(f"{SHM_PREFIX}-*.pool"):
        m = POOL_FILE.fullmatch(f.name)
        if m and not pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    if removed:
        logger.info("removed %d stale KV pool file(s) from %s", len(removed), directory)
    return removed
