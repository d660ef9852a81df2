"""P and D as separate processes on the built-in model (CPU): outputs equal the offline LLM
token for token over shm and tcp, under forced preemption and forced transfer failure;
aborts leak nothing; bad input gets an error reply and the workers keep serving."""

from __future__ import annotations

import asyncio
import random
import re
import time

import httpx
import msgspec
import pytest
import zmq

from pdserve import LLM, SamplingParams
from pdserve.common.wire import DATA_PATH, Error, RequestRecord
from pdserve.proxy.workers import WorkerError, WorkerLink, run_both, run_pd  # noqa: F401 (see fixture)
from tests.workers.cluster import TOKEN, start_worker, stop_workers, wait_healthy

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    env = {"PDSERVE_CACHE_DIR": str(tmp / "cache")}
    ws = {
        "P": start_worker("prefill", tmp, env=env),
        "D": start_worker("decode", tmp, env=env),
        "Dtcp": start_worker("decode", tmp, "--kv-transports", "tcp", env=env),
        "Dsmall": start_worker("decode", tmp, "--num-gpu-blocks-override", "40", env=env),
        "Dnone": start_worker("decode", tmp, env={**env, "PDSERVE_KV_TRANSPORTS": ""}),
        "both": start_worker("both", tmp, env=env),
        "both2": start_worker("both", tmp, env=env),
    }
    try:
        wait_healthy(list(ws.values()))
        yield ws
    finally:
        stop_workers(ws.values())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cluster):
    """The offline engine on the same built-in model (the workers' cache dir)."""
    import os

    os.environ["PDSERVE_CACHE_DIR"] = str(cluster["P"].log.parent / "cache")
    return LLM(None, use_tqdm_on_load=False, max_model_len=512, num_gpu_blocks_override=400)


def workload(n: int = 64, seed: int = 0):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        prompt = [rng.randrange(5, 4096) for _ in range(rng.randrange(3, 90))]
        kind = i % 4
        if kind == 0:
            sp = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 30), seed=i)
        elif kind == 1:
            sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=i, n=2)
        elif kind == 2:
            sp = SamplingParams(temperature=1.0, top_k=50, max_tokens=25, seed=i,
                                ignore_eos=True, logprobs=2)
        else:
            sp = SamplingParams(temperature=0.7, max_tokens=rng.randrange(1, 4), seed=i,
                                repetition_penalty=1.2)
        recs.append(RequestRecord(f"req-{seed}-{i}", prompt, sp))
    return recs


def expected(llm, recs):
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in recs],
                        [r.params for r in recs], use_tqdm=False)
    return {(r.request_id, c.index): (c.token_ids, c.finish_reason)
            for r, o in zip(recs, outs) for c in o.outputs}


async def collect(recs, p, d, token=TOKEN, both=False, abort_some=False, early=False,
                  abort_after=2):
    """Every request's tokens. `early`: P starts with D's reported KV address, before D's
    Reserved (as the proxy does), so offers may overtake their reservations. `abort_some`:
    every third request is closed after its `abort_after`-th batch (1: right after P's first
    token, before the Join to D has gone out)."""
    links = {}
    d_kv = d.get("/info").json()["kv_address"] if early else None

    def link(w):
        if w.data not in links:
            links[w.data] = WorkerLink(w.data, token)
        return links[w.data]

    got: dict = {}

    async def one(rec, i):
        gen = run_both(rec, link(d)) if both else run_pd(rec, link(p), link(d), d_kv=d_kv)
        n = 0
        async for rows in gen:
            for r in rows:
                toks, _ = got.setdefault((rec.request_id, r.choice_index), ([], None))
                toks.append(r.token_id)
                got[(rec.request_id, r.choice_index)] = (toks, r.finish_reason)
            n += 1
            if abort_some and i % 3 == 0 and n == abort_after:
                await gen.aclose()
                return

    try:
        await asyncio.wait_for(asyncio.gather(*(one(r, i) for i, r in enumerate(recs))), 300)
    finally:
        for lk in links.values():
            await lk.close()
    return got


@pytest.mark.parametrize("d_name, early", [("D", True), ("Dtcp", False), ("Dsmall", True),
                                            ("Dsmall", False), ("Dnone", True),
                                            ("both", False)],
                         ids=["shm", "tcp-after-reserved", "preemption",
                              "preemption-after-reserved", "transfer-failure", "both-role"])
