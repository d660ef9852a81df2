"""FastHistogram exports what prometheus_client's Histogram exports for the same values."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pdserve.proxy.fast_histogram import FastHistogram

BUCKETS = (.001, .005, .01, .025, .05, .1, .5, 1, 5)


def samples(registry: CollectorRegistry) -> dict:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_same_exposition_as_prometheus_histogram():
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("lat_seconds", "doc", buckets=BUCKETS, registry=ref_reg)
    fast = FastHistogram("lat_seconds", "doc", BUCKETS, registry=fast_reg)
    rng = random.Random(0)
    values = [rng.choice(BUCKETS) for _ in range(50)] + [rng.expovariate(20) for _ in range(500)]
    values += [0.0, 7.0, 1e9]
    for v in values:
        ref.observe(v)
        fast.observe(v)
    got, want = samples(fast_reg), samples(ref_reg)
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) < 1e-9, k
    text = generate_latest(fast_reg).decode()
    assert 'lat_seconds_bucket{le="+Inf"} 553.0' in text and "lat_seconds_count 553.0" in text
