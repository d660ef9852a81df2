"""Fault injection on a supervised local cluster: `pdserve serve` starts 2 P + 2 D worker
processes and restarts any that die. Each fault hits 64 concurrent streams (greedy and seeded
sampling) driven by the official `openai` SDK; every stream must end with the text the
offline engine gives for the same prompt and seed (0 failed requests while a P/D pair
survives), and afterwards every worker's KV blocks are free and no request is left on it.

Faults, in order on one cluster: kill -9 a D; kill -9 a P; kill -9 a P and a D together;
SIGSTOP a D for 20 s under load (ejected <= 3 s after the stop, its streams failed over,
transfers to it again <= 5 s after SIGCONT). Each killed worker is restarted by the
supervisor and serves again (requests are routed to it and complete).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.timeout(900)
KEY = "sk-faults"
TOKEN = "faults-" + os.urandom(8).hex()  # the local cluster's internal token (ops HTTP too)
AUTH = {"authorization": f"Bearer {TOKEN}"}
BLOCKS = 400
STREAMS = 64


def prompt_ids(i: int, n: int) -> list[int]:
    import random

    rng = random.Random(i)
    return [rng.randrange(5, 4000) for _ in range(rng.randrange(8, n))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    port, base = free_port_block(1), free_port_block(12)
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PDSERVE_CACHE_DIR": str(tmp / "cache"),
           # the workers inherit these: a failed-over request's reservation on the other D
           # waits this long for a P offer that never comes before D recomputes it (30 s by
           # default, which every D-kill test below would wait out)
           "PDSERVE_TRANSFER_TIMEOUT": "5", "PDSERVE_RESERVATION_TIMEOUT": "5"}
    os.environ["PDSERVE_CACHE_DIR"] = str(tmp / "cache")
    cmd = [sys.executable, "-m", "pdserve", "serve", "--port", str(port), "--api-key", KEY,
           "--internal-token", TOKEN,
           "--num-prefill", "2", "--num-decode", "2", "--worker-base-port", str(base),
           "--num-gpu-blocks-override", str(BLOCKS), "--max-model-len", "512",
           "--health-interval", "0.5", "--min-pd-prompt-tokens", "0"]
    log = tmp / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:
        wait(lambda: proc.poll() is None and all_serving(url), 300, "the cluster up",
             lambda: log.read_text()[-3000:])
        yield {"url": url, "proc": proc, "log": log, "pids": pids}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in pids:  # every worker it ever ran is gone with it
            assert not _alive(pid), f"worker pid {pid} outlived `pdserve serve`"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait(pred, timeout: float, what: str, detail=lambda: ""):
    end = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except (httpx.HTTPError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {timeout} s\n{detail()}")
        time.sleep(0.1)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def all_serving(url: str) -> bool:
    h = health(url)
    return h["healthy"] and len(h["workers"]) == 4 and all(
        w["healthy"] and w["data_path"] == "ok" for w in h["workers"]) and all(
        w["state"] == "running" for w in h["local_workers"])


def local(url: str, role: str, i: int) -> dict:
    return [w for w in health(url)["local_workers"] if w["role"] == role][i]


def worker_load(url: str) -> dict:
    """Each worker's /load, read from its own ops port."""
    return {w["url"]: httpx.get(w["url"] + "/load", headers=AUTH, timeout=5).json()
            for w in health(url)["local_workers"]}


def idle_and_free(url: str) -> bool:
    for load in worker_load(url).values():
        load = load.get("load", load)
        if load.get("num_requests_running") or load.get("num_requests_waiting") or \
                load.get("blocks_awaiting_transfer") or load.get("num_reserved_blocks") or \
                load.get("num_free_blocks") != BLOCKS:
            return False
    return True


def per_worker(url: str, metric: str, where: str = "") -> dict[str, float]:
    """A proxy counter by worker URL (`pdserve_proxy_worker_<metric>_total`), summed over
    the series whose labels contain `where`."""
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"pdserve_proxy_worker_{metric}_total{{") and where in line:
            worker = line.split('worker="')[1].split('"')[0]
            out[worker] = out.get(worker, 0.0) + float(line.split()[-1])
    return out