def test_64_concurrent_requests_equal_offline(cluster, reference, d_name, early):
    recs = workload(64, seed=hash(d_name) % 1000)
    want = expected(reference, recs)
    got = asyncio.run(collect(recs, cluster["P"], cluster[d_name], both=d_name == "both",
                              early=early))
    assert got == want
    d = cluster[d_name]
    load = d.load()
    # measured step costs for the proxy's placement: D decoded (a both-role worker also
    # prefilled), P prefilled
    assert load["decode_step_ms"] > 0 and load["decode_batch"] >= 1
    if d_name == "both":
        assert load["prefill_tokens_per_s"] > 0
    assert cluster["P"].load()["prefill_tokens_per_s"] > 0
    assert load["pending_prefill_tokens"] == 0  # nothing left to compute
    assert load["num_requests_decoding"] == load["num_requests_running"] == 0
    if d_name == "Dsmall":
        assert load["num_preemptions"] > 0
    if d_name == "Dsmall" and early:  # offers came while D had no room to reserve yet
        assert 'kv_transfer_early_offers_total{outcome="matched"}' in d.get("/metrics").text
    if d_name == "Dnone":
        assert load["kv_transfer_fallbacks"] > 0
    if d_name in ("D", "Dtcp"):
        assert load["kv_transfer_fallbacks"] == 0
        assert set(load["kv_transports"].values()) == {"shm" if d_name == "D" else "tcp"}


def test_two_both_role_workers_act_as_p_and_d_for_each_other_in_one_run(cluster, reference):
    """Flexible roles (issue 21): in one concurrent run, each both-role worker prefills some
    prompts for the other (Prefill with the other's KV address; the other reserves, takes the
    KV and decodes), decodes others the other prefilled, and serves others whole; every
    output equals the offline engine's, and afterwards both hold no blocks."""
    a, b = cluster["both"], cluster["both2"]
    recs = workload(48, seed=21)
    want = expected(reference, recs)
    links: dict = {}

    def link(w):
        if w.data not in links:
            links[w.data] = WorkerLink(w.data, TOKEN)
        return links[w.data]

    kv = {w.data: w.get("/info").json()["kv_address"] for w in (a, b)}
    assert all(w.get("/info").json()["acts_as_prefill"] for w in (a, b))
    routes = [(a, b), (b, a), (a, None), (b, None)]  # (prefills, decodes); None: whole
    got: dict = {}

    async def one(rec, i):
        p, d = routes[i % 4]
        gen = run_both(rec, link(p)) if d is None else \
            run_pd(rec, link(p), link(d), d_kv=kv[d.data] if i % 8 < 4 else None)
        async for rows in gen:
            for r in rows:
                toks, _ = got.setdefault((rec.request_id, r.choice_index), ([], None))
                toks.append(r.token_id)
                got[(rec.request_id, r.choice_index)] = (toks, r.finish_reason)

    async def run():
        try:
            await asyncio.wait_for(asyncio.gather(*(one(r, i) for i, r in enumerate(recs))), 300)
        finally:
            for lk in links.values():
                await lk.close()

    asyncio.run(run())
    assert got == want
    for w in (a, b):  # each prefilled for the other and handed the KV over
        m = re.search(r'pdserve_requests_total\{finish_reason="transferred",role="both"\} (\S+)|'
                      r'pdserve_requests_total\{role="both",finish_reason="transferred"\} (\S+)',
                      w.get("/metrics").text)
        assert m and float(m.group(1) or m.group(2)) >= 6, m
    for w in (a, b):  # nothing held: no blocks awaiting a transfer, reserved or in use
        end = time.monotonic() + 10
        while True:
            load = w.load()
            idle = (load["blocks_awaiting_transfer"], load["num_reserved_blocks"],
                    load["num_requests_running"], load["num_free_blocks"]) == (0, 0, 0, 400)
            if idle or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert idle and load["kv_transfer_fallbacks"] == 0, load


@pytest.mark.parametrize("abort_after", [1, 2])
def test_aborts_while_a_both_role_worker_prefills_for_another_leak_nothing(cluster, reference,
                                                                            abort_after):
    """Every third request closed right after its first token (1: before the Join to D went
    out, while the both-role P may still hold or be offering the blocks) or after its
    second batch, in both directions between the two both-role workers: both end with
    every block free, no reservation, nothing awaiting a transfer, and serve on."""
    a, b = cluster["both"], cluster["both2"]
    for p, d in ((a, b), (b, a)):
        recs = workload(24, seed=40 + abort_after)
        recs = [RequestRecord(f"{r.request_id}-{p.port}", r.prompt_token_ids, r.params)
                for r in recs]
        asyncio.run(collect(recs, p, d, abort_some=True, abort_after=abort_after,
                            early=True))
    for w in (a, b):
        end = time.monotonic() + 15
        while True:
            load = w.load()
            idle = (load["blocks_awaiting_transfer"], load["num_reserved_blocks"],
                    load["num_requests_running"], load["num_requests_waiting"],
                    load["num_free_blocks"]) == (0, 0, 0, 0, 400)
            if idle or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert idle, load
    # and they serve on, P/D between them, as the offline engine does
    recs = workload(4, seed=77 + abort_after)
    assert asyncio.run(collect(recs, a, b)) == expected(reference, recs)


