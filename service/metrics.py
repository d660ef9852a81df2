"""The worker's Prometheus metrics (process-wide, as prometheus_client keeps them); vLLM's
names where the meaning is the same, so gateways and dashboards built for vLLM read them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch")
WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting (queue, reservations, transfers)")
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (fraction 0..1)")
PREFIX_QUERIES = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
REQUESTS = Counter("pdserve_requests", "Requests finished", ["role", "finish_reason"])
PROMPT_TOKENS = Counter("pdserve_prompt_tokens", "Prompt tokens processed", ["role"])
GENERATION_TOKENS = Counter("pdserve_generation_tokens", "Tokens generated", ["role"])
REJECTED = Counter("pdserve_requests_rejected", "Requests refused as busy (queue full)", ["role"])
PREEMPTIONS = Counter("pdserve_num_preemptions", "Sequences preempted for recompute")
FALLBACKS = Counter("kv_transfer_fallback", "Prompts D recomputed because the transfer failed")
TTFT = Histogram("pdserve_time_to_first_token_seconds", "Request received to first token",
                 buckets=(.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5,
                          7.5, 10, 20, 40, 80))
ITL = Histogram("pdserve_inter_token_latency_seconds", "Time between a choice's tokens",
                buckets=(.01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 10))
E2E = Histogram("pdserve_e2e_request_latency_seconds", "Request received to last token",
                buckets=(.3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240))
HANDOFF = Histogram(
    "pdserve_kv_handoff_seconds", "The P->D handoff of one request, split by stage. P: "
    "offer_wait (the prompt's step ended -> its KV offered, writes complete). D: pull (offer "
    "received -> KV in D's blocks), wake (KV landed -> D's loop saw it), kv_after_join / "
    "join_after_kv (how long the later of the two came after the other; 0 for the earlier), "
    "to_step (KV and Join both in -> the end of the step carrying its first D token)",
    ["stage"], buckets=(.0001, .00025, .0005, .001, .002, .004, .008, .016, .032, .064, .128,
                        .256, .512, 1, 2.5, 10))
GPU_TURN_HOLDS = Counter("pdserve_gpu_turn_holds",
                         "D: decode holds begun because a prefill worker on its GPU was busy "
                         "(--gpu-turns-socket)")
GPU_TURN_URGENT_STEPS = Counter(
    "pdserve_gpu_turn_urgent_steps", "D: steps taken while a prefill worker on its GPU was "
    "busy, because a request that had just joined waited for its first D token (token 2 "
    "never waits for another prompt's prefill)")
