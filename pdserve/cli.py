"""The `pdserve` command line: one subcommand per role, each built from its frozen config.

    pdserve serve [--prefill URL --decode URL]      the OpenAI API (a local cluster by default)
    pdserve prefill | decode | worker                one worker process of that role
    pdserve generate --prompt TEXT [--model PATH]    offline generation in this process
    pdserve bench | sagemaker | make-tiny-model      load generator, SageMaker entry, tiny model
    pdserve plan [--gpus N --workload PATH]          simulate layouts, recommend one

Expected failures (bad option, unreadable checkpoint, prompt too long, no internal token)
print one line naming the cause and exit non-zero (2 for configuration); a traceback means a
bug. `pdserve --help` lists every subcommand.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.common import UserError, __version__
from pdserve.common.internal_token import insecure_warning, start_problem
from pdserve.common.options import option
from pdserve.config import ConfigError, build_config, role_config
from pdserve.engine.config import EngineConfig


@dataclass(frozen=True)
class GenerateConfig(EngineConfig):
    """`pdserve generate`: an engine plus the prompts and how to sample them."""

    prompt: list[str] | None = option(None, help="Prompt text (repeat the flag or give several).")
    prompt_token_ids: str | None = option(
        None, help="Token-id prompts instead of text: '1,2,3' or a JSON list of lists.",
        metavar="IDS")
    max_tokens: int = option(16, check=lambda v: None if v >= 1 else "must be >= 1",
                             help="Tokens to generate per prompt.")
    temperature: float = option(0.0, check=lambda v: None if v >= 0 else "must be >= 0",
                                help="0 = greedy (the default here, for reproducible output).")
    ignore_eos: bool = option(False, help="Keep generating past end-of-sequence tokens.")
    json_output: bool = option(False, flag="--json", help="One JSON object per prompt.")


@dataclass(frozen=True)
class TinyModelConfig:
    """`pdserve make-tiny-model`: write a tiny random Hugging Face checkpoint."""

    out: str = option(help="Directory to write (created).", metavar="DIR")
    arch: str = option("llama", choices=("llama", "llama3", "qwen2", "mistral"),
                       help="Architecture family of the checkpoint.")
    seed: int = option(0, help="Seed of the random weights.")


def _parse_token_prompts(text: str) -> list[list[int]]:
    try:
        value = json.loads(text) if text.strip().startswith("[") else [
            [int(t) for t in text.split(",")]]
    except ValueError as e:
        raise ConfigError(f"--prompt-token-ids={text!r}: not '1,2,3' or a JSON list ({e})",
                          "prompt_token_ids") from e
    if value and all(isinstance(t, int) for t in value):
        value = [value]
    if not value or not all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value):
        raise ConfigError(f"--prompt-token-ids={text!r}: expected lists of integers",
                          "prompt_token_ids")
    return value


def run_generate(argv: Sequence[str]) -> int:
    cfg = build_config(GenerateConfig, argv, prog="pdserve generate",
                       description="Generate text offline with one engine in this process.")
    _setup_logging(cfg.log_level)
    prompts: list = list(cfg.prompt or [])
    if cfg.prompt_token_ids:
        prompts += [{"prompt_token_ids": p} for p in _parse_token_prompts(cfg.prompt_token_ids)]
    if not prompts:
        raise ConfigError("nothing to generate: give --prompt TEXT or --prompt-token-ids IDS",
                          "prompt")
    from pdserve import LLM, SamplingParams

    engine_kwargs = {f: getattr(cfg, f) for f in EngineConfig.__dataclass_fields__ if f != "model"}
    with LLM(cfg.model, **engine_kwargs) as llm:  # closing stops tensor-parallel ranks
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                ignore_eos=cfg.ignore_eos, seed=cfg.seed)
        outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    for out in outs:
        o = out.outputs[0]
        if cfg.json_output:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                              "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}))
        else:
            shown = out.prompt if out.prompt is not None else out.prompt_token_ids
            print(f"prompt: {shown!r}\noutput: {o.text!r}\ntoken_ids: {o.token_ids}  "
                  f"(finish: {o.finish_reason})\n")
    return 0


def run_make_tiny_model(argv: Sequence[str]) -> int:
    cfg = build_config(TinyModelConfig, argv, prog="pdserve make-tiny-model",
                       description="Write a tiny random Hugging Face checkpoint (with a small "
                       "tokenizer) for tests and demos. Needs transformers; no downloads.")
    _setup_logging("info")
    from pdserve.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(cfg.out, arch=cfg.arch, seed=cfg.seed)
    print(path)
    return 0


def run_worker_role(role: str | None) -> Callable[[Sequence[str]], int]:
    """`pdserve prefill|decode|worker`: one worker process until SIGTERM/SIGINT."""

    def run(argv: Sequence[str]) -> int:
        from pdserve.service.config import WorkerConfig

        argv = list(argv)
        if role is not None:
            if "--role" in argv:
                raise ConfigError(f"pdserve {role} fixes the role; use pdserve worker --role",
                                  "role")
            argv += ["--role", role]
        cfg = build_config(WorkerConfig, argv, prog=f"pdserve {role or 'worker'}",
                           description=WORKER_HELP)
        # refused here, before the engine (and torch) loads: the error comes at once
        problem = start_problem(cfg.internal_token, cfg.insecure_no_token, who="a worker")
        if problem:
            raise ConfigError(problem, "internal_token")
        try:
            cfg.public_host  # noqa: B018 - `--advertise-host auto` resolved before the engine loads
        except ValueError as e:
            raise ConfigError(str(e), "advertise_host") from e
        _setup_logging(cfg.log_level)
        if cfg.insecure_no_token:
            logging.getLogger("pdserve.worker").warning(insecure_warning(
                f"its ports ({cfg.port}, {cfg.data_address_port}"
                + (f", {cfg.kv_address_port}" if cfg.role == "decode" else "") + ")"))
        from pdserve.worker import run_worker

        return run_worker(cfg)

    return run


WORKER_HELP = ("Run one engine worker: prefill (P), decode (D) or both. It serves the proxy "
               "over a ZMQ data path (--data-port), moves KV between P and D (D listens on "
               "--kv-port), and answers operators on HTTP --port: /health /load /info /metrics.")

def run_serve_cmd(argv: Sequence[str]) -> int:
    from pdserve.serve import ServeConfig, run_serve
    from pdserve.vllm_args import translate

    argv, dropped = translate(argv)  # `vllm serve MODEL --trust-remote-code ...` habits
    cfg = build_config(ServeConfig, argv, prog="pdserve serve [MODEL]", description=(
        "The OpenAI-compatible proxy. With --prefill/--decode (or --worker) URLs it routes to "
        "running workers; with none it starts a local cluster (1 P + 1 D on the built-in model "
        "unless told otherwise) and serves it at http://127.0.0.1:8000/v1. MODEL (a local "
        "checkpoint folder) may come first, as in `vllm serve MODEL`; vLLM options pdserve has "
        "no use for are ignored with a warning, the other parallel sizes than "
        "--tensor-parallel-size are accepted at 1."))
    _setup_logging(cfg.log_level)
    if dropped:
        logging.getLogger("pdserve.serve").warning(
            "ignoring vLLM option(s): %s", "; ".join(f"{f} ({why})" for f, why in dropped))
    return run_serve(cfg)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (run_serve_cmd, "the OpenAI API over P/D workers (a local cluster by default)"),
    "generate": (run_generate, "offline generation with one engine in this process"),
    "prefill": (run_worker_role("prefill"), "run a prefill worker (P)"),
    "decode": (run_worker_role("decode"), "run a decode worker (D)"),
    "worker": (run_worker_role(None), "run a worker with --role both|prefill|decode"),
    "make-tiny-model": (run_make_tiny_model, "write a tiny random checkpoint (tests, demos)"),
    # SM_PDSERVE_* / SM_VLLM_* -> flags, port 8080, then exec `pdserve serve` (pdserve/sagemaker.py)
    "sagemaker": (lambda argv: __import__("pdserve.sagemaker", fromlist=["main"]).main(argv),
                  "serve configured SageMaker-style by SM_PDSERVE_*/SM_VLLM_* env (port 8080)"),
    # imported on use: the load generator needs none of the engine
    "bench": (lambda argv: __import__("pdserve.bench", fromlist=["run_bench"]).run_bench(argv),
              "load-test an OpenAI-compatible server (TTFT, TPOT, ITL, goodput)"),
    "plan": (lambda argv: __import__("pdserve.plan.planner", fromlist=["run_plan"]).run_plan(argv),
             "simulate layouts of N GPUs for a workload and SLOs; recommend one"),
}


def _register_roles() -> None:
    """Every role's config, so that a PDSERVE_* variable of another role (one environment
    for a whole cluster) is ignored while a typo is refused. Light imports: no torch."""
    from pdserve.bench import BenchConfig
    from pdserve.plan.planner import PlanConfig
    from pdserve.serve import ServeConfig
    from pdserve.service.config import WorkerConfig

    for name, cls in (("serve", ServeConfig), ("worker", WorkerConfig), ("bench", BenchConfig),
                      ("plan", PlanConfig),
                      ("generate", GenerateConfig), ("make-tiny-model", TinyModelConfig)):
        role_config(name)(cls)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _usage() -> str:
    lines = ["usage: pdserve COMMAND [options]   (pdserve COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<16} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Every option can also come from a PDSERVE_* environment variable or a "
              "--config YAML file (flags win, then environment, then file)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"pdserve {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pdserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _register_roles()
    try:
        return COMMANDS[name][0](rest)
    except ConfigError as e:
        print(f"pdserve {name}: error: {e}", file=sys.stderr)
        return 2
    except (UserError, ValueError) as e:
        print(f"pdserve {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
