"""Step-time model of one GPU engine, fitted from bench/serving_gpu.py's measured step times:
what `pdserve plan` simulates with and what the fake engines (bench/fake_worker.py
--step-model) sleep. Fit or check one with `python bench/step_model.py fit|check ...`:

    python bench/step_model.py fit bench/data/h200_llama3_8b_steps.json \\
        --out pdserve/plan/models/h200_llama3_8b.json

One engine step is one forward over N tokens: the chunks of prompts being prefilled (chunk i:
n_i new tokens after c_i already in the KV cache) and one token of each decoding sequence
(sequence j reads L_j tokens of KV). Its time:

    step = max(floor_s, N * token_s)                      the linear layers (GEMMs)
         + kv_token_s * sum_j L_j                         decode attention: KV read
         + pair_s * sum_i (n_i * c_i + n_i (n_i + 1) / 2) prefill attention: causal pairs

- `floor_s`: a step whose GEMMs are memory-bound (few tokens) costs this: reading the weights
  plus the step's fixed costs (scheduler, sampler, launches). The data cannot separate the
  two, so they are one coefficient.
- `token_s`: compute-bound GEMM time per token (2 x params FLOPs each).
- `kv_token_s`: per token of context of each decoding sequence.
- `pair_s`: per (query, key) pair of a prompt chunk's causal attention.

A mixed step (prefill chunks and decodes in one forward, as a both-role worker runs them under
chunked prefill) shares the weight read once: its N counts both, under one max(); the two
attention terms add (different kernels, one after the other). A decode-only step is
max(floor_s, B * token_s) + kv_token_s * B * L.

The fit (`StepModel.fit`): the five measured points of serving_gpu.py's JSON (prefill 8 x 1k
and 1 x 8k at the runner level; `engine.step()` decode at batch 1, 32, 256 over contexts
growing from `ctx`, mean context ctx + 6 + (steps - 1) / 2 as serving_gpu.py counts it),
least squares on relative error, every coefficient >= 0, each point on the side of the max()
its fitted coefficients put it (the regimes are enumerated). Four coefficients, five points:
one degree of freedom, so small residuals say the form is consistent with these points, not
that it predicts far from them. In particular every decode point has the same context
(~1080), so the batch-dependent time is attributed to KV reads; per-sequence costs that do
not grow with context (sampling) are folded into it. `kv_bytes_per_token` (for modelled KV
transfers) comes from the same JSON: the roofline's KV milliseconds at the measured copy rate.

First fitted on bench/data/h200_llama3_8b_steps.json (one H200, bench/serving_gpu.py, session
6): floor 5.202 ms, 21.81 us/token, 50.84 ns per KV token, 1.236 ns per pair, residuals
within 0.2%. The built-in H200 fit (pdserve/plan/models/h200_llama3_8b.json) is now the one
of bench/data/h200_llama3_8b_mixed.json (bench/mixed_steps.py on one H200, session 13: the
same five pure points, then the mixed ones below):

    floor_s 4.686 ms, token_s 22.13 us (45.2k tokens/s), kv_token_s 41.19 ns (128 KiB per
    token: 3.18 TB/s, 77% of the measured 4.15 TB/s copy rate), pair_s 1.152 ns

    point           measured   model    residual
    prefill_8x1k    186.15 ms  186.09   -0.03%
    prefill_1x8k    219.91 ms  219.92   +0.00%
    decode_b1         4.721 ms   4.731  +0.20%
    decode_b32        6.125 ms   6.109  -0.25%
    decode_b256      17.033 ms  17.048  +0.09%

(decode b=256 is on the compute side of the max(): 256 x token_s = 5.58 ms > floor_s.)

Checked on mixed steps (issue 21): `python bench/step_model.py check <mixed_steps.json>` fits
the pure points of bench/mixed_steps.py's JSON (the same five, measured in the same run) and
prints the model's residual (model / measured - 1) on each mixed step (one n-token prefill
chunk plus B decodes, `engine.step()` level) and on the pure decode steps measured beside them.
On one H100 (bench/data/h100_llama3_8b_mixed.json, BENCHMARKS.md session 7) the decode steps
are within -0.9..-6.3%, but the model is far below every mixed step: -4% (B=1, n=2048) to
-65% (B=128, n=256), mean |residual| 36%. Two costs of a mixed step are outside the form
(causes inferred from the runner's code, not profiled): it runs eager, not in a CUDA graph
(B=1, n=256: 13.9 ms against the model's 6.6 ms floor), and its decode rows go through the
prefill attention kernel, not the decode one (at n=256 a mixed step costs 7.3 ms more than
decoding alone at B=1, 34 ms more at B=128).

So the model has two mixed-step terms, fitted (`fit`, when the JSON has mixed points) on
what the pure form misses there: `mixed_s` once per step with prompt chunks and decodes,
and `mixed_kv_token_s` per decode KV token in such a step. On that H100
(pdserve/plan/models/h100_llama3_8b.json, `python bench/step_model.py fit
bench/data/h100_llama3_8b_mixed.json --out ...`): floor 6.50 ms, 23.2 us/token, 62.0 ns per
decode KV token, 1.12 ns per pair; mixed 4.76 ms + 193.7 ns per decode KV token (3x a
decode step's own); the mixed residuals drop to mean |5.1%|, worst -16.7% (B=1, n=256).
On the H200 (the built-in fit): mixed 5.32 ms + 202.9 ns per decode KV token, mixed
residuals -23% (B=1, n=256), the rest within -4..+11%. (Until session 13 the H200 fit had
no mixed terms because its mixed steps had never been measured, and the planner took them
for cheap; they cost as much as the H100's.)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BLOCK_SIZE = 16  # tokens per KV block: the engine's default, which serving_gpu.py runs with


@dataclass(frozen=True)
class Point:
    """One measured step: N tokens, decode KV tokens read, prefill attention pairs, seconds."""

    name: str
    tokens: int
    kv_tokens: float
    pairs: float
    seconds: float


def causal_pairs(n: int, context: int = 0) -> float:
    """(query, key) pairs of a prompt chunk of `n` tokens after `context` cached ones."""
    return n * context + n * (n + 1) / 2


@dataclass(frozen=True)
class StepModel:
    """See the module docstring. Times in seconds."""

    floor_s: float
    token_s: float
    kv_token_s: float
    pair_s: float
    # a step with prompt chunks AND decodes costs more than the form above (measured, see
    # the module docstring): mixed_s once, plus mixed_kv_token_s per decode KV token
    mixed_s: float = 0.0
    mixed_kv_token_s: float = 0.0
    kv_bytes_per_token: int = 0  # for modelled KV transfers (bench/fake_worker.py)
    kv_capacity_tokens: int = 0  # the measured engine's KV pool, in tokens (0: unknown)
    source: str = ""
    residuals: dict[str, float] = field(default_factory=dict)  # point -> model/measured - 1

    # ---- the model ---------------------------------------------------------------------

    def batch_s(self, prefill_chunks: Iterable[tuple[int, int]] = (),
                decode_contexts: Iterable[int] = ()) -> float:
        """One step: prompt chunks as (new tokens, cached context before them), and the
        context length of each decoding sequence. An empty step takes no time."""
        tokens = 0
        pairs = 0.0
        for n, ctx in prefill_chunks:
            tokens += n
            pairs += causal_pairs(n, ctx)
        kv = 0
        for ctx in decode_contexts:
            tokens += 1
            kv += ctx
        if not tokens:
            return 0.0
        mixed = self.mixed_s + self.mixed_kv_token_s * kv if pairs and kv else 0.0
        return max(self.floor_s, tokens * self.token_s) + self.kv_token_s * kv + \
            self.pair_s * pairs + mixed

    def prefill_s(self, num_tokens: int, context_tokens: int = 0) -> float:
        """A prefill-only step: one chunk of `num_tokens` after `context_tokens` cached."""
        return self.batch_s([(num_tokens, context_tokens)])

    def decode_s(self, batch: int, mean_context: float) -> float:
        """A decode-only step: `batch` sequences of `mean_context` tokens of KV each."""
        if batch <= 0:
            return 0.0
        return max(self.floor_s, batch * self.token_s) + self.kv_token_s * batch * mean_context

    def step_s(self, prefill_tokens: int, decode_batch: int, decode_context: float,
               prefill_context: int = 0) -> float:
        """A mixed step: one chunk of `prefill_tokens` (after `prefill_context` cached) and
        `decode_batch` decoding sequences of `decode_context` mean context, one forward."""
        n = prefill_tokens + max(decode_batch, 0)
        if n <= 0:
            return 0.0
        kv = max(decode_batch, 0) * decode_context
        mixed = self.mixed_s + self.mixed_kv_token_s * kv if prefill_tokens > 0 and kv else 0.0
        return (max(self.floor_s, n * self.token_s) + self.kv_token_s * kv
                + self.pair_s * causal_pairs(prefill_tokens, prefill_context) + mixed)

    def scaled(self, factor: float) -> StepModel:
        """The same engine `factor` times slower (every time coefficient multiplied)."""
        return replace(self, floor_s=self.floor_s * factor, token_s=self.token_s * factor,
                       kv_token_s=self.kv_token_s * factor, pair_s=self.pair_s * factor,
                       mixed_s=self.mixed_s * factor,
                       mixed_kv_token_s=self.mixed_kv_token_s * factor)

    def point_s(self, p: Point) -> float:
        return max(self.floor_s, p.tokens * self.token_s) + self.kv_token_s * p.kv_tokens + \
            self.pair_s * p.pairs

    # ---- fitting -----------------------------------------------------------------------

    @staticmethod
    def points(data: dict[str, Any]) -> list[Point]:
        """The measured steps of serving_gpu.py's JSON, as the model counts them."""
        pts = []
        for name, batch, length in (("8x1k", 8, 1024), ("1x8k", 1, 8192)):
            if (r := data.get(f"prefill_{name}")) is not None:
                pts.append(Point(f"prefill_{name}", batch * length, 0.0,
                                 batch * causal_pairs(length), r["seconds"]))
        mean_ctx = data["ctx"] + 1 + 5 + (data["steps"] - 1) / 2  # as serving_gpu.py counts
        for key in sorted((k for k in data if k.startswith("decode_b")),
                          key=lambda k: int(k[len("decode_b"):])):
            batch = int(key[len("decode_b"):])
            pts.append(Point(key, batch, batch * mean_ctx, 0.0, data[key]["step_ms"] / 1e3))
        return pts

    @classmethod
    def fit(cls, data: dict[str, Any]) -> StepModel:
        """Least squares on relative error over `points(data)`; see the module docstring."""
        import numpy as np

        pts = cls.points(data)
        if len(pts) < 4:
            raise ValueError(f"need at least 4 measured points, got {[p.name for p in pts]}")
        y = np.array([p.seconds for p in pts])
        best: tuple[float, np.ndarray] | None = None
        # each point's GEMM term is floor_s (memory-bound) or tokens * token_s (compute-bound)
        for regime in itertools.product((False, True), repeat=len(pts)):
            if all(regime) or not any(regime):
                continue  # floor_s and token_s each need a point
            a = np.array([[0.0 if c else 1.0, p.tokens if c else 0.0, p.kv_tokens, p.pairs]
                          for p, c in zip(pts, regime)])
            x, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
            if (x < 0).any() or any((p.tokens * x[1] >= x[0]) != c
                                    for p, c in zip(pts, regime)):
                continue  # negative, or a point on the other side of the max() than assumed
            pred = np.array([max(x[0], p.tokens * x[1]) + x[2] * p.kv_tokens + x[3] * p.pairs
                             for p in pts])
            err = float((((pred - y) / y) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, x)
        if best is None:
            raise ValueError("no consistent fit (every regime gave a negative coefficient)")
        x = best[1]
        model = cls(floor_s=float(x[0]), token_s=float(x[1]), kv_token_s=float(x[2]),
                    pair_s=float(x[3]), kv_bytes_per_token=kv_bytes_per_token(data),
                    kv_capacity_tokens=int(data.get("num_blocks", 0)) * BLOCK_SIZE,
                    source=str(data.get("measured") or data.get("device", "")))
        model = replace(model, residuals={p.name: model.point_s(p) / p.seconds - 1
                                          for p in pts})
        return model.fit_mixed(data) if data.get("mixed") else model

    def fit_mixed(self, data: dict[str, Any]) -> StepModel:
        """The two mixed-step terms, least squares (relative) on what the pure form misses on
        bench/mixed_steps.py's mixed points: measured - pure = mixed_s + mixed_kv_token_s x
        decode KV tokens, both >= 0."""
        import numpy as np

        pure = replace(self, mixed_s=0.0, mixed_kv_token_s=0.0)
        rows = [r for r in data["mixed"] if r.get("seconds")]
        if len(rows) < 2:
            return pure
        y = np.array([r["seconds"] for r in rows])
        extra = y - np.array([pure.step_s(r["n"], r["batch"], r["decode_ctx"]) for r in rows])
        kv = np.array([r["batch"] * r["decode_ctx"] for r in rows], dtype=float)
        best: tuple[float, float, float] | None = None
        for a_cols in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):  # both, or one at zero
            a = np.stack([np.full_like(kv, a_cols[0]), kv * a_cols[1]], axis=1)
            x, *_ = np.linalg.lstsq(a / y[:, None], extra / y, rcond=None)
            x = np.maximum(x * np.array(a_cols), 0.0)
            err = float(((a @ x - extra) / y) @ ((a @ x - extra) / y))
            if best is None or err < best[0]:
                best = (err, float(x[0]), float(x[1]))
        assert best is not None
        model = replace(pure, mixed_s=best[1], mixed_kv_token_s=best[2])
        res = {f"mixed_B{r['batch']}_n{r['n']}": model.step_s(r["n"], r["batch"],
                                                              r["decode_ctx"]) / r["seconds"] - 1
               for r in rows}
        return replace(model, residuals={**self.residuals, **res})

    # ---- files -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepModel:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def kv_bytes_per_token(data: dict[str, Any]) -> int:
    """KV bytes per token, from the decode roofline's KV milliseconds at the measured copy
    rate (serving_gpu.py: kv_ms = batch * mean_ctx * bytes per token / copy rate)."""
    mean_ctx = data["ctx"] + 1 + 5 + (data["steps"] - 1) / 2
    for key in (k for k in data if k.startswith("decode_b")):
        batch = int(key[len("decode_b"):])
        return round(data[key]["kv_ms"] / 1e3 * data["copy_TBps"] * 1e12 / (batch * mean_ctx))
    return 0


