"""What crosses process boundaries, as typed records: the request record, token rows, and the
messages of the proxy <-> worker data path, with the codec the KV control plane reuses.

The request record is the one type every boundary carries and failover re-submits (DESIGN.md
§1): request id, prompt ids, output ids so far, sampling params (seed always set on the
wire), choice index, deadline, priority, cache salt. A `TokenRow` is one choice's token from
one engine step: workers stream them, the proxy turns them into text.

Every message is one msgspec struct tagged by its kind `k`, encoded as a msgpack map; the
internal token `t` rides on data-path messages when one is configured. `Codec.decode` turns
a frame into the struct of its kind and refuses oversized frames, unknown kinds, missing
fields and wrong types with a `WireError` that names the kind and the field (and the request
id when it can read one, so the worker's ERROR reaches the right request).

proxy -> D:    Reserve {rec, timeout}  Join {rid, first: [TokenRow]}  Abort {rid}
proxy -> P:    Prefill {rec, kv}       Abort {rid}
proxy -> both: Generate {rec}          Abort {rid}
D -> proxy:    Reserved {rid, kv}  Rejected {rid, reason}  Step {seq, out: [TokenRow], load}
P -> proxy:    First {rid, out, load}  Transfer {rid, ok, reason, transport}
any -> proxy:  Error {reason, rid?}
Worker -> proxy messages carry the worker's load report where DESIGN.md says so (every D
step frame, every P answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import msgspec

from pdserve.common.params import SamplingParams
from pdserve.common.prefix import check_cache_salt

MAX_MESSAGE_BYTES = 16 << 20  # a 128k-token prompt is ~1 MiB of msgpack ints


class WireError(ValueError):
    """A malformed message; the text names the problem (and `rid` the request, if known)."""

    def __init__(self, message: str, rid: str | None = None):
        super().__init__(message)
        self.rid = rid


class Logprob(msgspec.Struct, array_like=True, frozen=True):
    """One entry of a position's logprobs, as vLLM reports it."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


class TokenRow(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    """One token drawn for one choice in one step (P's first tokens too). The first row of a
    request that asked for prompt logprobs carries them: one entry per prompt token (None
    for the first, which nothing predicts; else the token's own first, then the top-N)."""

    request_id: str
    choice_index: int
    token_id: int
    logprobs: dict[int, Logprob] | None  # sampled token first, then the top-N
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


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
    priority: int = 0  # vLLM's: lower runs first (the proxy's admission queue orders by it)
    # vLLM's: salts the prefix-block names (common/prefix.py), so tenants share no cached block
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.choice_index < 0 or (self.choice_index and self.params.n != 1):
            raise ValueError("choice_index must be >= 0, and 0 when n > 1")
        check_cache_salt(self.cache_salt)

    def choice_indices(self) -> list[int]:
        return list(range(self.params.n)) if self.params.n > 1 else [self.choice_index]


class Codec:
    """Frames <-> the tagged structs of one protocol, within a size limit."""

    def __init__(self, kinds: tuple[type[msgspec.Struct], ...], max_bytes: int,
                 error: type[WireError] = WireError):
        self._decoder = msgspec.msgpack.Decoder(Union[kinds])  # noqa: UP007 - a runtime union
        self._kinds = {k.__struct_config__.tag for k in kinds}
        self.max_bytes = max_bytes
        self.error = error
        self.encode = msgspec.msgpack.Encoder().encode

    def decode(self, frame: bytes) -> Any:
        if len(frame) > self.max_bytes:
            raise self.error(f"message of {len(frame)} bytes exceeds {self.max_bytes}")
        try:
            return self._decoder.decode(frame)
        except msgspec.ValidationError as e:
            raise self._explain(frame, e) from None
        except msgspec.DecodeError as e:
            raise self.error(f"not a msgpack message ({e})") from None

    def _explain(self, frame: bytes, e: msgspec.ValidationError) -> WireError:
        """Name the kind (and the request) of a frame that failed validation."""
        raw = msgspec.msgpack.decode(frame)
        if not isinstance(raw, dict):
            return self.error("a message must be a map")
        kind = raw.get("k")
        if kind not in self._kinds:
            return self.error(f"unknown message kind {kind!r}")
        rid = raw.get("rid")
        if not isinstance(rid, str) and isinstance(raw.get("rec"), dict):
            rid = raw["rec"].get("request_id")
        return self.error(f"{kind}: {e}", rid if isinstance(rid, str) else None)


class DataMessage(msgspec.Struct, tag_field="k", kw_only=True, omit_defaults=True):
    t: str = ""  # the internal token, proxy -> worker, when one is configured


class Reserve(DataMessage, tag="reserve"):
    rec: RequestRecord
    timeout: float | None = None


class Join(DataMessage, tag="join"):
    rid: str
    first: list[TokenRow]  # P's first token of each choice still running


class Prefill(DataMessage, tag="prefill"):
    rec: RequestRecord
    kv: str | None = None  # D's KV-transfer address; None: nothing goes to a D


class Generate(DataMessage, tag="generate"):
    rec: RequestRecord


class Abort(DataMessage, tag="abort"):
    rid: str


class Reserved(DataMessage, tag="reserved"):
    rid: str
    kv: str


class Rejected(DataMessage, tag="rejected"):
    rid: str
    reason: str


class Step(DataMessage, tag="step"):
    seq: int
    out: list[TokenRow]
    load: dict[str, Any]


class First(DataMessage, tag="first"):
    rid: str
    out: list[TokenRow]
    load: dict[str, Any]


class Transfer(DataMessage, tag="transfer"):
    rid: str
    ok: bool
    reason: str = ""
    transport: str = ""
    load: dict[str, Any] = msgspec.field(default_factory=dict)  # P's, the blocks released


class Error(DataMessage, tag="error"):
    reason: str
    rid: str | None = None
    retryable: bool = False  # another worker may succeed (a worker gone, an engine failure)
    code: str = ""  # "engine": the engine failed on this request (its state is freed);
    # "busy": the worker's queue is full (another worker, or the proxy's queue, may take it)


class Ping(DataMessage, tag="ping"):
    """Proxy -> worker, every `PING_INTERVAL_S`: the step loop answers Pong between steps, so
    a worker whose data path stopped (frozen, wedged) is told from a slow one in seconds."""

    n: int


class Pong(DataMessage, tag="pong"):
    n: int
    load: dict[str, Any] = msgspec.field(default_factory=dict)  # the worker's, as in a report


class Connect(DataMessage, tag="connect"):
    """Proxy -> P, when a D becomes usable (or P does): open KV sessions to these D's now,
    so the first request's transfer does not wait for a handshake (a cuda_ipc handshake
    maps P's pool into D: the better part of a second)."""

    kv: list[str]  # D's KV-transfer addresses


DATA_PATH = Codec((Reserve, Join, Prefill, Generate, Abort, Reserved, Rejected, Step, First,
                   Transfer, Error, Ping, Pong, Connect), MAX_MESSAGE_BYTES)
