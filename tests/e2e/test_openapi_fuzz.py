"""A bounded, seeded schemathesis run over OpenAI's OpenAPI description against `pdserve serve`
(a local 1 P + 1 D cluster on the built-in model): /v1/chat/completions, /v1/completions and
/v1/models never answer 5xx, whatever the body. One pass of every phase (examples, coverage,
fuzzing: 15 examples per operation), each operation checked to have been exercised; no time
budget, which schemathesis spends repeating the fuzzing phase until it runs out. The longer
run of the same command is in the README (Development)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.bench.test_clusters import wait_healthy
from tests.proxy.openapi_schema import SPEC, require_spec
from tests.workers.cluster import free_port_block

pytestmark = pytest.mark.timeout(420)
KEY = "sk-fuzz"
OPERATIONS = ("POST /chat/completions", "POST /completions", "GET /models")


def st_command(url: str, max_examples: int, report_dir: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "st"), "run", str(SPEC), "--url", url + "/v1",
            "--include-path-regex", "^/(chat/completions|completions|models)$",
            "--include-method-regex", "^(GET|POST)$", "--checks", "not_a_server_error",
            "--max-examples", str(max_examples), "--seed", "1", "--generation-deterministic",
            "--request-timeout", "120", "--no-shrink",
            "--header", f"Authorization: Bearer {KEY}",
            "--report", "junit", "--report-dir", str(report_dir)]


def test_no_5xx_from_a_bounded_schemathesis_run(procs, tmp_path):
    require_spec()
    port, workers = free_port_block(1), free_port_block(6)
    url = f"http://127.0.0.1:{port}"
    procs.start("proxy", "-m", "pdserve", "serve", "--port", str(port), "--worker-base-port",
                str(workers), "--api-key", KEY, "--max-model-len", "128")
    wait_healthy(procs, url, "proxy")
    reports = tmp_path / "reports"
    r = subprocess.run(st_command(url, max_examples=15, report_dir=reports),
                       capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)  # its .schemathesis/ cache
    assert r.returncode == 0 and "passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    # every operation the suite serves was exercised (not skipped) and passed
    [report] = reports.glob("*.xml")
    cases = {c.get("name"): c for c in ET.parse(report).iter("testcase")}
    for op in OPERATIONS:
        assert op in cases and not list(cases[op]), (op, report.read_text())
