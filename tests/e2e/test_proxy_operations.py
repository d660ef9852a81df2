"""Proxy operations with fake engines (bench/fake_worker.py) behind a real `pdserve serve`:
CORS preflight, several proxy processes on one port, SIGTERM draining a running stream, a
client's disconnect aborting its request on the worker, and the request metrics."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.bench.test_clusters import Procs, descendants, wait_healthy
from tests.workers.cluster import free_port_block

ORIGIN = "http://app.example"


def start_cluster(procs: Procs, *proxy_args: str) -> tuple[str, object]:
    url, proxy, _ = start_cluster_with_worker(procs, *proxy_args)
    return url, proxy


def start_cluster_with_worker(procs: Procs, *proxy_args: str) -> tuple[str, object, str]:
    """A fake both-role worker (10 ms TTFT, 50 ms ITL) behind a real `pdserve serve`: the
    proxy's URL, its process and the worker's HTTP URL (its /load counts running requests)."""
    w_port, port = free_port_block(2), free_port_block(1)
    procs.start("fake", "bench/fake_worker.py", "--role", "both", "--port", str(w_port),
                "--ttft-ms", "10", "--itl-ms", "50")
    proxy = procs.start("proxy", "-m", "pdserve", "serve", "--worker",
                        f"http://127.0.0.1:{w_port}", "--port", str(port), *proxy_args)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "proxy")
    return url, proxy, f"http://127.0.0.1:{w_port}"


def completion(url: str, n: int = 4) -> dict:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": model, "prompt": [5, 6, 7], "max_tokens": n, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_cors_and_several_proxy_processes(procs: Procs) -> None:
    url, proxy = start_cluster(procs, "--api-server-count", "2",
                               "--allowed-origins", json.dumps([ORIGIN]))
    r = httpx.options(url + "/v1/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(url + "/v1/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    assert len(descendants(proxy.pid)) >= 1  # a second proxy process shares the port
    for _ in range(8):  # new connections land on either process; every one is served
        assert completion(url)["usage"]["completion_tokens"] == 4


def test_sigterm_drains_a_running_stream(procs: Procs) -> None:
    url, proxy = start_cluster(procs, "--shutdown-timeout", "20")
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    chunks = 0
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": model, "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True,
            "stream": True}) as r:
        t0 = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 2:
                    proxy.send_signal(signal.SIGTERM)  # mid-stream: ~1.4 s of tokens left
            if line == "data: [DONE]":
                break
    assert chunks == 30 and time.monotonic() - t0 > 1.0
    proxy.wait(20)  # then it exits
    try:
        httpx.get(url + "/health", timeout=2)
        raise AssertionError("the proxy still answers after its drain")
    except httpx.HTTPError:
        pass


def metric_samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric `name` on the proxy's /metrics, keyed by their sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_disconnect_abort_and_request_metrics(procs: Procs) -> None:
    """The real serve stack (every middleware): a non-streaming client that hangs up
    mid-generation has its request aborted on the worker at once, not after max_tokens
    (200 tokens at 50 ms would take 10 s); the e2e latency histogram counts each finished
    request once; the HTTP counter labels routes by template and unknown paths as "other"."""
    url, _, w_url = start_cluster_with_worker(procs)
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": [5, 6, 7], "max_tokens": 200,
                       "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        t0 = time.monotonic()
        while not httpx.get(w_url + "/load", timeout=5).json()["num_requests_running"]:
            assert time.monotonic() - t0 < 5, "the request never reached the worker"
            time.sleep(0.02)
        time.sleep(0.3)  # a few tokens in
    t0 = time.monotonic()  # the client hung up
    while (load := httpx.get(w_url + "/load", timeout=5).json())["num_requests_running"]:
        assert time.monotonic() - t0 < 2, "the worker still runs the abandoned request"
        time.sleep(0.02)
    assert load["fake_tokens_emitted"] < 60, load  # stopped early, not at 200
    e2e = "pdserve_proxy_e2e_request_latency_seconds_count"
    assert metric_samples(url, e2e) == {(): 0}  # the abandoned request did not finish
    assert completion(url)["usage"]["completion_tokens"] == 4
    assert metric_samples(url, e2e) == {(): 1}
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": model, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True,
            "stream": True}) as r:
        assert [ln for ln in r.iter_lines() if ln.startswith("data: ")][-1] == "data: [DONE]"
    assert metric_samples(url, e2e) == {(): 2}  # once per finished request, streamed or not
    for path in ("/nope", "/v1/nope", "/x/y/z"):
        assert httpx.get(url + path, timeout=5).status_code == 404
    samples = metric_samples(url, "pdserve_proxy_http_requests_total")
    endpoints = {dict(k)["endpoint"] for k in samples}
    assert endpoints <= {"/v1/models", "/v1/completions", "/health", "/metrics", "other"}, \
        endpoints
    assert samples[(("endpoint", "other"), ("status", "404"))] == 3
    assert samples[(("endpoint", "/v1/completions"), ("status", "200"))] >= 1
    assert "not importable" not in procs.log("proxy")  # served on uvloop and httptools


def test_a_busy_proxy_port_is_one_line_before_any_worker_starts(procs: Procs, tmp_path) -> None:
    """Another process holds --port: `pdserve serve` (a local cluster, which would start
    workers) exits 1 at once with one line naming the port and the flag; no worker started
    and no cluster folder was made."""
    import os
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**procs.env, "TMPDIR": str(tmp_path)}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--port", str(port),
                            "--worker-base-port", str(free_port_block(6))],
                           capture_output=True, text=True, env=env, timeout=60)
        took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"pdserve serve: error: cannot listen on 127.0.0.1:{port}: in use by "
                      "another process (choose another with --port)"], r.stderr
    assert "Traceback" not in r.stderr and "started local" not in r.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith("pdserve-cluster-")]
    assert took < 30


def test_a_vllm_command_line_serves(procs: Procs) -> None:
    """`pdserve serve MODEL` with vLLM's options as a vLLM user types them: the positional
    model, --tensor-parallel-size 1, and vLLM-only options pdserve ignores with one warning
    naming each; the official openai SDK gets a completion from the local P/D cluster."""
    import openai

    from pdserve.engine.builtin_model import builtin_model_path

    model = builtin_model_path(Path(procs.env["PDSERVE_CACHE_DIR"]))
    port = free_port_block(1)
    procs.start("proxy", "-m", "pdserve", "serve", str(model), "--tensor-parallel-size", "1",
                "--trust-remote-code", "--enable-chunked-prefill", "--max-seq-len-to-capture",
                "8192", "--port", str(port), "--worker-base-port", str(free_port_block(6)),
                "--min-pd-prompt-tokens", "0", "--stats-interval", "1")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(procs, url, "proxy", serves="prefill/decode")
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        served = [m.id for m in client.models.list().data]
        out = client.completions.create(model=str(model), prompt="The quick brown fox",
                                        max_tokens=4, temperature=0)
        by_folder = client.completions.create(model=model.name, prompt="The quick brown fox",
                                              max_tokens=1, temperature=0)
    # vLLM's default served name is the model argument as given; the folder's name works too
    assert served == [str(model), model.name]
    assert out.model == str(model) and by_folder.model == model.name
    assert out.choices[0].text and out.usage.completion_tokens == 4
    log = (procs.tmp / "proxy.log").read_text()  # whole: the workers' lines are in it too
    warning = [ln for ln in log.splitlines() if "ignoring vLLM option(s)" in ln]
    assert len(warning) == 1
    for flag in ("--trust-remote-code", "--enable-chunked-prefill", "--max-seq-len-to-capture"):
        assert flag in warning[0]
    assert "--tensor-parallel-size" not in warning[0]  # 1 is what pdserve does: accepted
    # each worker's output is on the console too, prefixed as docker compose does
    for role in ("prefill", "decode"):
        assert f"{role}-" in log and " | " in log
        assert any(ln.startswith(f"{role}-") and " | " in ln and " ready: http=" in ln
                   for ln in log.splitlines()), log[-3000:]
    # "serving" is said once the P/D pair can serve, not when the port opens
    assert log.index("listening at") < log.index(
        f"serving the OpenAI API at http://127.0.0.1:{port}/v1 (pid ")
    assert "prefill/decode: 1 P + 1 D" in log[log.index("serving the OpenAI API"):]
    # an access line per request; stats lines (every second here) from the proxy and each
    # worker while the requests ran, then one saying they went idle
    assert re.search(r'127\.0\.0\.1:\d+ "POST /v1/completions" 200 \d+\.\d+s id=cmpl-\S+ '
                     r'prompt=\d+ completion=4 ttft=', log), log[-3000:]
    deadline = time.monotonic() + 10
    want = ("proxy: Avg prompt throughput", "Running: 0 reqs, Waiting: 0 reqs, usable workers: "
            "1 P, 1 D")

    def worker_line(role: str) -> bool:
        return any(ln.startswith(f"{role}-") and "Avg prompt throughput" in ln
                   and "KV cache usage" in ln for ln in log.splitlines())

    # the workers' lines reach this log through the proxy's echo, possibly after its own
    while not (all(w in log for w in want) and worker_line("prefill")
               and worker_line("decode")) and time.monotonic() < deadline:
        time.sleep(0.5)
        log = (procs.tmp / "proxy.log").read_text()
    assert all(w in log for w in want), log[-3000:]
    for role in ("prefill", "decode"):
        assert worker_line(role), log[-3000:]


def test_a_local_cluster_never_serves_another_clusters_workers(procs: Procs, tmp_path) -> None:
    """Another cluster's worker (a fake, its own token) holds our prefill worker's ports:
    `pdserve serve` exits 1 with one line saying so, instead of serving the foreign worker
    as its own (it used to: the foreign /health said 200)."""
    import os
    import subprocess
    import sys

    base = free_port_block(6)
    env = {**procs.env, "PDSERVE_INTERNAL_TOKEN": "another-clusters-token-0123456789"}
    foreign = subprocess.Popen([sys.executable, "bench/fake_worker.py", "--role", "prefill",
                                "--port", str(base)], env=env, cwd=Path(__file__).parents[2],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:  # the foreign worker is up
            try:
                if httpx.get(f"http://127.0.0.1:{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end and foreign.poll() is None
            time.sleep(0.1)
        own_env = {k: v for k, v in procs.env.items() if k != "PDSERVE_INTERNAL_TOKEN"}
        serve = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--port",
                                  str(free_port_block(1)), "--worker-base-port", str(base)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**own_env, "TMPDIR": str(tmp_path)},
                                 start_new_session=True)
        try:
            _, stderr = serve.communicate(timeout=90)
        finally:  # if it hangs (serving the foreign worker), its workers go with it
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(10)
    finally:
        foreign.terminate()
        foreign.wait(10)
    assert serve.returncode == 1
    errors = [ln for ln in stderr.splitlines() if ln.startswith("pdserve serve: error:")]
    assert len(errors) == 1 and f"port {base} is held by another process" in errors[0], \
        stderr[-2000:]
    assert "serving the OpenAI API" not in stderr


def test_chat_template_from_the_command_line(procs: Procs, tmp_path) -> None:
    """--chat-template (vLLM's flag) as inline Jinja replaces the tokenizer's own: /tokenize
    of a conversation gives the ids of the custom rendering; a value that is neither a file
    nor a template is one error line, before anything starts."""
    import subprocess
    import sys

    from pdserve.engine.builtin_model import builtin_model_path
    from pdserve.engine.tokenizer import load_tokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    url, _ = start_cluster(procs, "--chat-template", template)
    msgs = [{"role": "user", "content": "hello there"}]
    r = httpx.post(url + "/tokenize", json={"messages": msgs, "add_generation_prompt": False},
                   timeout=10)
    assert r.status_code == 200, r.text
    tok = load_tokenizer(builtin_model_path(Path(procs.env["PDSERVE_CACHE_DIR"])))
    assert r.json()["tokens"] == tok.encode("[user] hello there\n", add_special_tokens=False)
    bad = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--chat-template",
                          str(tmp_path / "missing.jinja"), "--port", str(free_port_block(1))],
                         capture_output=True, text=True, env=procs.env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "pdserve serve: error: --chat-template ") and "no such file" in bad.stderr
    assert "started local" not in bad.stderr


def test_a_proxy_whose_decode_worker_never_answers_says_503_at_once(procs: Procs) -> None:
    """--decode (and --prefill) URLs nothing listens on: a request gets 503 at once with
    what the proxy can serve ("nothing: ..."), and the log says why; it used to hang 41 s.
    (A cluster that served before waits a little for a restarting worker: test_faults.)"""
    dead = [f"http://127.0.0.1:{free_port_block(2)}" for _ in range(2)]
    port = free_port_block(1)
    procs.start("proxy", "-m", "pdserve", "serve", "--prefill", dead[0], "--decode", dead[1],
                "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:  # the port is open (its /health answers 503: nothing is usable)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 503:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, procs.log("proxy")
        time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"prompt": [5, 6, 7], "max_tokens": 2})
    took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert "no worker can serve yet (nothing: no decode or both-role worker is usable)" in \
        r.json()["error"]["message"]
    assert took < 3, took
    assert "503: no worker can serve yet" in procs.log("proxy")


def test_default_worker_ports_skip_ports_another_process_holds(procs: Procs) -> None:
    """With no --worker-base-port the local cluster takes the first block of free ports from
    8100 up (printed), so ports someone else holds there are skipped, not fought over."""
    held = []
    for p in (8100, 8101, 8102):  # held here, or already by someone else: skipped either way
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        except OSError:
            s.close()
    try:
        port = free_port_block(1)
        procs.start("proxy", "-m", "pdserve", "serve", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(procs, url, "proxy", serves="prefill/decode")
        assert completion(url)["usage"]["completion_tokens"] == 4
    finally:
        for s in held:
            s.close()
    log = (procs.tmp / "proxy.log").read_text()
    m = re.search(r"local workers on ports (\d+)-(\d+)", log)
    assert m, log[-2000:]
    first, last = int(m.group(1)), int(m.group(2))
    assert first >= 8103 and last - first == 5
    assert f"started local prefill worker on port {first} " in log
