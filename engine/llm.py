"""The offline API, as vLLM users know it:

    from pdserve import LLM, SamplingParams
    llm = LLM(model="/path/to/checkpoint")   # or LLM() for the built-in tiny model
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason

A prompt is a string (needs a tokenizer) or {"prompt_token_ids": [...]}; as in vLLM, a dict
prompt may add "cache_salt": "<secret>" so its prefix-cache blocks are shared only with
prompts of the same salt.

`LLM(model, tensor_parallel_size=2)` splits the model over two processes (this one and one
it starts; `engine/parallel.py`); `llm.close()` or `with LLM(...) as llm:` stops the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pdserve.common.params import SamplingParams
from pdserve.common.prefix import check_cache_salt
from pdserve.common.wire import Logprob
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import Request
from pdserve.engine.setup import EngineParts, build_engine

PromptType = str | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per output position, when asked


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    # params.prompt_logprobs: per prompt token (None for the first), its own entry first
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class LLM:
    """An engine in this process. Keyword arguments are `EngineConfig` fields (vLLM names)."""

    def __init__(self, model: str | None = None, *, use_tqdm_on_load: bool = True, **kwargs: Any):
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"LLM() got unknown option(s) {unknown}; options are {sorted(names)}")
        self.config = EngineConfig(model=model, **kwargs)
        self.parts: EngineParts = build_engine(self.config, progress=use_tqdm_on_load)
        self.engine = LLMEngine(self.parts)
        self._next_request = 0

    @property
    def tokenizer(self):
        return self.parts.tokenizer

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (`tensor_parallel_size` > 1); idempotent.
        They also stop when this object is collected or the interpreter exits."""
        self.parts.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.parts.tokenizer is None:
                raise ValueError("this engine has no tokenizer (token-ids-only mode): pass "
                                 "{'prompt_token_ids': [...]} instead of text")
            return prompt, self.parts.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list | tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")

    @staticmethod
    def _cache_salt(prompt: PromptType) -> str | None:
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        check_cache_salt(salt)
        return salt

    def generate(
        self, prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. All prompts are
        checked before any runs, so a bad one fails the call without partial work."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self._prompt_ids(p) for p in prompts]
        salts = [self._cache_salt(p) for p in prompts]
        for (_, ids), sp in zip(encoded, params, strict=True):
            self.engine.check_prompt(ids, sp)
        reqs: list[Request] = []
        for (_, ids), sp, salt in zip(encoded, params, salts, strict=True):
            reqs.append(self.engine.add_request(ids, sp, request_id=str(self._next_request),
                                                cache_salt=salt))
            self._next_request += 1
        bar = tqdm(total=len(reqs), desc="Generating", disable=not use_tqdm, leave=False)
        try:
            done = 0
            prompt_logprobs: dict[str, list] = {}
            while self.engine.has_unfinished():
                for row in self.engine.step():
                    if row.prompt_logprobs is not None:
                        prompt_logprobs[row.request_id] = row.prompt_logprobs
                now = sum(r.finished for r in reqs)
                bar.update(now - done)
                done = now
        except BaseException:
            for r in reqs:
                self.engine.abort(r)
            raise
        finally:
            bar.close()
        return [RequestOutput(r.request_id, text, r.prompt_token_ids,
                              [self._completion(s) for s in sorted(r.seqs, key=lambda s: s.choice_index)],
                              prompt_logprobs=self._decoded(prompt_logprobs.get(r.request_id)))
                for (text, _), r in zip(encoded, reqs, strict=True)]

    def _decoded(self, positions: list | None) -> list | None:
        """Logprob entries with their token's text (vLLM's decoded_token)."""
        tok = self.parts.tokenizer
        if positions is None or tok is None:
            return positions
        return [None if pos is None else
                {t: Logprob(lp.logprob, lp.rank, tok.decode([t], skip_special_tokens=False))
                 for t, lp in pos.items()} for pos in positions]

    def _completion(self, seq) -> CompletionOutput:
        tok = self.parts.tokenizer
        logprobs = self._decoded(seq.logprobs)
        return CompletionOutput(
            index=seq.choice_index,
            text=tok.decode(seq.output_token_ids) if tok is not None else "",
            token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            cumulative_logprob=seq.cumulative_logprob if logprobs is not None else None,
            logprobs=logprobs)
