"""tests/workers/cluster.py's port blocks: blocks picked one after another (before their
workers bind them) never overlap within a test process."""

from __future__ import annotations

from tests.workers.cluster import free_port_block


def test_blocks_picked_in_a_row_never_overlap():
    ports: list[int] = []
    for _ in range(300):
        base = free_port_block(3)
        ports += range(base, base + 3)
    assert len(ports) == len(set(ports))
