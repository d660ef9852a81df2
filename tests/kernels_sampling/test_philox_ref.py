"""The plain-torch Philox reference against the Random123 vectors and a pure-Python oracle,
and the statistics of its uniforms and of the exponential race (no Triton launch here)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pdserve.kernels import sampling
from pdserve.kernels.sampling import (
    exponential_race_ref,
    philox4x32_ref,
    philox_uniform_ref,
    uniform_from_word,
)
from tests.kernels_sampling._philox_py import float32_bits, philox4x32_10, uniform

# Random123 kat_vectors, philox4x32_10: (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
EDGE_SEEDS = [0, 1, -1, -(2**63), 2**63 - 1, 2**32, 2**32 - 1, -(2**32), 12345678901234567]


def rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n request rows: edge seeds first, then random int64 seeds (negative and > 2^32)."""
    rng = random.Random(seed)
    seeds = (EDGE_SEEDS + [rng.randrange(-(2**63), 2**63) for _ in range(n)])[:n]
    choices = [rng.randrange(0, 8) for _ in range(n)]
    positions = [rng.choice([0, 1, rng.randrange(2**20), 2**31 + 7]) for _ in range(n)]
    return tuple(torch.tensor(x, dtype=torch.int64) for x in (seeds, choices, positions))


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_known_answer_vectors(ctr, key, expect):
    assert philox4x32_10(ctr, key) == expect  # the oracle itself is right
    out = philox4x32_ref(torch.tensor(ctr), torch.tensor(key))
    assert out.tolist() == list(expect)


def test_ref_words_match_python_on_random_inputs():
    rng = random.Random(1)
    words = lambda k: [rng.choice([0, 0xFFFFFFFF, rng.getrandbits(32)]) for _ in range(k)]
    ctrs, keys = [words(4) for _ in range(300)], [words(2) for _ in range(300)]
    out = philox4x32_ref(torch.tensor(ctrs), torch.tensor(keys))
    assert out.tolist() == [list(philox4x32_10(c, k)) for c, k in zip(ctrs, keys)]


@pytest.mark.parametrize("n,vocab", [(1, 1), (9, 257)])
def test_uniform_ref_bit_equal_to_python(n, vocab):
    seeds, choices, positions = rows(n)
    u = philox_uniform_ref(seeds, choices, positions, vocab)
    assert u.dtype == torch.float32 and u.shape == (n, vocab)
    expect = [[float32_bits(uniform(s, c, p, v)) for v in range(vocab)]
              for s, c, p in zip(seeds.tolist(), choices.tolist(), positions.tolist())]
    assert torch.equal(u.view(torch.int32), torch.tensor(expect, dtype=torch.int32))


def test_uniform_from_word_bounds():
    u = uniform_from_word(torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64))
    assert u.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 2.0**-24]


def test_chunking_does_not_change_results(monkeypatch):
    seeds, choices, positions = rows(3)
    whole = philox_uniform_ref(seeds, choices, positions, 3000)
    probs = torch.rand(3, 3000, generator=torch.Generator().manual_seed(0))
    race = exponential_race_ref(probs, seeds, choices, positions)
    monkeypatch.setattr(sampling, "_REF_CHUNK_ELEMS", 1)  # 1024-column chunks
    assert torch.equal(philox_uniform_ref(seeds, choices, positions, 3000), whole)
    assert torch.equal(exponential_race_ref(probs, seeds, choices, positions), race)