def pools_idle(cluster) -> bool:
    p, loads = cluster["P"].load(), {k: cluster[k].load() for k in ("D", "Dtcp")}
    return (p["blocks_awaiting_transfer"] == 0 and p["num_requests_running"] == 0
            and p["num_requests_waiting"] == 0
            and all(v["num_free_blocks"] == 400 and v["num_reserved_blocks"] == 0
                    and v["num_requests_running"] == 0 and v["num_requests_waiting"] == 0
                    for v in loads.values()))


def test_burst_with_random_aborts_leaves_pools_free(cluster):
    from tests.kv_transfer.harness import wait_for

    recs = workload(48, seed=77)
    for d_name, after in (("D", 2), ("Dtcp", 2), ("D", 1)):
        asyncio.run(collect(recs, cluster["P"], cluster[d_name], abort_some=True,
                            early=d_name == "D", abort_after=after))
        recs = workload(48, seed=78 + after)
    # P's prefix cache keeps freed blocks evictable: they count as free
    wait_for(lambda: pools_idle(cluster), timeout=30, interval=0.3)


def raw_call(worker, frames, token=TOKEN, timeout_ms=5000):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.connect(worker.data)
    try:
        s.send(frames)
        return DATA_PATH.decode(s.recv())
    finally:
        s.close()


def rec_wire(**over):
    rec = msgspec.to_builtins(RequestRecord("bad-1", [5, 6, 7], SamplingParams(max_tokens=3,
                                                                              seed=1)))
    rec.update(over)
    return rec


def raw_frame(kind: str, token: str, **fields) -> bytes:
    """A data-path frame built by hand, so it can carry what a typed message cannot."""
    return msgspec.msgpack.encode({"k": kind, "t": token, **fields})


@pytest.mark.parametrize("worker, frame, needle", [
    ("D", raw_frame("abort", TOKEN, rid="nope"), "unknown request id"),
    ("P", raw_frame("abort", TOKEN, rid="nope"), "unknown request id"),
    ("D", raw_frame("join", TOKEN, rid="nope", first=[]), "unknown request id"),
    ("D", b"\xc1\x00garbage", "not a msgpack"),
    ("P", msgspec.msgpack.encode({"k": "bogus"}), "unknown message kind"),
    ("P", raw_frame("prefill", TOKEN, rec=rec_wire(prompt_token_ids=[5, 10**7]), kv=None),
     "vocabulary"),
    ("D", raw_frame("reserve", TOKEN, rec=rec_wire(prompt_token_ids=[5] * 600)), "max_model_len"),
    ("both", raw_frame("generate", TOKEN, rec=rec_wire(params={"top_p": 3})), "top_p"),
    ("D", raw_frame("reserve", "wrong", rec=rec_wire()), "wrong internal token"),
    ("P", raw_frame("reserve", TOKEN, rec=rec_wire()), "does not take reserve"),
    ("D", raw_frame("join", TOKEN, rid="x", first=[["x", 0, "nine", None, None]]),
     "join: Expected `int`, got `str` - at `$.first[0][2]`"),
    ("P", raw_frame("prefill", TOKEN, rec=rec_wire(params={"seed": None}), kv=None),
     "seed must be set"),
])
def test_bad_input_on_the_data_path_gets_an_error_reply(cluster, worker, frame, needle):
    reply = raw_call(cluster[worker], frame)
    assert isinstance(reply, Error) and needle in reply.reason
    # and the worker keeps serving
    assert cluster[worker].get("/health").status_code == 200


def test_workers_keep_serving_after_bad_input(cluster, reference):
    recs = workload(4, seed=5)
    got = asyncio.run(collect(recs, cluster["P"], cluster["D"]))
    assert got == expected(reference, recs)


