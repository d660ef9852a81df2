"""Proxy test set-up: one LocalBackend over the built-in model (CPU, fp32, one torch thread),
served by real uvicorn servers on 127.0.0.1 in background threads, and real clients (the
openai SDK, httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from pdserve.engine.config import EngineConfig
from pdserve.proxy import create_app
from tests.proxy.local_backend import LocalBackend

API_KEY = "sk-test-key"
MODEL = "pdserve-builtin-tiny"


def engine_config(**kwargs: Any) -> EngineConfig:
    kwargs.setdefault("num_gpu_blocks_override", 512)
    return EngineConfig(model=None, device="cpu", torch_threads=1, **kwargs)


@pytest.fixture(scope="session")
def proxy_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """PDSERVE_CACHE_DIR for the session's built-in model (read when an engine is built)."""
    path = tmp_path_factory.mktemp("pdserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDSERVE_CACHE_DIR", str(path))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.delenv("PDSERVE_API_KEY", raising=False)
        yield path


@pytest.fixture(scope="session")
def backend(proxy_cache_dir: Any) -> Iterator[LocalBackend]:
    b = LocalBackend(engine_config())
    yield b
    b.close()


@dataclass
class Served:
    """A uvicorn server in a thread: its base URL and its event loop (for task checks)."""

    url: str
    loop: asyncio.AbstractEventLoop
    server: uvicorn.Server

    def run_in_loop(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def num_tasks(self) -> int:
        """Tasks alive in the server's loop, not counting the probe itself."""
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return self.run_in_loop(count())


@contextlib.contextmanager
def serve(app: Any) -> Iterator[Served]:
    """Run `app` on 127.0.0.1 (a free port chosen by the OS) until the block ends."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),),
                              name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", loop, server)
    finally:
        server.should_exit = True
        thread.join(30)
        loop.close()


@pytest.fixture(scope="session")
def served(backend: LocalBackend) -> Iterator[Served]:
    with serve(create_app(backend, api_keys=[API_KEY, "sk-second-key"])) as s:
        yield s


@pytest.fixture(scope="session")
def client(served: Served) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def wait_until_idle(backend: LocalBackend, timeout: float = 15.0) -> dict[str, Any]:
    """Poll until the engine runs nothing and every KV block is free; the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        st = backend.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0 and st["num_active"] == 0 \
                and st["num_free_blocks"] == st["num_blocks"]:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy after {timeout} s: {st}")
        time.sleep(0.02)


def sse_events(response: httpx.Response) -> list[Any]:
    """The decoded `data:` events of a streamed response, `[DONE]` as the string."""
    import json

    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
