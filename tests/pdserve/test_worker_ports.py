"""A local cluster's worker ports (pdserve/serve.py): by default the first block of free ports
from 8100 up, skipping ports another process holds (it used to take 8100.. regardless and
trip over another cluster's workers)."""

from __future__ import annotations

import socket

import pytest

from pdserve.common import UserError
from pdserve.serve import free_port_block
from tests.workers.cluster import free_port_block as some_free_block


def test_the_first_free_block_skips_held_ports() -> None:
    start = some_free_block(12)
    assert free_port_block(start, 6) == start
    holder = socket.socket()
    holder.bind(("127.0.0.1", start + 2))
    holder.listen()
    try:
        base = free_port_block(start, 6)
        assert base == start + 3  # the first block that does not contain the held port
        for p in range(base, base + 6):  # and every port of it is free
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    finally:
        holder.close()


def test_no_block_left_says_which_option_to_use() -> None:
    with pytest.raises(UserError, match="--worker-base-port"):
        free_port_block(65530, 10)


def test_kv_data_port_and_tcp_connections_options() -> None:
    """`--kv-data-port` (D's tcp KV data port: 0, a free port, by default) and
    `--kv-tcp-connections` (P's data connections per D), from flags or the environment,
    refused out of range."""
    from pdserve.config import ConfigError, build_config
    from pdserve.service.config import WorkerConfig

    cfg = build_config(WorkerConfig, ["--role", "decode", "--insecure-no-token"], env={})
    assert cfg.kv_data_port == 0 and cfg.kv_tcp_connections is None
    cfg = build_config(WorkerConfig, ["--role", "decode", "--kv-data-port", "8203"],
                       env={"PDSERVE_KV_TCP_CONNECTIONS": "8"})
    assert cfg.kv_data_port == 8203 and cfg.kv_tcp_connections == 8
    with pytest.raises(ConfigError, match="--kv-data-port='70000'"):
        build_config(WorkerConfig, ["--kv-data-port", "70000"], env={})
    with pytest.raises(ConfigError, match="PDSERVE_KV_TCP_CONNECTIONS='0'"):
        build_config(WorkerConfig, [], env={"PDSERVE_KV_TCP_CONNECTIONS": "0"})