def test_uniforms_are_uniform():
    seeds, choices, positions = (torch.tensor(x, dtype=torch.int64) for x in ([7, 7, 8, -9], [0, 1, 0, 0],
                                                                              [0, 0, 5, 2**20]))
    u = philox_uniform_ref(seeds, choices, positions, 50_000).flatten().double()
    n = u.numel()
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    # Var of the sample variance of U(0,1): (mu4 - sigma^4) / n = 1 / (180 n)
    assert abs(u.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    s = u.sort().values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at alpha = 0.01
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 103.4  # chi-square, 63 degrees of freedom, p = 0.001


def test_streams_differ_and_do_not_depend_on_the_batch():
    base = (12345, 0, 10)
    variants = [base, (12346, 0, 10), (12345 + 2**32, 0, 10), (-12345, 0, 10), (12345, 1, 10),
                (12345, 0, 11)]
    seeds, choices, positions = (torch.tensor(x, dtype=torch.int64) for x in zip(*variants))
    u = philox_uniform_ref(seeds, choices, positions, 4096)
    for i in range(1, len(variants)):
        assert (u[i] == u[0]).float().mean().item() < 0.01, variants[i]
    alone = philox_uniform_ref(seeds[3:4], choices[3:4], positions[3:4], 4096)
    assert torch.equal(alone[0], u[3])


def test_race_ref_is_argmax_of_probs_over_exponentials():
    seeds, choices, positions = rows(8)
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(3 * torch.randn(8, 1000, generator=g), dim=-1)
    probs[torch.rand(8, 1000, generator=g) < 0.5] = 0.0
    u = philox_uniform_ref(seeds, choices, positions, 1000)
    expect = torch.where(probs > 0, probs / -torch.log(u), -1.0).argmax(dim=1)
    got = exponential_race_ref(probs, seeds, choices, positions)
    assert torch.equal(got, expect) and got.dtype == torch.int64
    assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_race_masked_zero_row_and_tiny_probs():
    seeds, choices, positions = rows(3)
    probs = torch.zeros(3, 300)
    probs[1, 123] = 1e-30  # allowed but tiny: still beats every masked token
    probs[2, 299] = 1.0
    assert exponential_race_ref(probs, seeds, choices, positions).tolist() == [0, 123, 299]


def test_race_samples_the_distribution():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])  # unnormalised is fine
    n = 4000
    seeds = torch.full((n,), 99, dtype=torch.int64)
    got = exponential_race_ref(weights.expand(n, 5).contiguous(), seeds, torch.zeros_like(seeds),
                               torch.arange(n))
    counts = torch.bincount(got, minlength=5).double()
    assert counts[4] == 0
    expect = n * weights[:4].double() / 10
    assert ((counts[:4] - expect) ** 2 / expect).sum().item() < 16.27  # 3 dof, p = 0.001


def collision(seed: int, vocab: int = 65536) -> tuple[int, int]:
    """Two token ids with the same uniform under (seed, 0, 0): exact ties of the race."""
    one = torch.tensor([seed], dtype=torch.int64)
    u = philox_uniform_ref(one, one * 0, one * 0, vocab)[0]
    first: dict[float, int] = {}
    for v, x in enumerate(u.tolist()):
        if x in first and v - first[x] > 1500:  # far apart: different tiles/chunks
            return first[x], v
        first.setdefault(x, v)
    raise AssertionError("no collision found")


def test_race_ties_go_to_the_smallest_index(monkeypatch):
    a, b = collision(5)
    one = torch.tensor([5], dtype=torch.int64)
    probs = torch.zeros(1, 65536)
    probs[0, [a, b]] = 0.5
    assert exponential_race_ref(probs, one, one * 0, one * 0).tolist() == [a]
    monkeypatch.setattr(sampling, "_REF_CHUNK_ELEMS", 1)
    assert exponential_race_ref(probs, one, one * 0, one * 0).tolist() == [a]


def test_checks_reject_bad_inputs():
    seeds, choices, positions = rows(2)
    with pytest.raises(ValueError):
        philox_uniform_ref(seeds.int(), choices, positions, 10)
    with pytest.raises(ValueError):
        philox_uniform_ref(seeds, choices[:1], positions, 10)
    with pytest.raises(ValueError):
        exponential_race_ref(torch.rand(2, 10, dtype=torch.float64), seeds, choices, positions)
    with pytest.raises(ValueError):
        exponential_race_ref(torch.rand(3, 10), seeds, choices, positions)
