"""The state machines of one transfer, on each side. Every non-terminal state has a deadline.

D (receiver), per reservation:
    RESERVED --offer--> PULLING --data complete--> DONE
    any non-terminal --cancel--> CANCELLED;  RESERVED past deadline --> EXPIRED;
    PULLING past deadline or bad data --> FAILED
P (sender), per D: CONNECTING --welcome--> READY, --refuse--> REFUSED; per offer:
    CONNECTING --welcome--> OFFERED --send (tcp)--> SENDING --done--> RELEASED
    any non-terminal --cancel / refuse / deadline--> RELEASED (with that outcome)
    (tcp: SENDING -> STOPPING -> RELEASED while sender threads still read its blocks;
    past a short grace their connections are shut down)
Terminal states produce one `TransferEvent` for the owner (the scheduler), which frees or
reuses the blocks: kv_transfer borrows block ids, it never allocates or frees them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class ReservationState(enum.Enum):
    RESERVED = "reserved"
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class DestState(enum.Enum):
    """P's link to one D."""

    CONNECTING = "connecting"  # Hello sent, no answer yet
    READY = "ready"  # Welcome: offers go out
    REFUSED = "refused"  # Refuse: offers fail fast for a while, then P shakes hands again


class OfferState(enum.Enum):
    CONNECTING = "connecting"  # waiting for the handshake with D
    OFFERED = "offered"
    SENDING = "sending"
    STOPPING = "stopping"  # tcp: released, its event held until no sender reads its blocks
    RELEASED = "released"


class EventKind(enum.Enum):
    ARRIVED = "arrived"  # D: the KV is in the reserved blocks
    FAILED = "failed"  # D or P: the transfer broke (peer gone, bad data, refused, deadline)
    EXPIRED = "expired"  # D: no offer came before the reservation's deadline
    CANCELLED = "cancelled"  # the peer cancelled
    RELEASED = "released"  # P: D confirmed; the blocks are P's to free


@dataclass(frozen=True)
class TransferEvent:
    rid: str
    kind: EventKind
    reason: str = ""
    transport: str = ""
    nbytes: int = 0
    seconds: float = 0.0
    at: float = field(default_factory=time.monotonic)  # when it was emitted (wake latency)


@dataclass(eq=False)
class Reservation:
    rid: str
    block_ids: list[int]
    deadline: float
    state: ReservationState = ReservationState.RESERVED
    peer: bytes | None = None  # the ROUTER identity of the P that offered
    src_blocks: list[int] = field(default_factory=list)
    dst_blocks: list[int] = field(default_factory=list)  # the reserved blocks the offer fills
    xid: int = 0  # tcp: the transfer id of its data batches (0: none open)
    offered_at: float = 0.0


@dataclass(eq=False)
class PendingOffer:
    """P's record of one offer, from `offer()` until its event."""

    rid: str
    address: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    state: OfferState = OfferState.CONNECTING
    created: float = field(default_factory=time.monotonic)
    session: int = 0  # the epoch of the session it was sent in (0: not sent yet)
    num_parts: int = 0  # tcp: parts queued or being sent by sender threads (they read blocks)
