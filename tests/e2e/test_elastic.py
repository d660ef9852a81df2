"""Elastic membership (`pdserve serve --elastic`): workers join and leave a serving cluster.
Real processes and sockets: built-in-model both-role workers, a real proxy, the `openai`
SDK as the client, and every answer compared token by token with the offline engine.

One cluster, three phases, requests streaming all along (64 client tasks, each sending
greedy requests one after another, until the last phase ends):
1. worker A (given on the command line) serves; worker B joins by POST /workers and takes
   new requests within 5 s;
2. A is drained (POST /workers/A/drain): it gets nothing new, finishes its streams, and
   leaves the proxy's list;
3. C starts with `--join PROXY` and joins by itself; B gets SIGTERM: it drains itself (its
   /health says "draining"), finishes its streams, exits by itself, and leaves the list.
No request fails; each answer equals the offline engine's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.stream_load import differing, prompts_and_answers, stream_while
from tests.workers.cluster import TOKEN, free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
STREAMS = 64
MAX_TOKENS = 16


def start(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDSERVE_TORCH_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "pdserve", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def start_worker(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port_block()
    proc = start(tmp, name, "worker", "--role", "both", "--port", str(port), "--internal-token",
                 TOKEN, "--num-gpu-blocks-override", "400", "--max-model-len", "512",
                 "--name", name, *args)
    return proc, f"http://127.0.0.1:{port}"


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGINT (at once: SIGTERM would drain), then SIGKILL what did not end."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_for(what: str, check, timeout: float = 120.0, tmp: Path | None = None) -> float:
    """Seconds until `check()` is true (polled every 50 ms)."""
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}"
                           for p in (tmp.glob("*.log") if tmp else []))
            raise TimeoutError(f"{what}: not within {timeout} s{logs}")
        time.sleep(0.05)


def requests_served(url: str) -> float:
    """A worker's count of requests it finished (its /metrics), any outcome."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pdserve_requests_total{"))


def listed(proxy: str) -> dict[str, dict]:
    return {w["name"] or w["url"]: w for w in
            httpx.get(proxy + "/workers", timeout=5).json()["workers"]}


