"""Token sampling for one step: greedy (argmax) or temperature sampling.

Greedy rows take the first maximum, as transformers' greedy search does. Temperature rows
draw by an exponential race on softmax(logits / T) with the request's own seeded generator.
The counter-based sampler (Philox keyed by seed and choice, bit-equal on CPU and GPU) and the
remaining parameters replace this in the sampler issue.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample(
    logits: torch.Tensor, temperatures: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """logits [N, V] fp32 -> one token id per row."""
    out = logits.argmax(dim=-1)
    for i, t in enumerate(temperatures):
        if t > 0.0:
            probs = torch.softmax(logits[i] / t, dim=-1)
            # exponential race: argmax p / E with E ~ Exp(1) draws from p
            e = torch.empty_like(probs).exponential_(generator=generators[i])
            out[i] = torch.argmax(probs / e)
    return out.tolist()
