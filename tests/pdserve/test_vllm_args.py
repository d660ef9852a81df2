"""`pdserve serve` reads a vLLM command line (pdserve/vllm_args.py): the positional model,
vLLM-only options dropped with their reason, parallel sizes accepted at 1 only, and every
option of serve's own left as it is."""

from __future__ import annotations

import pytest

from pdserve.config import ConfigError
from pdserve.sagemaker import VLLM_DROPPED
from pdserve.vllm_args import translate


def test_positional_model_and_dropped_vllm_options() -> None:
    args, dropped = translate([
        "/models/llama", "--tensor-parallel-size", "1", "--trust-remote-code",
        "--enable-chunked-prefill", "true", "--max-seq-len-to-capture=8192",
        "--quantization", "none", "--port", "9000", "--max-model-len", "4096",
        "--no-uvloop", "--disable-log-requests"])
    assert args == ["--model", "/models/llama", "--tensor-parallel-size", "1", "--port", "9000",
                    "--max-model-len", "4096", "--no-uvloop"]
    assert dropped == [(f, VLLM_DROPPED[f[2:]]) for f in (
        "--trust-remote-code", "--enable-chunked-prefill", "--max-seq-len-to-capture",
        "--disable-log-requests")]


def test_tensor_parallel_size_is_serves_own() -> None:
    """Its workers shard on the CPU (GPU workers refuse it at start, with the reason)."""
    assert translate(["m", "--tensor-parallel-size", "2"]) == (
        ["--model", "m", "--tensor-parallel-size", "2"], [])


def test_vllm_switches_serve_has_under_its_own_name() -> None:
    assert translate(["m", "--disable-uvicorn-access-log", "--port", "1"]) == (
        ["--model", "m", "--no-access-log", "--port", "1"], [])


def test_vllm_async_scheduling_switch_means_on() -> None:
    assert translate(["m", "--async-scheduling", "--port", "1"]) == (
        ["--model", "m", "--async-scheduling", "on", "--port", "1"], [])
    assert translate(["m", "--async-scheduling"])[0] == ["--model", "m", "--async-scheduling",
                                                         "on"]
    assert translate(["--async-scheduling", "off"]) == (["--async-scheduling", "off"], [])


def test_serve_options_and_unknown_ones_pass_through() -> None:
    # unknown to both: left for serve's parser, which names it (and suggests a close one)
    assert translate(["--max-model-lenn", "5", "--model", "m"]) == (
        ["--max-model-lenn", "5", "--model", "m"], [])
    assert translate([]) == ([], [])


@pytest.mark.parametrize("argv, needle", [
    (["--pipeline-parallel-size=4"], "does not shard"),
    (["--data-parallel-size", "2"], "--num-prefill / --num-decode"),
    (["--quantization", "awq"], "unquantized checkpoints only"),
    (["/m", "--model", "/n"], "the model is given twice"),
])
def test_refused_with_the_reason(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        translate(argv)