def test_ops_http(cluster):
    d = cluster["D"]
    assert httpx.get(d.http + "/load").status_code == 401  # internal token required
    assert d.get("/load", headers={"authorization": "Bearer wrong"}).status_code == 401
    r = d.get("/load", headers={"endpoint-load-metrics-format": "TEXT"})
    assert r.status_code == 200
    assert r.headers["endpoint-load-metrics"].startswith(
        "TEXT named_metrics.kv_cache_usage_perc=")
    r = d.get("/health", headers={"endpoint-load-metrics-format": "json"})
    assert r.headers["endpoint-load-metrics"].startswith('JSON {"named_metrics": {')
    assert "endpoint-load-metrics" not in d.get("/health").headers
    info = d.get("/info").json()
    assert info["role"] == "decode" and info["compat"]["block_size"] == 16
    assert info["compat"] == cluster["P"].get("/info").json()["compat"] | {
        "max_model_len": info["compat"]["max_model_len"]}
    metrics = httpx.get(d.http + "/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "kv_transfer_transfers_total",
                 "pdserve_inter_token_latency_seconds_bucket", "kv_transfer_fallback_total"):
        assert name in metrics, name
    assert "pdserve_time_to_first_token_seconds_bucket" in httpx.get(
        cluster["P"].http + "/metrics").text


def _wrong(value):
    """A value of another type than `value`."""
    if isinstance(value, bool) or value is None:
        return "yes"
    if isinstance(value, int | float):
        return "seven"
    if isinstance(value, str):
        return 12345
    return {"not": "this"} if isinstance(value, list) else "not a map"


def _fields(kind: str) -> list[tuple[str, dict]]:
    """(field path, frame fields) for every field of a valid `kind` message, that field made
    the wrong type; record fields too (rec.*, rec.params.*)."""
    rec = rec_wire(params={"max_tokens": 3, "seed": 1, "temperature": 0.5})
    valid = {"reserve": {"rec": rec, "timeout": 5.0},
             "join": {"rid": "bad-1", "first": [["bad-1", 0, 5, None, None]]},
             "prefill": {"rec": rec, "kv": "tcp://127.0.0.1:1"},
             "generate": {"rec": rec}, "abort": {"rid": "bad-1"}}[kind]
    out = []
    for name, value in valid.items():
        out.append((name, {**valid, name: _wrong(value)}))
        if name == "rec":
            for f, v in value.items():
                bad = 12345 if f == "cache_salt" else _wrong(v)  # None, but a str|None field
                out.append((f"rec.{f}", {**valid, "rec": {**value, f: bad}}))
            for f, v in value["params"].items():
                bad = {**value, "params": {**value["params"], f: _wrong(v)}}
                out.append((f"rec.params.{f}", {**valid, "rec": bad}))
    return out


@pytest.mark.parametrize("worker, kind", [
    ("D", "reserve"), ("D", "join"), ("D", "generate"), ("D", "abort"), ("P", "prefill"),
    ("P", "abort"), ("both", "generate"), ("both", "abort")])
def test_each_field_of_the_wrong_type_gets_an_error_and_the_worker_serves_on(cluster, worker,
                                                                            kind):
    """Well-formed frames with the valid token, one field of the wrong type at a time (the
    fault campaign killed workers with 5 of 7 of these): an Error naming the field."""
    for path, fields in _fields(kind):
        reply = raw_call(cluster[worker], raw_frame(kind, TOKEN, **fields))
        assert isinstance(reply, Error) and f"- at `$.{path}`" in reply.reason, (kind, path,
                                                                                reply)
    assert cluster[worker].get("/health").status_code == 200


def test_the_proxys_view_of_room_catches_up_without_a_step(cluster):
    """A proxy admits requests by the workers' load reports plus what it sent that no report
    acknowledged (proxy/registry.py has_room). A change no step reports must still reach it:
    here D frees aborted reservations on its transfer layer's CANCELLED events, idle."""
    from pdserve.common import wire
    from tests.kv_transfer.harness import wait_for

    async def main():
        d = WorkerLink(cluster["D"].data, TOKEN)
        try:
            rids = [f"view-{i}" for i in range(3)]
            queues = [d.subscribe(r) for r in rids]
            for rid in rids:
                d.send(wire.Reserve(rec=RequestRecord(rid, [7] * 40,
                                                      SamplingParams(max_tokens=4, seed=1))))
            assert d.unacked == 3  # sent, not yet acknowledged by a report
            for q in queues:
                assert isinstance(await asyncio.wait_for(q.get(), 10), wire.Reserved)
            await wait_for_async(lambda: d.unacked == 0
                                 and d.load.get("num_requests_waiting") == 3)
            for rid in rids:
                d.send(wire.Abort(rid=rid))  # D frees them on later CANCELLED events
            await wait_for_async(lambda: d.load.get("num_requests_waiting") == 0
                                 and d.load.get("num_requests_running") == 0)
            assert d.load["acked"] == 3 and d.in_flight() == (0, 0)
        finally:
            await d.close()

    async def wait_for_async(cond, timeout=10.0):
        end = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < end, "no load report caught up"
            await asyncio.sleep(0.02)

    asyncio.run(main())
    wait_for(lambda: cluster["D"].load()["num_reserved_blocks"] == 0, timeout=10, interval=0.2)