def test_workers_join_drain_and_leave_under_64_streams(tmp_path: Path) -> None:
    procs: list[subprocess.Popen] = []
    try:
        a, a_url = start_worker(tmp_path, "A")
        b, b_url = start_worker(tmp_path, "B")
        procs += [a, b]
        for u in (a_url, b_url):
            wait_for(f"{u} healthy", lambda u=u: httpx.get(u + "/health").status_code == 200,
                     tmp=tmp_path)
        port = free_port_block(1)
        proxy = f"http://127.0.0.1:{port}"
        procs.append(start(tmp_path, "proxy", "serve", "--elastic", "--port", str(port),
                           "--internal-token", TOKEN, "--worker", a_url,
                           "--health-interval", "0.5"))
        wait_for("the proxy serving", lambda: httpx.get(proxy + "/health").status_code == 200,
                 tmp=tmp_path)
        auth = {"authorization": f"Bearer {TOKEN}"}
        # membership changes need the internal token; bad bodies are OpenAI-shaped 400s
        r = httpx.post(proxy + "/workers", json={"url": b_url})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_internal_token"
        r = httpx.post(proxy + "/workers", json={"url": "ftp://x"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "url"
        r = httpx.post(proxy + "/workers/nobody/drain", headers=auth)
        assert r.status_code == 404

        prompts, want = prompts_and_answers(0, STREAMS * 4, (8, 60), MAX_TOKENS,
                                            max_model_len=512, num_gpu_blocks_override=400)
        urls: dict[str, str] = {}

        async def operate() -> dict[str, float]:
            times: dict[str, float] = {}
            await asyncio.sleep(1.0)  # the streams run on A
            t0 = time.monotonic()
            r = await asyncio.to_thread(httpx.post, proxy + "/workers", json={"url": b_url},
                                        headers=auth)
            assert r.status_code == 201, r.text
            times["b_takes_traffic_s"] = await asyncio.to_thread(
                wait_for, "B taking requests", lambda: listed(proxy)["B"]["active"] > 0,
                30.0, tmp_path)
            times["b_since_post_s"] = time.monotonic() - t0
            # B, empty, takes the next requests until its load matches A's, so A may just have
            # finished its last stream: drain it while it holds some (it gets new ones again
            # once B's load matches), so the drain has streams to wait for
            await asyncio.to_thread(wait_for, "A holding streams",
                                    lambda: listed(proxy)["A"]["active"] >= 2, 30.0, tmp_path)
            r = await asyncio.to_thread(httpx.post, proxy + "/workers/A/drain", headers=auth)
            assert r.status_code == 202 and r.json()["status"] == "draining", r.text
            times["a_active_at_drain"] = r.json()["active"]  # streams A had to finish
            await asyncio.to_thread(wait_for, "A leaving", lambda: "A" not in listed(proxy),
                                    60.0, tmp_path)
            # C joins by itself once ready (`--join`: how a scaled-up compose service does)
            c_proc, c_url = start_worker(tmp_path, "C", "--join", proxy)
            procs.append(c_proc)
            urls["C"] = c_url
            await asyncio.to_thread(wait_for, "C taking requests",
                                    lambda: listed(proxy).get("C", {}).get("active", 0) > 0, 120.0, tmp_path)
            # C, empty, takes the next requests until its load matches B's, so B may just
            # have finished its last stream (as A above): SIGTERM it while it holds some
            await asyncio.to_thread(wait_for, "B holding streams",
                                    lambda: listed(proxy)["B"]["active"] >= 1, 30.0, tmp_path)
            times["b_active_at_sigterm"] = listed(proxy)["B"]["active"]
            b.send_signal(signal.SIGTERM)  # B drains itself
            await asyncio.to_thread(wait_for, "B saying it drains",
                                    lambda: httpx.get(b_url + "/health").json()["status"]
                                    == "draining" or b.poll() is not None, 10.0, tmp_path)
            await asyncio.to_thread(b.wait, 60)  # it stops by itself once its streams end
            times["b_exit_code"] = b.returncode
            await asyncio.to_thread(wait_for, "B leaving", lambda: "B" not in listed(proxy),
                                    30.0, tmp_path)
            await asyncio.sleep(1.0)  # C serves on
            return times

        got, failures, times = asyncio.run(stream_while(proxy, prompts, STREAMS, MAX_TOKENS,
                                                        operate))
        assert not failures, failures[:5]
        assert len(got) > 2 * STREAMS, len(got)  # requests went on through every phase
        wrong = differing(got, want)
        assert not wrong, f"{len(wrong)} answers differ from the offline engine: {wrong[:5]}"
        assert times["b_since_post_s"] <= 5.0, times
        assert times["a_active_at_drain"] > 0 and times["b_active_at_sigterm"] > 0, times
        assert times["b_exit_code"] == 0, times
        assert requests_served(urls["C"]) > 0 and set(listed(proxy)) == {"C"}
        assert a.poll() is None  # drained through the proxy, A itself runs on (idle)
    finally:
        stop_all(procs)


def test_a_proxy_finds_its_workers_by_dns(tmp_path: Path) -> None:
    """`--discover both=HOST:PORT` (a Kubernetes headless Service in production; here a name
    that resolves to 127.0.0.1): the proxy starts with no worker, finds the one there and
    serves through it; the worker, given SIGTERM, drains and stops, and the proxy routes
    nothing to it."""
    procs: list[subprocess.Popen] = []
    try:
        w, w_url = start_worker(tmp_path, "W")
        procs.append(w)
        port = free_port_block(1)
        proxy = f"http://127.0.0.1:{port}"
        w_port = int(w_url.rsplit(":", 1)[1])
        procs.append(start(tmp_path, "proxy", "serve", "--port", str(port), "--internal-token",
                           TOKEN, "--discover", f"both=127.0.0.1:{w_port}",
                           "--health-interval", "0.5"))
        wait_for("the proxy serving", lambda: httpx.get(proxy + "/health").status_code == 200,
                 tmp=tmp_path)
        assert [x["url"] for x in httpx.get(proxy + "/workers").json()["workers"]] == [w_url]
        with openai.OpenAI(base_url=proxy + "/v1", api_key="none", max_retries=0,
                           timeout=60) as c:
            model = c.models.list().data[0].id
            r = c.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
        # (the name still lists the address here, as a terminated pod's would not: the
        # proxy keeps looking it up and routes nothing there)
        wait_for("the proxy routing nowhere", lambda: httpx.get(proxy + "/health").status_code
                 == 503, 30.0, tmp_path)
    finally:
        stop_all(procs)
