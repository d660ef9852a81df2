"""A fake OpenAI streaming server with known delays, for testing the load generator.

A bare asyncio HTTP/1.1 server (keep-alive, chunked SSE) in its own process (so it never
waits for the client's GIL), adding only loopback and timer precision. Every completion
streams `num_tokens` tokens: the first `first_delay` s after the request arrived, then one
every `itl` s (scheduled on absolute times, so no drift), then a usage chunk and
`data: [DONE]`. GET /debug/log returns every request's body and the server's own clock
readings (arrival, each token chunk's write), so tests compare the client's figures with
what the server really did, not only with the nominal delays (a loaded machine may
oversleep). Failures are by arrival order: every `fail_every`-th request gets HTTP 500;
every `break_every`-th streams one token, then an error event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import httpx


@dataclass
class FakeOpenAI:
    first_delay: float = 0.05
    itl: float = 0.02
    num_tokens: int = 6
    fail_every: int = 0
    break_every: int = 0
    model: str = "fake-model"

    def __post_init__(self) -> None:
        self.port = 0
        self.num_requests = 0
        self.log: list[dict[str, Any]] = []  # in the server process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAI:
        args = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.bench.fake_openai", *args],
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.port = int(self._proc.stdout.readline())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.terminate()
        self._proc.wait(10)

    def requests(self) -> list[dict[str, Any]]:
        """[{body, arrived, sent: [time of each token chunk]}] in arrival order (seconds)."""
        return httpx.get(self.url + "/debug/log", timeout=10).json()

    async def serve(self) -> None:
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode().split("\r\n")
                method, path, _ = line.split(" ", 2)
                length = next((int(h.split(":", 1)[1]) for h in headers
                               if h.lower().startswith("content-length:")), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self._handle(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    async def _handle(self, method: str, path: str, body: dict, writer: asyncio.StreamWriter) \
            -> None:
        if method == "GET" and path == "/debug/log":
            await self._json(writer, 200, self.log)
            return
        if method == "GET" and path == "/v1/models":
            await self._json(writer, 200, {"object": "list", "data": [{"id": self.model}]})
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            await self._json(writer, 404, {"error": {"message": "not found"}})
            return
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        self.num_requests += 1
        k = self.num_requests
        entry: dict[str, Any] = {"body": body, "arrived": arrived, "sent": []}
        self.log.append(entry)
        if self.fail_every and k % self.fail_every == 0:
            await self._json(writer, 500, {"error": {"message": "injected failure"}})
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        chat = path.endswith("chat/completions")

        def event(obj: Any) -> bytes:
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        if chat:  # the role announcement carries no output and must not count as TTFT
            writer.write(event({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": ""}}]}))
        broken = bool(self.break_every and k % self.break_every == 0)
        for i in range(self.num_tokens):
            await asyncio.sleep(max(0.0, arrived + self.first_delay + i * self.itl - loop.time()))
            choice: dict[str, Any] = ({"index": 0, "delta": {"content": f" w{i}"}} if chat
                                      else {"index": 0, "text": f" w{i}"})
            choice["finish_reason"] = "length" if i == self.num_tokens - 1 else None
            writer.write(event({"choices": [choice]}))
            entry["sent"].append(loop.time())
            await writer.drain()
            if broken:
                writer.write(event({"error": {"message": "injected mid-stream failure"}}))
                break
        if not broken:
            writer.write(event({"choices": [], "usage": {
                "prompt_tokens": len(body.get("prompt") or []) or 7,
                "completion_tokens": self.num_tokens,
                "total_tokens": self.num_tokens + 7}}))
        writer.write(event("[DONE]") + b"0\r\n\r\n")
        await writer.drain()


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in asdict(FakeOpenAI()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    asyncio.run(FakeOpenAI(**vars(p.parse_args())).serve())


if __name__ == "__main__":
    main()