def routed(url: str) -> dict[str, float]:
    return per_worker(url, "requests")


@pytest.fixture(scope="module")
def reference(served):
    return LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=BLOCKS)


def jobs_for(round_: int) -> list[tuple[list[int], float, int]]:
    return [(prompt_ids(1000 * round_ + i, 60), 0.0 if i % 3 == 0 else 0.8, 7000 * round_ + i)
            for i in range(STREAMS)]


def storm(served, reference, round_: int, fault, check_free: bool = True) -> None:
    """64 concurrent streams; `fault()` runs once they all stream; every text must equal the
    offline engine's. Then the cluster must be idle with every block free."""
    url, tok = served["url"], reference.tokenizer
    jobs = jobs_for(round_)
    want = reference.generate([{"prompt_token_ids": p} for p, _, _ in jobs],
                              [SamplingParams(temperature=t, seed=s, max_tokens=32,
                                              ignore_eos=True) for _, t, s in jobs],
                              use_tqdm=False)
    model = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()[
        "data"][0]["id"]
    streaming = threading.Semaphore(0)

    def one(job):
        p, t, s = job
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=180) as c:
            stream = c.completions.create(model=model, prompt=p, max_tokens=32, temperature=t,
                                          seed=s, stream=True, extra_body={"ignore_eos": True})
            text, told = "", False
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    if not told:
                        streaming.release()
                        told = True
            return text

    with cf.ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        for _ in range(STREAMS // 2):  # half of them have their first token: mid-load
            assert streaming.acquire(timeout=120)
        fault()
        texts = [f.result(timeout=300) for f in futures]
    bad = [i for i, (text, out) in enumerate(zip(texts, want))
           if text != tok.decode(out.outputs[0].token_ids)]
    assert not bad, f"{len(bad)} streams differ from the offline engine: {bad[:8]}"
    if check_free:
        wait(lambda: idle_and_free(url), 60, "every worker idle with its blocks free",
             lambda: str(worker_load(url)))


def kill(served, *which: tuple[str, int]) -> list[dict]:
    victims = [local(served["url"], role, i) for role, i in which]
    for v in victims:
        served["pids"].add(v["pid"])
        os.kill(v["pid"], signal.SIGKILL)
    return victims


def restarted_and_serving(served, reference, victims: list[dict], round_: int) -> None:
    """Each victim runs again (a new pid, one more restart) and takes requests again."""
    url = served["url"]

    def back() -> bool:
        now = {w["url"]: w for w in health(url)["local_workers"]}
        return all(now[v["url"]]["state"] == "running" and now[v["url"]]["pid"] != v["pid"]
                   and now[v["url"]]["restarts"] == v["restarts"] + 1 for v in victims) \
            and all_serving(url)

    wait(back, 120, "the killed workers restarted and readmitted",
         lambda: served["log"].read_text()[-3000:])
    for w in health(url)["local_workers"]:
        served["pids"].add(w["pid"])
    before = routed(url)
    storm(served, reference, round_, lambda: None)
    after = routed(url)
    for v in victims:
        assert after.get(v["url"], 0) > before.get(v["url"], 0), (v["url"], before, after)
    restarts = per_worker(url, "restarts")
    for v in victims:  # counted as the supervisor's record says
        assert restarts[v["url"]] == v["restarts"] + 1, restarts


def test_kill_a_d(served, reference):
    victims = []
    storm(served, reference, 1, lambda: victims.extend(kill(served, ("decode", 0))))
    restarted_and_serving(served, reference, victims, 2)


def test_kill_a_p(served, reference):
    victims = []
    storm(served, reference, 3, lambda: victims.extend(kill(served, ("prefill", 0))))
    restarted_and_serving(served, reference, victims, 4)


def test_kill_a_p_and_a_d_together(served, reference):
    victims = []
    storm(served, reference, 5,
          lambda: victims.extend(kill(served, ("prefill", 1), ("decode", 1))))
    restarted_and_serving(served, reference, victims, 6)


def test_a_frozen_d_is_ejected_and_comes_back(served, reference):
    url = served["url"]
    d = local(url, "decode", 0)
    times: dict[str, float] = {}

    def ejected() -> bool:
        w = [w for w in health(url)["workers"] if w["url"] == d["url"]][0]
        return not w["healthy"] or w["data_path"] != "ok"

    def freeze() -> None:
        times["stop"] = time.monotonic()
        os.kill(d["pid"], signal.SIGSTOP)
        wait(ejected, 10, "the frozen D ejected")
        times["ejected"] = time.monotonic()
        times["ejections"] = per_worker(url, "ejections", 'cause="data_path"').get(d["url"], 0)

    try:
        storm(served, reference, 7, freeze, check_free=False)  # its streams failed over
        assert times["ejected"] - times["stop"] <= 3.0, times
        assert times["ejections"] >= 1, times
        time.sleep(max(0.0, times["stop"] + 20 - time.monotonic()))
    finally:
        os.kill(d["pid"], signal.SIGCONT)
    resumed = time.monotonic()
    done_before = kv_done(d["url"])

    def transfers_again() -> bool:  # a small request at a time until one moves KV to it
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
            c.completions.create(model="pdserve-builtin-tiny", prompt=prompt_ids(99, 60),
                                 max_tokens=2)
        return kv_done(d["url"]) > done_before

    wait(transfers_again, 30, "a KV transfer to the resumed D")
    assert time.monotonic() - resumed <= 5.0
    storm(served, reference, 8, lambda: None)  # and the whole cluster serves on


def kv_done(worker_url: str) -> float:
    text = httpx.get(worker_url + "/metrics", headers=AUTH, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kv_transfer_transfers_total{")
               and 'role="decode"' in line and 'outcome="done"' in line)


PET = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["cat", "dog", "fox"]},
    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    "tags": {"type": "array", "items": {"enum": ["old", "new", "big"]}, "maxItems": 3}},
    "required": ["name", "kind", "legs", "tags"], "additionalProperties": False}


