"""The request record and the data-path messages between the proxy and the workers.

The record is the one type that crosses every boundary and that failover re-submits
(DESIGN.md §1): request id, prompt ids, output ids so far, sampling params (seed always
set), choice index, deadline. Messages are msgpack maps with a kind `k`; each carries the
internal token `t` when one is configured. Worker -> proxy messages carry the worker's load
report where DESIGN.md says so (every D step frame, every P answer).

proxy -> D:    RESERVE {rec, timeout}  JOIN {rid, first: [[choice, token, logprobs]]}  ABORT {rid}
proxy -> P:    PREFILL {rec, kv}       ABORT {rid}
proxy -> both: GENERATE {rec}          ABORT {rid}
D -> proxy:    RESERVED {rid, kv}  REJECTED {rid, reason}  STEP {seq, load, out}
P -> proxy:    FIRST {rid, out, load}  TRANSFER {rid, ok, reason}
any -> proxy:  ERROR {rid?, reason}
`out` rows are [rid, choice, token, logprobs, finish_reason]; logprobs are
[[token, logprob, rank], ...] (sampled token first) or None.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pdserve.engine.sampler import Logprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.protocol import unpack_map

MAX_MESSAGE_BYTES = 16 << 20  # a 128k-token prompt is ~1 MiB of msgpack ints


class Msg(enum.StrEnum):
    RESERVE = "reserve"
    JOIN = "join"
    PREFILL = "prefill"
    GENERATE = "generate"
    ABORT = "abort"
    RESERVED = "reserved"
    REJECTED = "rejected"
    STEP = "step"
    FIRST = "first"
    TRANSFER = "transfer"
    ERROR = "error"


class WireError(ValueError):
    """A malformed data-path message; the text names the problem (and the rid if known)."""

    def __init__(self, message: str, rid: str | None = None):
        super().__init__(message)
        self.rid = rid


@dataclass
class RequestRecord:
    """See the module docstring. `choice_index` > 0 runs one choice of an n > 1 request
    alone (params.n == 1); `deadline` is seconds of wall-clock budget left when sent."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    choice_index: int = 0
    deadline: float | None = None

    def choice_indices(self) -> list[int]:
        if self.params.n > 1:
            return list(range(self.params.n))
        return [self.choice_index]

    def to_wire(self) -> dict[str, Any]:
        return {"rid": self.request_id, "prompt": self.prompt_token_ids,
                "params": dataclasses.asdict(self.params), "output": self.output_token_ids,
                "choice": self.choice_index, "deadline": self.deadline}

    @classmethod
    def from_wire(cls, d: Any) -> RequestRecord:
        """Parse and validate; raises WireError naming the bad field."""
        if not isinstance(d, dict) or not isinstance(d.get("rid"), str) or not d["rid"]:
            raise WireError("rec: missing request id")
        rid = d["rid"]
        for name in ("prompt", "output"):
            ids = d.get(name)
            if not isinstance(ids, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise WireError(f"rec.{name} must be a list of integers", rid)
        if not d["prompt"]:
            raise WireError("rec.prompt is empty", rid)
        if not isinstance(d.get("params"), dict):
            raise WireError("rec.params must be a map", rid)
        try:
            params = SamplingParams(**d["params"])
        except (TypeError, ValueError) as e:
            raise WireError(f"rec.params: {e}", rid) from e
        if params.seed is None:
            raise WireError("rec.params.seed must be set (the proxy draws one)", rid)
        choice = d.get("choice", 0)
        if not isinstance(choice, int) or choice < 0 or (choice and params.n != 1):
            raise WireError("rec.choice must be >= 0, and 0 when n > 1", rid)
        deadline = d.get("deadline")
        if deadline is not None and not isinstance(deadline, int | float):
            raise WireError("rec.deadline must be a number", rid)
        return cls(rid, list(d["prompt"]), params, list(d["output"]), choice, deadline)


def pack_logprobs(lp: dict[int, Logprob] | None) -> list | None:
    return None if lp is None else [[t, v.logprob, v.rank] for t, v in lp.items()]


def unpack_logprobs(rows: list | None) -> dict[int, Logprob] | None:
    return None if rows is None else {int(t): Logprob(float(v), int(r)) for t, v, r in rows}


def encode(kind: Msg, token: str = "", **fields: Any) -> bytes:
    msg = {"k": kind.value, **fields}
    if token:
        msg["t"] = token
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """Parse one frame into a map with `k` as a Msg; raises WireError."""
    msg = unpack_map(frame, MAX_MESSAGE_BYTES, WireError)
    try:
        msg["k"] = Msg(msg.get("k"))
    except ValueError:
        raise WireError(f"unknown message kind {msg.get('k')!r}") from None
    return msg
