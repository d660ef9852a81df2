"""OpenAI-compatible routing proxy (`pdserve serve`).

Owns the OpenAI protocol: templates, tokenization, detokenization, stop strings, usage and
error shapes; picks a decode worker (D) then a prefill worker (P) per request.

    from pdserve.proxy import create_app, LocalBackend
    backend = LocalBackend(EngineConfig(device="cpu"))
    app = create_app(backend, api_keys=["sk-..."])   # serve with uvicorn; backend.close() after

Modules: `backend` (the seam: GenerationRequest, ChoiceDelta, Backend), `local_backend` (an
LLMEngine in a thread), `app` (routes), `protocol` (request models), `serving` (one request's
deltas -> text updates), `detokenizer`, `tokenization`, `formatting`, `streaming`, `errors`,
`auth`, `middleware`. Names load lazily so importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "Backend", "BackendError", "ChoiceDelta", "GenerationRequest",
           "LocalBackend"]

if TYPE_CHECKING:
    from pdserve.proxy.app import create_app
    from pdserve.proxy.backend import Backend, BackendError, ChoiceDelta, GenerationRequest
    from pdserve.proxy.local_backend import LocalBackend

_WHERE = {"create_app": "app", "Backend": "backend", "BackendError": "backend",
          "ChoiceDelta": "backend", "GenerationRequest": "backend",
          "LocalBackend": "local_backend"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"pdserve.proxy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pdserve.proxy' has no attribute {name!r}")
