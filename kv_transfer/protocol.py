"""Wire format of the KV-transfer control plane: msgpack maps with a `k` (kind) field.

Every message carries `e`, the sender's epoch (a random 63-bit id drawn at process start),
so a receiver can tell a restarted peer from the old one. Control messages are bounded in
size; DATA (tcp transport) is a two-frame message: a msgpack header, then one block's bytes.

Handshake, P -> D: HELLO {compat, pool registration, internal token}; D answers WELCOME
{transport} or REFUSE {reason}. Then, per request id: OFFER (P) -> [SEND (D) -> DATA... (P)]
-> DONE (D); CANCEL either way at any time.
"""

from __future__ import annotations

import enum
import os
import secrets
import socket
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # a control message is a few hundred bytes; anything huge is hostile


class Kind(enum.StrEnum):
    HELLO = "hello"
    WELCOME = "welcome"
    REFUSE = "refuse"
    OFFER = "offer"
    SEND = "send"
    DATA = "data"
    DONE = "done"
    CANCEL = "cancel"
    ERROR = "error"


class ProtocolError(ValueError):
    """A malformed or oversized message; the text says what is wrong."""


def new_epoch() -> int:
    return secrets.randbits(63)


def boot_id() -> str:
    """Identifies this host's boot: peers with the same value share memory namespaces."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def encode(kind: Kind, epoch: int, **fields: Any) -> bytes:
    return msgpack.packb({"k": kind.value, "e": epoch, **fields}, use_bin_type=True)


# the fields each kind must carry, with their types
_REQUIRED: dict[Kind, dict[str, type | tuple[type, ...]]] = {
    Kind.HELLO: {"v": int, "name": str, "token": str, "compat": dict, "pool": dict},
    Kind.WELCOME: {"transport": str},
    Kind.REFUSE: {"reason": str},
    Kind.OFFER: {"rid": str, "blocks": list, "num_tokens": int},
    Kind.SEND: {"rid": str},
    Kind.DATA: {"rid": str, "i": int},
    Kind.DONE: {"rid": str},
    Kind.CANCEL: {"rid": str, "reason": str},
    Kind.ERROR: {"reason": str},
}


def unpack_map(frame: bytes, limit: int, error: type[Exception]) -> dict[str, Any]:
    """One msgpack map of at most `limit` bytes, or `error` saying what is wrong (shared by
    this control plane and the proxy <-> worker data path, engine/record.py)."""
    if len(frame) > limit:
        raise error(f"message of {len(frame)} bytes exceeds {limit}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise error(f"not a msgpack message ({type(e).__name__})") from e
    if not isinstance(msg, dict):
        raise error("a message must be a map")
    return msg


def decode(frame: bytes) -> dict[str, Any]:
    """Parse and check one control frame; raises ProtocolError naming the problem."""
    msg = unpack_map(frame, MAX_CONTROL_BYTES, ProtocolError)
    try:
        kind = Kind(msg.get("k"))
    except ValueError:
        raise ProtocolError(f"unknown message kind {msg.get('k')!r}") from None
    if not isinstance(msg.get("e"), int):
        raise ProtocolError(f"{kind.value}: missing epoch")
    for name, typ in _REQUIRED[kind].items():
        if not isinstance(msg.get(name), typ) or isinstance(msg.get(name), bool):
            raise ProtocolError(f"{kind.value}: field {name!r} missing or not {typ}")
    if kind is Kind.OFFER and not all(isinstance(b, int) and b >= 0 for b in msg["blocks"]):
        raise ProtocolError("offer: blocks must be non-negative integers")
    msg["k"] = kind
    return msg


@dataclass(frozen=True)
class CompatRecord:
    """What two engines must agree on before KV moves between them (DESIGN.md §4)."""

    protocol_version: int
    model_id: str
    config_hash: str
    tokenizer_hash: str
    dtype: str
    block_size: int
    pool_layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    prefix_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: dict[str, Any]) -> str | None:
        """None if `other` (a peer's record) is compatible, else the first difference.
        max_model_len may differ (each side enforces its own); nothing else may."""
        mine = self.to_dict()
        for key, value in mine.items():
            if key == "max_model_len":
                continue
            if other.get(key) != value:
                return f"{key} differs: ours {value!r}, peer's {other.get(key)!r}"
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
