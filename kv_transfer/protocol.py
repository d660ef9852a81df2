"""Wire format of the KV-transfer control plane: typed messages (`common/wire.py`'s codec).

A link from P to D is a session: one DEALER socket with its own identity and a random
63-bit session epoch `e`, which every message carries. When the connection is lost (D frozen
past the heartbeat timeout, D restarted, a network cut) P opens a new session: a new socket,
identity and epoch, never the old ones again (a ROUTER that still holds an identity ignores a
new connection under it). Control messages are bounded in size; the KV itself never rides
on them.

Handshake, P -> D: Hello {compat, pool registration, internal token, P's process epoch `pe`
and session number `s`}; D answers Welcome {transport, session key} or Refuse {reason}.
Every later message, either way, carries the session key in `a`; D refuses one without it
(the internal token authenticates the handshake, the key each message after it). Then, per
request id: Offer (P) -> [Send (D) -> batches on the data sockets (P)] -> Done (D); Cancel
either way at any time (a P may cancel only its own offers); D answers what it cannot take
with Error.

The tcp transport's data sockets (`tcp_recv.py`, `tcp_send.py`): plain TCP connections
beside the session, P to D's data port (Welcome.data_port, on the interface and at the host
P reaches the session at). Each opens with DATA_HELLO (magic, version, the session's
Welcome.data_key, connection number), then carries batches: DATA_BATCH (magic, first block
index in the offer, number of blocks, transfer id from Send.x) and that many whole blocks'
bytes, which D receives straight into the reserved blocks. A P that registers no
`tcp_data` version (an older pdserve) is downgraded at handshake, with the reason.
"""

from __future__ import annotations

import secrets
import socket
import struct
from typing import Annotated, Any

import msgspec

from pdserve.common.wire import Codec, WireError

MAX_CONTROL_BYTES = 1 << 20  # a control message is a few hundred bytes; anything huge is hostile

DATA_VERSION = 1  # of the data sockets' framing; P registers it as pool["tcp_data"]
DATA_MAGIC = 0x3144564B  # b"KVD1" little-endian: a stray connection fails at once
DATA_HELLO = struct.Struct("<II32sI")  # magic, DATA_VERSION, data key (32 hex), connection no.
DATA_BATCH = struct.Struct("<IIIQ")  # magic, first block index, number of blocks, transfer id
MAX_DATA_CONNECTIONS = 16  # per session: D closes more, P never opens more


class ProtocolError(WireError):
    """A malformed or oversized message; the text says what is wrong."""


class KVMessage(msgspec.Struct, tag_field="k", kw_only=True, omit_defaults=True):
    e: int  # the session's epoch (D's: its process epoch)
    a: str = ""  # the session key (Welcome's), on every message after the handshake


class Hello(KVMessage, tag="hello"):
    v: int  # PROTOCOL_VERSION
    name: str
    token: str
    compat: dict[str, Any]  # a map, not a CompatRecord: an older peer is refused, not garbled
    pool: dict[str, Any]  # the pool registration (sender.py)
    pe: int = 0  # P's process epoch: sessions of one P process share it
    s: int = 0  # the session's number in that process (a later one replaces an earlier one)


class Welcome(KVMessage, tag="welcome"):
    transport: str
    key: str = ""  # the session key: `a` of every later message, either way
    downgraded_from: str = ""
    downgrade_reason: str = ""
    data_port: int = 0  # tcp: D's data port, at the host of the session's address
    data_key: str = ""  # tcp: what each data connection's DATA_HELLO carries


class Refuse(KVMessage, tag="refuse"):
    reason: str


class Offer(KVMessage, tag="offer"):
    rid: str
    blocks: list[Annotated[int, msgspec.Meta(ge=0)]]
    num_tokens: Annotated[int, msgspec.Meta(ge=0)]


class Send(KVMessage, tag="send"):
    rid: str
    x: int = 0  # tcp: the transfer id P's batch headers carry


class Done(KVMessage, tag="done"):
    rid: str


class Cancel(KVMessage, tag="cancel"):
    rid: str
    reason: str


class Error(KVMessage, tag="error"):
    reason: str
    code: str = ""  # "handshake": P must shake hands again; "malformed"


CONTROL = Codec((Hello, Welcome, Refuse, Offer, Send, Done, Cancel, Error),
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
