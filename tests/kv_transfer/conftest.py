"""Fixtures of the KV-transfer tests: real P and D processes, stopped after each test."""

from __future__ import annotations

import pytest

from tests.kv_transfer.harness import start


@pytest.fixture
def procs():
    """procs(role, **opts) -> a started P or D process (see harness.py)."""
    started = []

    def make(role, **opts):
        p = start(role, **opts)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
