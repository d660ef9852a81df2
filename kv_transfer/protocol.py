"""Wire format of the KV-transfer control plane: typed messages (`common/wire.py`'s codec).

Every message carries `e`, the sender's epoch (a random 63-bit id drawn at process start),
so a receiver can tell a restarted peer from the old one. Control messages are bounded in
size; Data (tcp transport) is a two-frame message: the header, then one block's bytes.

Handshake, P -> D: Hello {compat, pool registration, internal token}; D answers Welcome
{transport} or Refuse {reason}. Then, per request id: Offer (P) -> [Send (D) -> Data... (P)]
-> Done (D); Cancel either way at any time; D answers what it cannot take with Error.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Annotated, Any

import msgspec

from pdserve.common.wire import Codec, WireError

MAX_CONTROL_BYTES = 1 << 20  # a control message is a few hundred bytes; anything huge is hostile


class ProtocolError(WireError):
    """A malformed or oversized message; the text says what is wrong."""


class KVMessage(msgspec.Struct, tag_field="k", kw_only=True, omit_defaults=True):
    e: int  # the sender's epoch


class Hello(KVMessage, tag="hello"):
    v: int  # PROTOCOL_VERSION
    name: str
    token: str
    compat: dict[str, Any]  # a map, not a CompatRecord: an older peer is refused, not garbled
    pool: dict[str, Any]  # the pool registration (sender.py)


class Welcome(KVMessage, tag="welcome"):
    transport: str
    downgraded_from: str = ""
    downgrade_reason: str = ""


class Refuse(KVMessage, tag="refuse"):
    reason: str


class Offer(KVMessage, tag="offer"):
    rid: str
    blocks: list[Annotated[int, msgspec.Meta(ge=0)]]
    num_tokens: Annotated[int, msgspec.Meta(ge=0)]


class Send(KVMessage, tag="send"):
    rid: str


class Data(KVMessage, tag="data"):
    rid: str
    i: int


class Done(KVMessage, tag="done"):
    rid: str


class Cancel(KVMessage, tag="cancel"):
    rid: str
    reason: str


class Error(KVMessage, tag="error"):
    reason: str
    code: str = ""  # "handshake": P must shake hands again; "malformed"


CONTROL = Codec((Hello, Welcome, Refuse, Offer, Send, Data, Done, Cancel, Error),
                MAX_CONTROL_BYTES, ProtocolError)
encode, decode = CONTROL.encode, CONTROL.decode


def new_epoch() -> int:
    return secrets.randbits(63)


def boot_id() -> str:
    """Identifies this host's boot: peers with the same value share memory namespaces."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
