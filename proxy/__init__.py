"""OpenAI-compatible routing proxy (`pdserve serve`).

Owns the OpenAI protocol: templates, tokenization, detokenization, stop strings, usage and
error shapes; picks a decode worker (D) then a prefill worker (P) per request. It runs no
engine and imports no torch (the layer contracts in pyproject.toml hold it to that).

    from pdserve.proxy import create_app
    app = create_app(backend, api_keys=["sk-..."])   # any Backend; serve with uvicorn

Modules: `backend` (the seam: GenerationRequest, ChoiceDelta, Backend), `cluster_backend`,
`registry` and `workers` (P/D routing over the data path), `app` (routes), `fast_path`
(the generation routes in front of the framework), `protocol`
(request models), `serving` (one request's deltas -> text updates), `detokenizer`,
`tokenization`, `formatting`, `streaming`, `errors`, `auth`, `middleware`, `metrics`. Names
load lazily so importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "Backend", "BackendError", "ChoiceDelta", "GenerationRequest"]

if TYPE_CHECKING:
    from pdserve.proxy.app import create_app
    from pdserve.proxy.backend import Backend, BackendError, ChoiceDelta, GenerationRequest

_WHERE = {"create_app": "app", "Backend": "backend", "BackendError": "backend",
          "ChoiceDelta": "backend", "GenerationRequest": "backend"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"pdserve.proxy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pdserve.proxy' has no attribute {name!r}")
