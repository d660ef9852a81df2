"""Lean clients for bench/proxy_overhead.py: cheap enough that the proxy, not the client,
is what gets measured (httpx costs ~100 µs of client CPU per streamed token; this ~10).

- `RawProbe` (`raw_probe`: n at once): sequential streamed requests over one keep-alive
  socket (TCP_NODELAY), TTFT and e2e per request, no HTTP library; token-id completions, or
  a short chat turn (text the proxy templates and tokenizes).
- `stream_many` (also `python bench/raw_client.py stream ...`, one process per call): many
  concurrent keep-alive connections on asyncio streams, each sending requests one after
  another; counts output tokens from each response's usage chunk, and the gaps between
  reads that brought output. Prints one JSON line.
- `FakeDirect` (`fake_floor`: n at once): what a fake engine alone adds to its configured
  first-token delay, seen from a ZMQ DEALER (the proxy's side of the data path) with no
  proxy in between.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time

import numpy as np

_USAGE = re.compile(rb'"completion_tokens": ?(\d+)')
_EMPTY = b'"text":""'  # the proxy's compact JSON (spaces are taken out before matching)
_TEXT = b'"text":"'


_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
# a short chat turn (the proxy templates and tokenizes it: the path text clients take)
CHAT_TEXT = "Write a haiku about the sea at night, please."


def _request(host: str, body: bytes, path: str = "/v1/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _chat_body(model: str, output_len: int) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": CHAT_TEXT}],
                       "max_tokens": output_len, "stream": True, "ignore_eos": True}).encode()


def _body(rng: np.random.Generator, input_len: int, output_len: int, usage: bool) -> bytes:
    body = {"prompt": rng.integers(5, 4000, input_len).tolist(), "max_tokens": output_len,
            "stream": True, "ignore_eos": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _has_output(data: bytes) -> bool:
    data = data.replace(b'"text": "', _TEXT).replace(b'"content": "', _CONTENT)
    return _TEXT in data.replace(_EMPTY, b"") or _CONTENT in data.replace(_EMPTY_CONTENT, b"")


class RawProbe:
    """Sequential streamed requests over one keep-alive socket (TCP_NODELAY)."""

    def __init__(self, url: str, input_len: int, output_len: int, seed: int = 1,
                 chat_model: str | None = None):
        """`chat_model`: send the short chat turn CHAT_TEXT to /v1/chat/completions with
        this model name instead of `input_len` random token ids to /v1/completions."""
        self.chat_model = chat_model
        self.host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((self.host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rng = np.random.default_rng(seed)
        self.input_len, self.output_len = input_len, output_len

    def one(self) -> tuple[float, float]:
        """(ttft, e2e) in seconds of one request."""
        sock = self.sock
        req = _request(self.host, _body(self.rng, self.input_len, self.output_len, usage=False)) \
            if self.chat_model is None else \
            _request(self.host, _chat_body(self.chat_model, self.output_len),
                     "/v1/chat/completions")
        t0 = time.perf_counter()
        sock.sendall(req)
        buf, ttft = b"", None
        while b"data: [DONE]" not in buf:
            data = sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the proxy closed the connection")
            if ttft is None and _has_output(data):
                ttft = time.perf_counter() - t0
            buf += data
        e2e = time.perf_counter() - t0
        while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's terminator
            buf += sock.recv(1 << 16)
        return ttft or e2e, e2e

    def close(self) -> None:
        self.sock.close()


def raw_probe(url: str, num: int, input_len: int, output_len: int, seed: int = 1) \
        -> list[tuple[float, float]]:
    """(ttft, e2e) in seconds of `num` sequential streamed requests on one connection."""
    probe = RawProbe(url, input_len, output_len, seed)
    try:
        return [probe.one() for _ in range(num)]
    finally:
        probe.close()


async def _stream_conn(host: str, port: int, num: int, input_len: int, output_len: int,
                       seed: int, res: dict) -> None:
    rng = np.random.default_rng(seed)
    try:
        reader, writer = await asyncio.open_connection(host, port)  # asyncio: TCP_NODELAY
    except OSError:
        res["failed"] += num
        return
    for _ in range(num):
        writer.write(_request(host, _body(rng, input_len, output_len, usage=True)))
        res["starts"].append(time.time())
        buf, last = b"", None
        while not buf.endswith(b"0\r\n\r\n"):
            data = await reader.read(1 << 16)
            if not data:
                res["failed"] += 1
                return
            if _has_output(data):
                now = time.perf_counter()
                if last is not None:
                    res["gaps"].append(now - last)
                last = now
            buf += data
        m = _USAGE.search(buf)
        if m is None or b"data: [DONE]" not in buf:
            res["failed"] += 1
            continue
        res["tokens"] += int(m.group(1))
        flat = buf.replace(b'"text": "', _TEXT)
        res["events"] += flat.count(_TEXT) - flat.count(_EMPTY)  # SSE events that carry text
        res["ends"].append(time.time())
    writer.close()


async def stream_many(url: str, conns: int, per_conn: int, input_len: int, output_len: int,
                      seed: int = 0) -> dict:
    host, port = url.removeprefix("http://").split(":")
    res: dict = {"tokens": 0, "events": 0, "failed": 0, "starts": [], "ends": [], "gaps": []}
    await asyncio.gather(*(_stream_conn(host, int(port), per_conn, input_len, output_len,
                                        seed * 100_003 + i, res) for i in range(conns)))
    gaps = np.asarray(res.pop("gaps") or [np.nan]) * 1e3
    res["itl_p50_ms"], res["itl_p99_ms"] = np.percentile(gaps, 50), np.percentile(gaps, 99)
    res["num_gaps"] = int(gaps.size)
    return res


class FakeDirect:
    """A fake engine straight from a ZMQ DEALER (the proxy's side of the data path):
    Generate to a both-role fake, or Prefill (no D) to a prefill fake."""

    def __init__(self, data_address: str, output_len: int, token: str = "", role: str = "both"):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(data_address)
        self.output_len, self.token, self.role, self.n = output_len, token, role, 0

    def one(self) -> float:
        """The first-token time (s) of one request."""
        from pdserve.common.params import SamplingParams
        from pdserve.common.wire import DATA_PATH, Generate, Prefill, RequestRecord

        self.n += 1
        rec = RequestRecord(f"floor-{self.n}", [5] * 16,
                            SamplingParams(max_tokens=self.output_len, seed=self.n))
        msg = Generate(rec=rec, t=self.token) if self.role == "both" else \
            Prefill(rec=rec, kv=None, t=self.token)
        t0 = time.perf_counter()
        self.sock.send(DATA_PATH.encode(msg))
        DATA_PATH.decode(self.sock.recv())
        ttft = time.perf_counter() - t0
        # the rest of the stream; a prefill fake follows its First with a Transfer
        for _ in range(self.output_len - 1 if self.role == "both" else 1):
            DATA_PATH.decode(self.sock.recv())
        return ttft

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def fake_floor(data_address: str, num: int, output_len: int, token: str = "") -> list[float]:
    """First-token times (s) of a both-role fake seen straight from a ZMQ DEALER; `token`:
    the fake's internal token."""
    direct = FakeDirect(data_address, output_len, token)
    try:
        return [direct.one() for _ in range(num)]
    finally:
        direct.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("stream",))
    p.add_argument("--url", required=True)
    p.add_argument("--conns", type=int, default=128)
    p.add_argument("--per-conn", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    res = asyncio.run(stream_many(a.url, a.conns, a.per_conn, a.input_len, a.output_len, a.seed))
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
