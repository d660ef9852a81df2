"""Triton sampling kernels against their torch references: interpreter on CPU, compiled on GPU.

Collected only with TRITON_INTERPRET=1 or a GPU (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.sampling import (
    exponential_race,
    exponential_race_ref,
    philox_uniform,
    philox_uniform_ref,
)
from tests.kernels_sampling.test_philox_ref import collision, rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def on_dev(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEV) for t in ts)


def masked_probs(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Softmax rows with about half the tokens masked to 0, one one-hot and one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, vocab, generator=g), dim=-1)
    probs[torch.rand(n, vocab, generator=g) < 0.5] = 0.0
    probs[0] = 0.0
    probs[0, vocab - 1] = 1.0
    if n > 1:
        probs[1] = 0.0  # all masked: token 0 by contract
    return probs


@pytest.mark.parametrize("n,vocab,block", [(1, 1, 1024), (3, 257, 128), (8, 1000, 1024)])
def test_philox_uniform_bit_equal_to_ref(n, vocab, block):
    seeds, choices, positions = rows(n, seed=n)
    out = philox_uniform(*on_dev(seeds, choices, positions), vocab, block=block)
    torch.testing.assert_close(out.cpu().view(torch.int32),
                               philox_uniform_ref(seeds, choices, positions, vocab).view(torch.int32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("n,vocab,block,splits", [(8, 257, 2048, None), (8, 1000, 128, 3), (5, 1000, 128, 1),
                                                  (2, 1000, 64, 100)])
def test_exponential_race_equals_ref(n, vocab, block, splits):
    seeds, choices, positions = rows(n, seed=vocab + block)
    probs = masked_probs(n, vocab, seed=n + vocab)
    got = exponential_race(*on_dev(probs, seeds, choices, positions), block=block, splits=splits)
    expect = exponential_race_ref(probs, seeds, choices, positions)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), expect)
    assert expect[0].item() == vocab - 1 and expect[1].item() == 0


def test_exponential_race_strided_rows():
    seeds, choices, positions = rows(4, seed=3)
    wide = masked_probs(4, 600, seed=4)
    probs = wide[:, :500]  # row stride 600, tokens contiguous
    got = exponential_race(*on_dev(probs, seeds, choices, positions), block=128)
    assert torch.equal(got.cpu(), exponential_race_ref(probs.contiguous(), seeds, choices, positions))


def test_exponential_race_tie_goes_to_smallest_index():
    a, b = collision(5)  # equal uniforms at two token ids in different tiles
    one = torch.tensor([5], dtype=torch.int64)
    probs = torch.zeros(1, 65536)
    probs[0, [a, b]] = 0.5
    for splits in (1, 64):  # the pair in one program's lanes, or in two programs
        got = exponential_race(*on_dev(probs, one, one * 0, one * 0), block=1024, splits=splits)
        assert got.tolist() == [a]


def test_launchers_check_inputs_and_handle_empty_batches():
    seeds, choices, positions = on_dev(*rows(2))
    with pytest.raises(ValueError):
        philox_uniform(seeds, choices.int(), positions, 10)
    with pytest.raises(ValueError):
        exponential_race(torch.rand(2, 10, device=DEV).half(), seeds, choices, positions)
    empty = torch.zeros(0, dtype=torch.int64, device=DEV)
    assert philox_uniform(empty, empty, empty, 10).shape == (0, 10)
    assert exponential_race(torch.zeros(0, 10, device=DEV), empty, empty, empty).shape == (0,)


@pytest.mark.gpu
def test_compiled_kernels_match_ref_on_llama3_vocab():
    n, vocab = 64, 128256
    seeds, choices, positions = rows(n, seed=64)
    u = philox_uniform(*on_dev(seeds, choices, positions), vocab)
    ref_cpu = philox_uniform_ref(seeds, choices, positions, vocab)
    assert torch.equal(u.cpu().view(torch.int32), ref_cpu.view(torch.int32))
    s, c, p = on_dev(seeds, choices, positions)
    assert torch.equal(philox_uniform_ref(s, c, p, vocab).cpu().view(torch.int32), ref_cpu.view(torch.int32))
    probs = masked_probs(n, vocab, seed=7).to(DEV)
    got = exponential_race(probs, s, c, p)
    assert torch.equal(got, exponential_race_ref(probs, s, c, p))
