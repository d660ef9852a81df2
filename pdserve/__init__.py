"""pdserve: disaggregated prefill/decode LLM serving.

`from pdserve import LLM, SamplingParams` gives the offline API. Heavy modules (torch, the
engine) load on first use so `pdserve --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.common import __version__

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from pdserve.common.params import SamplingParams
    from pdserve.engine.llm import LLM, CompletionOutput, RequestOutput


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from pdserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from pdserve.common.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
