"""`pdserve bench` and bench/fake_worker.py against a real proxy process: fake P/D engines
with known delays, then the real built-in-model cluster. Every process is stopped and
checked gone at the end (its children too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.workers.cluster import TOKEN, free_port_block

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in map(int, kids):
        out += [k, *descendants(k)]
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Procs:
    """Started processes; `stop()` sends SIGINT (serve stops its workers on it), waits, and
    returns the pids of anything left over, descendants included (then kills those)."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp, self.env, self.procs = tmp, env, []

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "w") as log:
            p = subprocess.Popen([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                 env=self.env, cwd=ROOT)
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def stop(self) -> list[int]:
        tree = {p.pid: descendants(p.pid) for _, p in self.procs}
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        end = time.monotonic() + 10
        left = [k for kids in tree.values() for k in kids]
        while time.monotonic() < end and any(alive(k) for k in left):
            time.sleep(0.2)
        leaked = [k for k in left if alive(k)]
        for k in leaked:
            os.kill(k, signal.SIGKILL)
        return leaked


@pytest.fixture
def procs(tmp_path_factory, tmp_path) -> Iterator[Procs]:
    cache = tmp_path_factory.getbasetemp() / "pdserve-cache"  # the built-in model, made once
    # one internal token for every process (the proxy and bench/fake_worker.py read it)
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(cache), "PDSERVE_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PDSERVE_INTERNAL_TOKEN": TOKEN}
    p = Procs(tmp_path, env)
    yield p
    assert p.stop() == [], "processes left running"


def wait_healthy(procs: Procs, url: str, name: str, timeout: float = 150,
                 serves: str = "") -> None:
    """Until `url`'s /health is 200 (and, for a proxy, says it serves `serves`: a proxy is
    ready with a D alone, before its P is admitted)."""
    end = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200 and serves in str(r.json().get("serves", "")):
                return
        except httpx.HTTPError:
            pass
        dead = [n for n, p in procs.procs if p.poll() is not None]
        if dead or time.monotonic() > end:
            pytest.fail(f"{name} not healthy ({dead or 'timeout'}):\n{procs.log(name)}")
        time.sleep(0.25)


def run_bench(procs: Procs, url: str, *args: str) -> dict:
    out = procs.tmp / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--base-url", url,
                        "--no-progress", "--result-json", str(out), *args], env=procs.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Successful requests:" in r.stdout
    return json.loads(out.read_text())["runs"][0]


def test_fake_pd_engines_behind_the_real_proxy(procs: Procs) -> None:
    p_port, d_port, port = free_port_block(2), free_port_block(2), free_port_block(1)
    fake = ["bench/fake_worker.py", "--ttft-ms", "30", "--itl-ms", "10"]
    procs.start("prefill", *fake, "--role", "prefill", "--port", str(p_port))
    procs.start("decode", *fake, "--role", "decode", "--port", str(d_port))
    procs.start("proxy", "-m", "pdserve", "serve", "--prefill", f"http://127.0.0.1:{p_port}",
                "--decode", f"http://127.0.0.1:{d_port}", "--port", str(port),
                "--min-pd-prompt-tokens", "0")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "proxy", serves="prefill/decode")
    run = run_bench(procs, url, "--num-prompts", "6", "--concurrency", "2", "--input-len", "64",
                    "--output-len", "5")
    s = run["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (6, 0, 30)
    assert 'route="pd"' in httpx.get(url + "/metrics").text  # the P/D path, not a fallback
    # tokens 1 and 2 must not arrive together: that happened when the proxy's sockets lacked
    # TCP_NODELAY (Nagle held the first chunk ~40 ms for the client's delayed ACK)
    # the fakes' delays are a floor; the proxy adds a little on top
    assert 0.030 <= s["ttft"]["p50"] < 0.030 + 0.05
    # the fake D times token 2 from the Join, which the proxy sends before it streams token
    # 1 to the client: a little under one ITL may separate them there, never ~0
    assert 0.010 - 0.003 <= s["token2"]["p50"] < 0.010 + 0.02
    assert s["tpot"]["p50"] == pytest.approx(0.010, abs=0.003)


def test_bench_against_the_builtin_cluster(procs: Procs) -> None:
    base, port = free_port_block(6), free_port_block(1)
    procs.start("serve", "-m", "pdserve", "serve", "--worker-base-port", str(base),
                "--port", str(port), "--kv-cache-memory-bytes", str(64 << 20))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "serve")
    run = run_bench(procs, url, "--num-prompts", "8", "--concurrency", "4", "--input-len", "32",
                    "--output-len", "8")
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (8, 0)
    assert s["total_output_tokens"] == 64 and s["total_input_tokens"] == 8 * 32
    for r in run["requests"]:
        assert r["ok"] and r["num_output_tokens"] == 8 and r["usage_reported"]
        assert 0 < r["ttft_s"] < r["e2e_s"] < 60 and r["tpot_s"] > 0
        assert len(r["itl_s"]) == len(r["chunk_times_s"]) - 1 >= 1
    assert s["output_throughput"] > 0 and s["tpot"]["p50"] > 0
