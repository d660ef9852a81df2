"""`--advertise-host auto` (compose replicas advertise their own container IP): resolved
from the host name, a loopback answer refused with a one-line error before any engine loads."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pdserve.config import build_config
from pdserve.service import config as service_config
from pdserve.service.config import WorkerConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch):
    def set_host(name: str, address: str | None) -> None:
        def resolve(n: str) -> str:
            assert n == name
            if address is None:
                raise socket.gaierror(-2, "Name or service not known")
            return address

        service_config.own_address.cache_clear()
        monkeypatch.setattr(socket, "gethostname", lambda: name)
        monkeypatch.setattr(socket, "gethostbyname", resolve)

    yield set_host
    service_config.own_address.cache_clear()


def test_auto_is_the_address_the_host_name_resolves_to(host) -> None:
    host("3f2a9c1d0b7e", "172.18.0.5")  # a container: its id as host name, its network IP
    cfg = build_config(WorkerConfig, ["--role", "decode", "--host", "0.0.0.0",
                                      "--advertise-host", "auto", "--port", "8200"], env={})
    assert cfg.public_host == "172.18.0.5"
    assert cfg.worker_name == "decode@172.18.0.5:8200"  # each replica its own name
    assert build_config(WorkerConfig, ["--advertise-host", "node-a"], env={}).public_host == \
        "node-a"


@pytest.mark.parametrize("address,why", [("127.0.1.1", "loopback"), (None, "cannot resolve")])
def test_auto_refuses_what_peers_cannot_reach(host, address: str | None, why: str) -> None:
    host("laptop", address)
    cfg = build_config(WorkerConfig, ["--advertise-host", "auto"], env={})
    with pytest.raises(ValueError, match=why):
        _ = cfg.public_host


def test_the_worker_command_says_so_in_one_line() -> None:
    """Where this machine's name resolves to loopback (most dev boxes), `pdserve decode
    --advertise-host auto` stops at once with the reason; elsewhere it would start, so the
    check only runs where the name is loopback."""
    try:
        loop = socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        loop = True
    if not loop:
        pytest.skip("this host's name resolves to a routable address")
    r = subprocess.run([sys.executable, "-m", "pdserve", "decode", "--advertise-host", "auto",
                        "--insecure-no-token"], capture_output=True, text=True, timeout=50)
    assert r.returncode == 2 and "--advertise-host auto:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
