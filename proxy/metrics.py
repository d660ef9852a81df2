"""The proxy's Prometheus metrics (process-wide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge

from pdserve.proxy.fast_histogram import FastHistogram

_children: dict[tuple[object, tuple[str, ...]], object] = {}


def child(family: Any, *labels: str) -> Any:
    """`family.labels(*labels)`, looked up once per process (labels() locks and hashes on
    every call; the request path counts with these)."""
    key = (family, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = family.labels(*labels)
    return found

_LAT = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)

HTTP_REQUESTS = Counter("pdserve_proxy_http_requests", "HTTP requests by endpoint and status",
                        ["endpoint", "status"])
# observed per streamed token or per request, from the event loop: lock-free
# (proxy/fast_histogram.py)
TTFT = FastHistogram("pdserve_proxy_time_to_first_token_seconds", "Request start to first "
                     "token", _LAT)
TOKEN2 = FastHistogram("pdserve_proxy_token2_latency_seconds",
                       "First to second token of a choice (the P -> D handoff)", _LAT)
ITL = FastHistogram("pdserve_proxy_inter_token_latency_seconds", "Between a choice's tokens",
                    (.001, .005, .01, .025, .05, .075, .1, .15, .2, .3, .5, 1, 2.5, 5))
E2E = FastHistogram("pdserve_proxy_e2e_request_latency_seconds", "Request start to last token",
                    (.1, .3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240))
ROUTES = Counter("pdserve_proxy_routing_decisions", "Requests by route (pd, skip_p, p_only, both)",
                 ["route"])
PLACEMENTS = Counter("pdserve_proxy_placement_decisions",
                     "P/D-or-D placements under --placement slo, by route and why (slo: the "
                     "estimates decided; no_estimate: a worker had not measured its steps yet, "
                     "the prompt-length rule decided)", ["route", "reason"])
PLACEMENT_TTFT = FastHistogram("pdserve_proxy_placement_ttft_estimate_seconds",
                               "The estimated TTFT of each placement chosen by the estimates",
                               _LAT)
PLACEMENT_P_ROLE = Gauge("pdserve_proxy_placement_prefill_role_workers",
                         "Both-role workers that --placement slo holds in P's role (they "
                         "prefill for others and take no new decodes) until the pool "
                         "collocates again")
REJECTED = Counter("pdserve_proxy_rejected_requests", "Requests answered 429 (overloaded)",
                   ["reason"])
QUEUED = Gauge("pdserve_proxy_queued_requests", "Requests waiting for a worker with room")
QUEUE_TIME = FastHistogram("pdserve_proxy_queue_time_seconds",
                           "Arrival to a route with room (admitted requests; vLLM's queue "
                           "time)", _LAT)
RETRIES = Counter("pdserve_proxy_retries", "Requests retried before their first token")
FAILOVERS = Counter("pdserve_proxy_failovers", "Choices re-submitted after a D died mid-stream")
TRANSFER_FAILURES = Counter("pdserve_proxy_transfer_failures",
                            "P reported a failed KV transfer (D recomputed)")
WORKER_LOAD = Gauge("pdserve_proxy_worker_load", "Last reported load of each worker",
                    ["worker", "role", "metric"])
WORKER_HEALTHY = Gauge("pdserve_proxy_worker_healthy", "1 if the worker is routable",
                       ["worker", "role"])
WORKER_REQUESTS = Counter("pdserve_proxy_worker_requests", "Requests routed to each worker",
                          ["worker", "role"])
WORKER_RESTARTS = Counter("pdserve_proxy_worker_restarts",
                          "Local-cluster workers restarted by `pdserve serve`'s supervisor",
                          ["worker", "role"])
WORKER_EJECTIONS = Counter("pdserve_proxy_worker_ejections",
                           "Workers ejected, by cause: data_path (silent past "
                           "--data-path-timeout) or health (two failed health checks)",
                           ["worker", "role", "cause"])