def test_a_full_worker_answers_busy_and_serves_on(cluster):
    """Past --max-queued-requests a worker refuses new requests with a retryable "busy"
    (the proxy re-queues them); nothing it refused is held, and its reports acknowledge them."""
    from pdserve.common import wire
    from tests.kv_transfer.harness import wait_for
    from tests.workers.cluster import start_worker

    tmp = cluster["P"].log.parent
    p = start_worker("prefill", tmp, "--max-queued-requests", "1",
                     env={"PDSERVE_CACHE_DIR": str(tmp / "cache")})
    try:
        wait_healthy([p])

        async def main():
            link = WorkerLink(p.data, TOKEN)
            try:
                rids = [f"full-{i}" for i in range(6)]
                queues = {r: link.subscribe(r) for r in rids}
                for i, rid in enumerate(rids):  # one burst: P takes them in before a step
                    link.send(wire.Prefill(rec=RequestRecord(
                        rid, [5 + i] * 200, SamplingParams(max_tokens=1, seed=i)), kv=None))
                answers = {r: await asyncio.wait_for(q.get(), 30) for r, q in queues.items()}
                end = asyncio.get_running_loop().time() + 10
                while link.in_flight() != (0, 0):
                    assert asyncio.get_running_loop().time() < end, link.in_flight()
                    await asyncio.sleep(0.02)
                return answers
            finally:
                await link.close()

        answers = asyncio.run(main())
        busy = [m for m in answers.values() if isinstance(m, wire.Error)]
        assert busy and all(m.code == "busy" and m.retryable for m in busy)
        assert any(isinstance(m, wire.First) for m in answers.values())
        assert p.get("/health").status_code == 200
        wait_for(lambda: (lambda ld: ld["num_requests_waiting"] == ld["num_requests_running"]
                          == ld["blocks_awaiting_transfer"] == 0)(p.load()),
                 timeout=10, interval=0.2)
        assert 'pdserve_requests_rejected_total{role="prefill"}' in p.get("/metrics").text
    finally:
        p.stop()


def test_p_started_before_d_refuses_is_aborted_and_frees_its_blocks(cluster):
    """The proxy starts P with D's reported KV address before D's Reserved: when D then
    refuses the request (here: a D with a shorter max_model_len), the request fails with D's
    reason and P, which had already taken the prompt, frees everything it held."""
    from tests.workers.cluster import start_worker

    tmp = cluster["P"].log.parent
    d = start_worker("decode", tmp, "--max-model-len", "128",
                     env={"PDSERVE_CACHE_DIR": str(tmp / "cache")})
    p = cluster["P"]
    taken = 'pdserve_prompt_tokens_total{role="prefill"}'

    def p_prompt_tokens() -> float:
        m = re.search(re.escape(taken) + r" (\S+)", p.get("/metrics").text)
        return float(m.group(1)) if m else 0.0

    def p_idle() -> bool:
        ld = p.load()
        return ld["num_requests_waiting"] == ld["num_requests_running"] \
            == ld["blocks_awaiting_transfer"] == 0

    try:
        wait_healthy([d])
        before = p_prompt_tokens()

        async def main():
            lp, ld = WorkerLink(p.data, TOKEN), WorkerLink(d.data, TOKEN)
            try:
                rec = RequestRecord("too-long-for-d", list(range(5, 305)),
                                    SamplingParams(max_tokens=4, seed=1))
                gen = run_pd(rec, lp, ld, 60, d_kv=d.get("/info").json()["kv_address"])
                with pytest.raises(WorkerError, match="max_model_len"):
                    async for _ in gen:
                        pass
                # the links stay open (as the proxy's do) while P's Abort is on its way
                end = asyncio.get_running_loop().time() + 15
                while not (p_prompt_tokens() == before + 300 and p_idle()):
                    assert asyncio.get_running_loop().time() < end, p.load()
                    await asyncio.sleep(0.1)
            finally:
                await lp.close()
                await ld.close()

        asyncio.run(main())  # P took the prompt (300 tokens) and holds nothing of it
        assert d.load()["num_reserved_blocks"] == 0
    finally:
        d.stop()
