"""P/D workers with tensor parallelism on the CPU (gloo) through `pdserve serve`, with the
real `openai` SDK: P tp=2 -> D tp=2 (a local cluster started with --tensor-parallel-size 2,
and over tcp), P tp=2 -> D tp=1 and P tp=1 -> D tp=2 (over shm and over tcp), and a
both-role worker of two ranks give the offline engine's tokens exactly, every prompt's KV
moved by the transport named; and a killed follower rank takes its worker down (the worker
exits non-zero, its other rank with it, the proxy ejects it and requests go to the other D;
none hangs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.e2e.test_cluster_e2e import KEY, prompt_ids, start_proxy
from tests.workers.cluster import (
    TOKEN,
    free_port_block,
    start_worker,
    stop_workers,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(420)
AUTH = {"authorization": f"Bearer {TOKEN}"}
CASES = [(0.0, 0), (0.8, 21)]  # (temperature, seed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    os.environ.setdefault("PDSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=400)


def check_equal_offline(url: str, reference: LLM, first: int = 0) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        for i, (temp, seed) in enumerate(CASES):
            ids = prompt_ids(first + i, n=60) + [7] * 20  # > 16 tokens: P prefills, D decodes
            want = reference.generate({"prompt_token_ids": ids}, SamplingParams(
                temperature=temp, seed=seed, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
            r = client.completions.create(model=model, prompt=ids, max_tokens=12,
                                          temperature=temp, seed=seed,
                                          extra_body={"ignore_eos": True,
                                                      "return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids


def transfers(http: str, transport: str) -> float:
    """KV transfers D finished over `transport` (its /metrics)."""
    text = httpx.get(http + "/metrics", headers=AUTH, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kv_transfer_transfers_total{") and 'role="decode"' in line
               and f'transport="{transport}"' in line and 'outcome="done"' in line)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except (httpx.HTTPError, ValueError, KeyError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


class Cluster:
    """The workers and the proxy a test started: `cluster()` stops them however it ends."""

    def __init__(self) -> None:
        self.workers: list = []
        self.proxy: subprocess.Popen | None = None

    def worker(self, *args):
        w = start_worker(*args)
        self.workers.append(w)  # at once: a later start that fails still stops this one
        return w


@contextlib.contextmanager
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        if c.proxy is not None:
            c.proxy.terminate()
            c.proxy.wait(20)
        stop_workers(c.workers)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("p_tp, d_tp, transport", [
    (2, 1, "shm"), (2, 1, "tcp"), (1, 2, "shm"), (1, 2, "tcp"), (2, 2, "tcp")])
def test_p_and_d_of_any_tp_sizes_equal_offline(tmp_path, reference, p_tp, d_tp, transport):
    with cluster() as c:
        p = c.worker("prefill", tmp_path, "--tensor-parallel-size", str(p_tp))
        d = c.worker("decode", tmp_path, "--tensor-parallel-size", str(d_tp),
                     "--kv-transports", transport)
        wait_healthy(c.workers)
        assert len(children(p.proc.pid)) == p_tp - 1  # the follower ranks
        c.proxy, url, _ = start_proxy(tmp_path, [p.http], [d.http])
        before = transfers(d.http, transport)
        check_equal_offline(url, reference, first=10 * p_tp + d_tp)
        wait_for(lambda: transfers(d.http, transport) >= before + len(CASES), 10,
                 f"{len(CASES)} transfers over {transport}")


def test_a_both_role_worker_with_tp2_equals_offline(tmp_path, reference):
    with cluster() as c:
        w = c.worker("both", tmp_path, "--tensor-parallel-size", "2")
        wait_healthy(c.workers)
        c.proxy, url, _ = start_proxy(tmp_path, [], [], "--worker", w.http)
        check_equal_offline(url, reference, first=30)


def test_local_cluster_with_tp2_workers_equals_offline(tmp_path, reference):
    """`pdserve serve --tensor-parallel-size 2` starts a P and a D of two ranks each (KV over
    shm, D's first choice on one CPU host)."""
    port, base = free_port_block(1), free_port_block(6)
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(port), "--api-key", KEY,
           "--internal-token", TOKEN, "--tensor-parallel-size", "2",
           "--worker-base-port", str(base), "--num-gpu-blocks-override", "400",
           "--max-model-len", "512", "--health-interval", "0.5", "--min-pd-prompt-tokens", "0"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            h = httpx.get(url + "/health", timeout=5).json()
            return h["healthy"] and len(h["workers"]) == 2 and all(
                w["healthy"] and w["data_path"] == "ok" for w in h["workers"])
        try:
            wait_for(lambda: proc.poll() is None and up(), 300, "the tp=2 cluster up")
        except TimeoutError:
            raise TimeoutError(log.read_text()[-4000:]) from None
        workers = httpx.get(url + "/health", timeout=5).json()["local_workers"]
        d_http = next(w["url"] for w in workers if w["role"] == "decode")
        before = transfers(d_http, "shm")
        check_equal_offline(url, reference, first=40)
        wait_for(lambda: transfers(d_http, "shm") >= before + len(CASES), 10,
                 "transfers over shm")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("busy", [True, False])
def test_a_killed_follower_takes_its_worker_down_and_the_proxy_ejects_it(tmp_path, reference,
                                                                         busy):
    """Busy: the kill lands while requests stream (D's next step raises). Idle: no step
    comes, and D's poll sees the rank's exit (a pidfd) all the same."""
    with cluster() as c:
        p = c.worker("prefill", tmp_path)
        victim = c.worker("decode", tmp_path, "--tensor-parallel-size", "2")
        other = c.worker("decode", tmp_path)
        wait_healthy(c.workers)
        c.proxy, url, log = start_proxy(tmp_path, [p.http], [victim.http, other.http])
        wait_for(lambda: len([w for w in httpx.get(url + "/health", timeout=5).json()["workers"]
                              if w["healthy"]]) == 3, 30, "three workers admitted")
        [follower] = children(victim.proc.pid)
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                           timeout=60) as client, ThreadPoolExecutor(4) as pool:
            model = client.models.list().data[0].id

            def one(i: int):
                ids = prompt_ids(200 + i, n=60) + [7] * 20
                try:
                    r = client.completions.create(model=model, prompt=ids, max_tokens=24,
                                                  temperature=0.0, extra_body={
                                                      "ignore_eos": True,
                                                      "return_token_ids": True})
                    return ids, r.choices[0].model_extra["token_ids"]
                except openai.APIError as e:  # a clean failure, never a hang
                    return ids, e

            running = [pool.submit(one, i) for i in range(4 if busy else 0)]
            time.sleep(0.3)
            t0 = time.monotonic()
            os.kill(follower, signal.SIGKILL)
            results = [f.result(timeout=90) for f in running]
        # the worker exits non-zero at once (idle or mid-step), its rank 0 and every rank
        assert victim.proc.wait(15) != 0
        if not busy:
            assert time.monotonic() - t0 < 5  # no request needed to notice
        assert gone(follower)
        text = victim.log.read_text()
        assert "rank 1 (pid" in text and "SIGKILL" in text, text[-3000:]
        wait_for(lambda: not next(w for w in httpx.get(url + "/health", timeout=5).json()[
            "workers"] if w["url"] == victim.http)["healthy"], 15, "the proxy ejected it")
        sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        for ids, got in results:
            if not isinstance(got, Exception):  # done elsewhere (failover) or before the kill
                want = reference.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
                assert got == want.outputs[0].token_ids
        check_equal_offline(url, reference, first=60)  # the cluster serves on without it
        assert "Traceback" not in log.read_text()
