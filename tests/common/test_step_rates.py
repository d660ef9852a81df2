"""`StepRates` (common/step_rates.py): what the load reports say a worker's steps cost, which
the proxy's placement estimates read (proxy/placement.py)."""

from __future__ import annotations

import pytest

from pdserve.common.step_rates import StepRates


def test_nothing_is_reported_until_measured() -> None:
    r = StepRates()
    assert r.as_load() == {}
    r.observe(0, 4, 0.0)  # a zero-length step measures nothing
    assert r.as_load() == {}


def test_decode_steps_and_prefill_steps_are_weighted_apart() -> None:
    r = StepRates()
    r.observe(0, 8, 0.010)
    r.observe(0, 8, 0.020)
    assert r.decode_step_s == pytest.approx(0.010 + StepRates.ALPHA * 0.010)
    assert r.decode_batch == pytest.approx(8.0)
    r.observe(1000, 1, 0.050)  # a prefill-only step: tokens over its whole time
    assert r.prefill_tokens_per_s == pytest.approx(20_000)
    assert r.decode_step_s == pytest.approx(0.012)  # untouched
    load = r.as_load()
    assert load == {"prefill_tokens_per_s": 20_000.0, "decode_step_ms": 12.0,
                    "decode_batch": 8.0}


def test_a_mixed_step_charges_its_prompt_only_what_it_took_beyond_a_decode_step() -> None:
    """The placement estimate of a prompt beside running decodes is decode step + chunk ÷
    rate: a rate over the whole mixed step would count the decodes twice."""
    r = StepRates()
    r.observe(0, 32, 0.012)
    r.observe(512, 33, 0.028, decodes=32)  # 16 ms beyond the 12 ms decode step
    assert r.prefill_tokens_per_s == pytest.approx(512 / 0.016)
    est = r.decode_step_s + 512 / r.prefill_tokens_per_s
    assert est == pytest.approx(0.028)  # the step it came from
    # without a decode step measured yet, the whole step; never more than 10x the tokens/s
    fresh = StepRates()
    fresh.observe(512, 33, 0.028, decodes=32)
    assert fresh.prefill_tokens_per_s == pytest.approx(512 / 0.028)
    r2 = StepRates()
    r2.observe(0, 32, 0.030)
    r2.observe(16, 33, 0.031, decodes=32)
    assert r2.prefill_tokens_per_s == pytest.approx(16 / 0.0031)


def test_the_mixed_rate_is_measured_in_mixed_steps_only() -> None:
    """`mixed_prefill_tokens_per_s`: what a prompt chunk costs beside running decodes (on our
    engine more than its share of a prompt-only step), apart from the rate over every
    prefilling step; the placement prices a worker's streams by it."""
    r = StepRates()
    r.observe(2048, 1, 0.040)  # prompt only: not a mixed step
    assert r.mixed_prefill_tokens_per_s is None and "mixed_prefill_tokens_per_s" not in r.as_load()
    r.observe(0, 32, 0.010)
    r.observe(512, 33, 0.030, decodes=32)  # 20 ms beyond the 10 ms decode step
    assert r.mixed_prefill_tokens_per_s == pytest.approx(512 / 0.020)
    assert r.as_load()["mixed_prefill_tokens_per_s"] == pytest.approx(25_600.0)
    # the all-steps rate mixes both
    assert r.prefill_tokens_per_s == pytest.approx(51_200 + StepRates.ALPHA * (25_600 - 51_200))