def test_structured_streams_survive_killing_a_d(served, reference):
    """JSON-schema streams (vLLM's structured_outputs) when a D dies mid-stream: failover
    resubmits each with its output so far, the new D rebuilds the grammar state from it, and
    every stream ends with the offline engine's text, valid against the schema."""
    import json

    import jsonschema

    from pdserve.common.params import StructuredOutputs

    url, tok = served["url"], reference.tokenizer
    spec = StructuredOutputs(json=json.dumps(PET))
    jobs = [(prompt_ids(9000 + i, 40), 0.0 if i % 4 == 0 else 0.9, 800 + i) for i in range(16)]
    want = reference.generate([{"prompt_token_ids": p} for p, _, _ in jobs],
                              [SamplingParams(temperature=t, seed=s, max_tokens=120,
                                              structured=spec) for _, t, s in jobs],
                              use_tqdm=False)
    streaming = threading.Semaphore(0)

    def one(job):
        p, t, s = job
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=180) as c:
            stream = c.completions.create(
                model="pdserve-builtin-tiny", prompt=p, max_tokens=120, temperature=t, seed=s,
                stream=True, extra_body={"structured_outputs": {"json": PET}})
            text, told = "", False
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    if not told and text:
                        streaming.release()
                        told = True
            return text

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        for _ in range(len(jobs) // 2):
            assert streaming.acquire(timeout=120)
        kill(served, ("decode", 0))
        texts = [f.result(timeout=300) for f in futures]
    for text, out in zip(texts, want):
        assert text == tok.decode(out.outputs[0].token_ids)
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(text), PET)
    assert sum(o.outputs[0].finish_reason == "stop" for o in want) >= len(jobs) // 2
