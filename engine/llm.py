"""The offline API, as vLLM users know it:

    from pdserve import LLM, SamplingParams
    llm = LLM(model="/path/to/checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason

A prompt is a string (needs a tokenizer) or {"prompt_token_ids": [...]}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.engine.setup import EngineParts, build_engine

PromptType = str | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    """An engine in this process. Keyword arguments are `EngineConfig` fields (vLLM names)."""

    def __init__(self, model: str, *, use_tqdm_on_load: bool = True, **kwargs: Any):
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
        for _, ids in encoded:
            self.engine.check_prompt(ids)
        seqs: list[Sequence] = [self.engine.add_request(ids, sp)
                                for (_, ids), sp in zip(encoded, params, strict=True)]
        bar = tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm, leave=False)
        try:
            while self.engine.has_unfinished():
                bar.update(len(self.engine.step()))
        except BaseException:
            for s in seqs:
                self.engine.abort(s)
            raise
        finally:
            bar.close()
        outs = []
        for (text, ids), seq in zip(encoded, seqs, strict=True):
            rid = str(self._next_request)
            self._next_request += 1
            out_text = (self.parts.tokenizer.decode(seq.output_token_ids)
                        if self.parts.tokenizer is not None else "")
            outs.append(RequestOutput(rid, text, ids, [CompletionOutput(
                0, out_text, list(seq.output_token_ids), seq.finish_reason)]))
        return outs
