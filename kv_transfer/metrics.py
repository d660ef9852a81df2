"""Prometheus metrics of the KV transfer, registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSFERS = Counter("kv_transfer_transfers", "KV transfers by role, transport and outcome",
                    ["role", "transport", "outcome"])
BYTES = Counter("kv_transfer_bytes", "KV bytes moved", ["role", "transport"])
SECONDS = Histogram("kv_transfer_seconds", "Offer-to-done time of successful transfers",
                    ["transport"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                            2.5, 5, 10, 30))
RESERVATIONS_ACTIVE = Gauge("kv_transfer_reservations_active", "Reservations not yet resolved")
RESERVATIONS_EXPIRED = Counter("kv_transfer_reservations_expired",
                               "Reservations that were never filled before their deadline")
DOWNGRADES = Counter("kv_transfer_transport_downgrade", "Transport downgrades at handshake",
                     ["from_transport", "to_transport"])
HANDSHAKE_REFUSALS = Counter("kv_transfer_handshake_refusals",
                             "Handshakes refused (incompatible peer, bad token)", ["reason"])
MALFORMED = Counter("kv_transfer_malformed_messages", "Control messages refused as malformed")
UNAUTHENTICATED = Counter("kv_transfer_unauthenticated_messages",
                          "Control messages refused: no handshake, or not the session's key")
SESSIONS_LOST = Counter("kv_transfer_sessions_lost",
                        "P->D sessions whose connection was lost (a new session follows)")
EARLY_OFFERS = Counter("kv_transfer_early_offers",
                       "Offers that came before their reservation (P starts before D has "
                       "reserved): matched when the reservation came, or expired",
                       ["outcome"])