def load(path: str | Path) -> StepModel:
    """A fitted model (`to_json`'s), or serving_gpu.py's measurements (fitted here)."""
    d = json.loads(Path(path).read_text())
    return StepModel.from_json(d) if "floor_s" in d else StepModel.fit(d)


def describe(m: StepModel, pts: Sequence[Point] = ()) -> str:
    lines = [f"floor_s {m.floor_s * 1e3:.3f} ms, token_s {m.token_s * 1e6:.2f} us "
             f"({1 / m.token_s / 1e3:.1f}k tokens/s), kv_token_s {m.kv_token_s * 1e9:.2f} ns, "
             f"pair_s {m.pair_s * 1e9:.3f} ns; mixed_s {m.mixed_s * 1e3:.3f} ms, "
             f"mixed_kv_token_s {m.mixed_kv_token_s * 1e9:.2f} ns; "
             f"kv_bytes_per_token {m.kv_bytes_per_token}, "
             f"kv_capacity_tokens {m.kv_capacity_tokens}"]
    for p in pts:
        lines.append(f"  {p.name:14s} measured {p.seconds * 1e3:9.3f} ms  model "
                     f"{m.point_s(p) * 1e3:9.3f} ms  {100 * (m.point_s(p) / p.seconds - 1):+.2f}%")
    return "\n".join(lines)


def check(data: dict[str, Any], model: StepModel | None = None) -> list[dict[str, Any]]:
    """The model (default: fitted on `data`'s pure points) against the mixed steps of
    bench/mixed_steps.py's JSON: for each (B decodes at their mean context, one n-token
    prefill chunk with no prior context) the measured and modelled seconds and the residual
    model / measured - 1; and the same for the pure decode steps measured beside them
    (`decode_only`, B decodes at their context)."""
    m = model or StepModel.fit(data)
    rows = []
    for r in data.get("mixed", []):
        if r.get("seconds"):
            pred = m.step_s(r["n"], r["batch"], r["decode_ctx"])
            rows.append({"point": f"mixed B={r['batch']} n={r['n']}", "batch": r["batch"],
                         "n": r["n"], "measured_s": r["seconds"], "model_s": pred,
                         "residual": pred / r["seconds"] - 1})
        if r.get("decode_only_seconds"):
            pred = m.decode_s(r["batch"], r["decode_only_ctx"])
            rows.append({"point": f"decode B={r['batch']} (beside n={r['n']})",
                         "batch": r["batch"], "n": 0, "measured_s": r["decode_only_seconds"],
                         "model_s": pred, "residual": pred / r["decode_only_seconds"] - 1})
    return rows
