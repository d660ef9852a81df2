"""`pdserve serve` takes a vLLM command line: `pdserve serve MODEL --tensor-parallel-size 1
--trust-remote-code ...` works as `vllm serve` users type it.

- A first word that is not an option is the model (`--model`), as in `vllm serve MODEL`.
- vLLM options pdserve has no equivalent for are dropped with one warning naming each and
  why (pdserve/sagemaker.py's tables, shared with the SageMaker form); the parallel sizes
  are accepted at 1 and refused otherwise with the reason, except `--tensor-parallel-size`,
  which is serve's own (each worker sharded over its ranks); `--quantization` only as none.
- `--disable-uvicorn-access-log` is `--no-access-log`, `--disable-log-stats` is
  `--stats-interval 0`; vLLM's bare switch `--async-scheduling` is `--async-scheduling on`.
- Every `pdserve serve` option keeps its meaning: a name serve knows is never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.config import ConfigError
from pdserve.sagemaker import VLLM_DROPPED, VLLM_ONLY_NONE, VLLM_ONLY_ONE, serve_options

# vLLM's switches among the dropped options (no value follows them)
BARE = frozenset({
    "trust-remote-code", "enable-chunked-prefill", "no-enable-chunked-prefill",
    "disable-log-requests", "enable-log-requests", "disable-log-stats",
    "disable-fastapi-docs", "disable-frontend-multiprocessing", "disable-custom-all-reduce",
    "enable-server-load-tracking"})
_BOOL_WORDS = frozenset({"true", "false"})
# vLLM switches serve has under its own name
RENAMED = {"disable-uvicorn-access-log": "--no-access-log",
           "disable-log-stats": "--stats-interval=0"}
# vLLM switches that are serve options taking one of these values: bare, they mean "on"
SWITCH_TO_ON = {"async-scheduling": ("auto", "on", "off")}


def translate(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(serve's own argv, [(dropped vLLM flag, why)]); ConfigError for a refused value."""
    args = list(argv)
    out: list[str] = []
    dropped: list[tuple[str, str]] = []
    if args and not args[0].startswith("-"):  # `vllm serve MODEL`
        if any(a == "--model" or a.startswith("--model=") for a in args[1:]):
            raise ConfigError(f"the model is given twice: {args[0]!r} and --model", "model")
        out += ["--model", args.pop(0)]
    known = serve_options()
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, inline = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        if name in SWITCH_TO_ON and not eq and (i + 1 == len(args)
                                                or args[i + 1] not in SWITCH_TO_ON[name]):
            out += [word, "on"]  # vLLM's switch; serve's option takes auto/on/off
            i += 1
            continue
        # a parallel size is checked here even where serve has the option
        # (--tensor-parallel-size is serve's own, not one of them)
        if not name or ((name in known or (name.startswith("no-") and name[3:] in known))
                        and name not in VLLM_ONLY_ONE):
            out.append(word)
            i += 1
            continue
        if name in RENAMED and not eq:
            out.append(RENAMED[name])
            i += 1
            continue
        value: str | None = inline if eq else None
        takes_value = name not in BARE
        if value is None and i + 1 < len(args) and not args[i + 1].startswith("--") and (
                takes_value or args[i + 1].lower() in _BOOL_WORDS):
            value = args[i + 1]
            i += 1
        i += 1
        if name in VLLM_ONLY_ONE:
            if value is None or value.strip() != "1":
                why = VLLM_ONLY_ONE[name].format(local_devices="--local-devices",
                                                 tensor_parallel="--tensor-parallel-size",
                                                 num_engines="--num-prefill / --num-decode")
                raise ConfigError(f"--{name} {value or ''}".rstrip() + f": {why}", name)
            continue  # 1 is what pdserve does anyway
        if name in VLLM_ONLY_NONE:
            if (value or "").strip().lower() not in ("", "none"):
                raise ConfigError(f"--{name} {value}: {VLLM_ONLY_NONE[name]}", name)
            continue
        if name in VLLM_DROPPED:
            dropped.append((f"--{name}", VLLM_DROPPED[name]))
            continue
        out.append(word)  # not vLLM's either: serve's parser names it (and suggests)
        if value is not None and not eq:
            out.append(value)
    return out, dropped
