"""P and D as on two hosts (issue 24): P runs in its own network namespace, reached over a
veth pair (or, where namespaces cannot be made, P and D listen on two different loopback
addresses); each advertises the address the other reaches it at (`--advertise-host`), the
KV moves over TCP (D accepts no other transport), and the cluster's texts equal the offline
engine's, token for token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.e2e.test_cluster_e2e import KEY, prompt_ids, start_proxy
from tests.workers.cluster import TOKEN, Worker, free_port_block, stop_workers, wait_healthy

pytestmark = pytest.mark.timeout(600)
AUTH = {"authorization": f"Bearer {TOKEN}"}
NS, VETH = f"pdserve-p-{os.getpid()}", f"pdv{os.getpid() % 100000}"
HOST_SIDE, NS_SIDE = "10.231.7.1", "10.231.7.2"


def make_namespace() -> bool:
    """A network namespace for P joined to this one by a veth pair; False (nothing left
    behind) where this machine does not allow it."""
    steps = [["ip", "netns", "add", NS],
             ["ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH + "n"],
             ["ip", "link", "set", VETH + "n", "netns", NS],
             ["ip", "addr", "add", f"{HOST_SIDE}/30", "dev", VETH],
             ["ip", "link", "set", VETH, "up"],
             ["ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_SIDE}/30", "dev", VETH + "n"],
             ["ip", "netns", "exec", NS, "ip", "link", "set", VETH + "n", "up"],
             ["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"]]
    try:
        for cmd in steps:
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        drop_namespace()
        return False


def drop_namespace() -> None:
    for cmd in (["ip", "link", "del", VETH], ["ip", "netns", "del", NS]):
        subprocess.run(cmd, capture_output=True, timeout=10)


class HostWorker(Worker):
    host: str = "127.0.0.1"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"


def start(role: str, tmp: Path, bind: str, advertise: str, prefix: list[str], *args: str
          ) -> HostWorker:
    port = free_port_block()
    log = tmp / f"{role}-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PDSERVE_TORCH_THREADS": "1"}
    cmd = [*prefix, sys.executable, "-m", "pdserve", "worker", "--role", role, "--host", bind,
           "--advertise-host", advertise, "--port", str(port), "--internal-token", TOKEN,
           "--num-gpu-blocks-override", "400", "--max-model-len", "512", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    w = HostWorker(role, port, proc, log, TOKEN)
    w.host = advertise
    return w


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-hosts")
    os.environ["PDSERVE_CACHE_DIR"] = str(tmp / "cache")
    namespaced = make_namespace()
    if namespaced:  # P inside the namespace, D on the host side of the veth pair
        p_bind = p_addr = NS_SIDE
        d_bind = d_addr = HOST_SIDE
        prefix = ["ip", "netns", "exec", NS]
    else:
        p_bind = p_addr = "127.0.0.2"
        d_bind = d_addr = "127.0.0.3"
        prefix = []
    ws, proxy = [], None
    with socket.socket() as s:  # D's tcp KV data port, fixed (--kv-data-port)
        s.bind((d_bind, 0))
        data_port = s.getsockname()[1]
    try:
        ws = [start("prefill", tmp, p_bind, p_addr, prefix, "--kv-tcp-connections", "2"),
              start("decode", tmp, d_bind, d_addr, [], "--kv-transports", "tcp",
                    "--kv-data-port", str(data_port))]
        wait_healthy(ws)
        proxy, url, log = start_proxy(tmp, [ws[0].http], [ws[1].http])
        yield {"P": ws[0], "D": ws[1], "url": url, "namespaced": namespaced, "log": log,
               "data": (d_bind, data_port)}
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(20)
        stop_workers(ws)
        if namespaced:
            drop_namespace()


def transfers(worker: HostWorker, transport: str) -> float:
    text = httpx.get(worker.http + "/metrics", headers=AUTH, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kv_transfer_transfers_total{") and 'role="decode"' in line
               and f'transport="{transport}"' in line and 'outcome="done"' in line)


def test_p_and_d_on_two_hosts_move_kv_over_tcp_and_match_offline(two_hosts):
    p, d = two_hosts["P"], two_hosts["D"]
    print("P in its own network namespace" if two_hosts["namespaced"] else
          "namespaces not allowed here: P and D on two loopback addresses")
    # each advertises the address the other reaches it at, not the proxy's loopback
    assert p.get("/info").json()["data_address"].startswith(f"tcp://{p.host}:")
    assert d.get("/info").json()["kv_address"].startswith(f"tcp://{d.host}:")
    reference = LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=400)
    before = transfers(d, "tcp")
    with openai.OpenAI(base_url=two_hosts["url"] + "/v1", api_key=KEY, max_retries=0,
                       timeout=120) as client:
        model = client.models.list().data[0].id
        for i, (temp, seed) in enumerate([(0.0, 0), (0.8, 21), (1.0, 22)]):
            ids = prompt_ids(100 + i, n=60) + [7] * 20  # long enough for P/D (> 16 tokens)
            want = reference.generate({"prompt_token_ids": ids}, SamplingParams(
                temperature=temp, seed=seed, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
            r = client.completions.create(model=model, prompt=ids, max_tokens=16,
                                          temperature=temp, seed=seed,
                                          extra_body={"ignore_eos": True,
                                                      "return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
            assert r.choices[0].text == reference.tokenizer.decode(want.outputs[0].token_ids)
    end = time.monotonic() + 10
    while transfers(d, "tcp") < before + 3 and time.monotonic() < end:
        time.sleep(0.2)
    assert transfers(d, "tcp") >= before + 3  # every prompt's KV crossed over TCP
    # D's data plane holds the port it was given, and P opened the two connections it was told
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(two_hosts["data"])
    info = d.get("/info").json()
    assert info["kv_data_port"] == two_hosts["data"][1] and info["kv_tcp_connections"] == 2, info
