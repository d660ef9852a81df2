"""What a grammar costs the decode loop (issue 19): decode tokens/s of one engine at batch 32
with and without a JSON-schema constraint, the same prompts and seeds, same run.

The schema keeps every row drawing (an object whose one string is unbounded), so both modes
decode `--tokens` tokens a row; tokens/s counts the steps where every row decodes (prefill
steps excluded). Median of `--runs` runs, alternating plain and constrained. Default: the
built-in model on the CPU. `--llama3-8b` (GPU): Llama-3-8B shapes with dummy weights and the
built-in tokenizer padded to the 128,256-token vocabulary (no Llama 3 tokenizer offline: the
grammar's mask walks this smaller tokenizer, so its cost is a lower bound). JSON out, a table
last.

    python bench/structured.py [--device cpu] [--batch 32] [--tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"],
          "additionalProperties": False}


def run(engine, prompts, structured, tokens: int, seed: int) -> tuple[float, int]:
    """Decode tokens and seconds over the steps where every row decodes."""
    from pdserve import SamplingParams

    reqs = [engine.add_request(p, SamplingParams(temperature=1.0, seed=seed + i,
                                                 max_tokens=tokens, structured=structured))
            for i, p in enumerate(prompts)]
    secs, toks = 0.0, 0
    while engine.has_unfinished():
        decoding = all(r.seqs and r.seqs[0].output_token_ids for r in reqs)
        t0 = time.perf_counter()
        out = engine.step()
        dt = time.perf_counter() - t0
        if decoding and len(out) == len(reqs):
            secs += dt
            toks += len(out)
    return secs, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama3-8b", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(0)
    from pdserve.common.params import StructuredOutputs
    from pdserve.engine.builtin_model import builtin_model_path
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.setup import build_engine

    model = builtin_model_path()
    kw: dict = {}
    if args.llama3_8b:  # 8B shapes, dummy weights, the built-in tokenizer files beside them
        import shutil

        from serving_gpu import LLAMA3_8B

        d = Path(tempfile.mkdtemp())
        for f in Path(model).iterdir():
            if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
                shutil.copy(f, d / f.name)
        (d / "config.json").write_text(json.dumps(LLAMA3_8B))
        model, kw = d, {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": 2048}
    parts = build_engine(EngineConfig(model=str(model), device=args.device,
                                      max_num_seqs=args.batch, **kw), progress=False)
    engine = LLMEngine(parts)
    vocab = parts.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, min(vocab, 4000), (64,), generator=gen).tolist()
               for _ in range(args.batch)]
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    res: dict = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                 "batch": args.batch, "tokens": args.tokens, "runs": {"plain": [],
                                                                      "json_schema": []}}
    run(engine, prompts, None, 4, 0)  # warm up
    run(engine, prompts, spec, 4, 0)
    for r in range(args.runs):
        for name, s in (("plain", None), ("json_schema", spec)):
            secs, toks = run(engine, prompts, s, args.tokens, 100 * r)
            res["runs"][name].append(toks / secs if secs else 0.0)
    for name in ("plain", "json_schema"):
        res[name + "_tokens_per_s"] = statistics.median(res["runs"][name])
    res["slowdown_pct"] = 100 * (1 - res["json_schema_tokens_per_s"] / res["plain_tokens_per_s"])
    out = Path(args.out) / "structured.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}, batch {args.batch}, {args.tokens} tokens a row, median of "
          f"{args.runs}; JSON {out}")
    print("| decode | tokens/s |\n|---|---|")
    print(f"| plain | {res['plain_tokens_per_s']:.0f} |")
    print(f"| JSON schema | {res['json_schema_tokens_per_s']:.0f} "
          f"({res['slowdown_pct']:+.1f}% slower) |")


if __name__ == "__main__":
    main()
