"""`StepRates`: what an engine's steps cost, measured, for its load reports (the proxy's
placement estimates from them: proxy/placement.py). Torch-free: the real engines
(engine/llm_engine.py) and the fake ones (bench/fake_worker.py) report alike."""

from __future__ import annotations


class StepRates:
    """What this engine's steps cost, measured (exponentially weighted, `ALPHA` per step):
    prompt tokens per second over steps that prefilled (in a mixed step, per second beyond
    a decode step's time: `observe`) and the duration of steps without prompt tokens (decode steps) with
    their batch size. The proxy's placement estimates TTFT and ITL from them (its load
    reports carry `as_load()`); None until measured. On GPU a step ends with its tokens
    copied to the host, so its wall time is its device time."""

    ALPHA = 0.2

    def __init__(self) -> None:
        self.prefill_tokens_per_s: float | None = None
        self.decode_step_s: float | None = None
        self.decode_batch: float | None = None
        # the marginal rate in mixed steps only (prompt chunks beside decodes): what a
        # prompt costs the streams of a worker that decodes (proxy/placement.py)
        self.mixed_prefill_tokens_per_s: float | None = None

    @classmethod
    def _mix(cls, old: float | None, new: float) -> float:
        return new if old is None else old + cls.ALPHA * (new - old)

    def observe(self, prefill_tokens: int, num_seqs: int, seconds: float,
                decodes: int = 0) -> None:
        """One step: its prompt tokens, its sequences (`decodes` of them decoding) and its
        duration. A mixed step's decodes would have cost about a decode step anyway, so its
        prompt tokens are charged what it took beyond that (at least a tenth of it): the
        marginal rate, which a placement estimate adds to the decode step it measures."""
        if seconds <= 0:
            return
        if prefill_tokens:
            spent = seconds
            if decodes and self.decode_step_s is not None:
                spent = max(seconds - self.decode_step_s, 0.1 * seconds)
                self.mixed_prefill_tokens_per_s = self._mix(self.mixed_prefill_tokens_per_s,
                                                            prefill_tokens / spent)
            self.prefill_tokens_per_s = self._mix(self.prefill_tokens_per_s,
                                                  prefill_tokens / spent)
        else:
            self.decode_step_s = self._mix(self.decode_step_s, seconds)
            self.decode_batch = self._mix(self.decode_batch, float(num_seqs))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def as_load(self) -> dict[str, float]:
        out = {}
        if self.prefill_tokens_per_s is not None:
            out["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 1)
        if self.mixed_prefill_tokens_per_s is not None:
            out["mixed_prefill_tokens_per_s"] = round(self.mixed_prefill_tokens_per_s, 1)
        if self.decode_step_s is not None:
            out["decode_step_ms"] = round(self.decode_step_s * 1e3, 3)
            out["decode_batch"] = round(self.decode_batch or 0.0, 2)
        return out
