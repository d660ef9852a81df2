"""A CPU install without triton (it is the `gpu` extra's) serves on the torch references: the
kernel modules import, the engine draws the same tokens as with triton installed, and asking
for the Triton backend, or launching a kernel, says what to install."""

from __future__ import annotations

import json
import subprocess
import sys

from pdserve import SamplingParams
from pdserve.engine.llm import LLM

# run in a fresh interpreter where `import triton` fails as it does when not installed
_CHILD = r"""
import json, sys
sys.modules["triton"] = None  # import triton -> ImportError, as on a CPU install
import torch
torch.set_num_threads(1)
from pdserve import SamplingParams
from pdserve.engine.llm import LLM
from pdserve.kernels import ops, triton_utils
from pdserve.kernels.norm import rms_norm

assert not triton_utils.HAVE_TRITON
errors = {}
try:
    ops.get_ops("triton", "cuda")
except ValueError as e:
    errors["get_ops"] = str(e)
try:
    x = torch.ones(2, 16)
    rms_norm(x, torch.ones(16), 1e-6)
except ModuleNotFoundError as e:
    errors["launch"] = str(e)
llm = LLM(sys.argv[1], use_tqdm_on_load=False, num_gpu_blocks_override=64)
outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}],
                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print(json.dumps({"ops": llm.parts.runner.ops.name, "tokens": outs[0].outputs[0].token_ids,
                  "errors": errors, "loaded": "triton" in sys.modules and sys.modules["triton"] is not None}))
"""


def test_cpu_engine_runs_without_triton(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                         "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    child = json.loads(r.stdout.strip().splitlines()[-1])
    assert child["ops"] == "torch" and not child["loaded"]
    assert "pip install 'pdserve[gpu]'" in child["errors"]["get_ops"]
    assert "Triton is not installed" in child["errors"]["launch"]
    llm = LLM(str(path), use_tqdm_on_load=False, num_gpu_blocks_override=64)
    want = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert child["tokens"] == list(want)
