"""The architecture holds: the layer contracts of pyproject.toml (import-linter) are kept, a
deliberately upward import breaks them, and the proxy process never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.workers.cluster import free_port_block

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def layout(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    """The installed layout (pdserve/engine, pdserve/proxy, ...) as links into this checkout,
    where `extra` adds modules ("common/x.py": source) to a copy of their folder."""
    root = tmp_path / "layout" / "pdserve"
    root.mkdir(parents=True)
    for f in (REPO / "pdserve").iterdir():
        (root / f.name).symlink_to(f)
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for pkg, folder in package_dir.items():  # pdserve/ links them already; check it does
        link = root / pkg.removeprefix("pdserve.")
        assert pkg == "pdserve" or link.resolve() == (REPO / folder).resolve(), link
    for name, source in (extra or {}).items():
        folder = root / Path(name).parent
        target = folder.resolve()
        folder.unlink()
        folder.mkdir()
        for f in target.glob("*.py"):
            (folder / f.name).symlink_to(f)
        (root / name).write_text(source)
    return root.parent


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    """`lint-imports` as typed at the repo root: pdserve/ links the sibling folders, so the
    checkout is the installed layout."""
    r = lint_imports(REPO)
    assert r.returncode == 0 and "2 kept, 0 broken" in r.stdout, r.stdout + r.stderr


def test_an_upward_import_breaks_the_contracts(tmp_path):
    r = lint_imports(layout(tmp_path, {"common/upward.py": "import pdserve.engine.kv_pool\n"}))
    assert r.returncode == 1 and "0 kept, 2 broken" in r.stdout, r.stdout + r.stderr
    assert "pdserve.common is not allowed to import pdserve.engine" in r.stdout
    assert "pdserve.common.upward -> pdserve.engine.kv_pool" in r.stdout


WATCH = """
import json, os, sys, threading, time, httpx
from pdserve.cli import main

def watch(port):
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton")
                   or m.startswith("transformers.models.") or "modeling" in m)
    print(json.dumps({"status": status, "heavy": heavy, "tokenizer": "transformers" in sys.modules}),
          flush=True)
    os._exit(0)

port = int(sys.argv[1])
threading.Thread(target=watch, args=(port,), daemon=True).start()
main(["serve", "--prefill", "http://127.0.0.1:9", "--decode", "http://127.0.0.1:10",
      "--port", str(port), "--insecure-no-token"])
"""


@pytest.mark.timeout(120)
def test_the_proxy_process_imports_no_torch():
    """`pdserve serve --prefill URL --decode URL`, in one process, up to answering /health
    (503: nothing listens there): no torch, triton or transformers model code was imported
    (the tokenizer, transformers' tokenizer code, was)."""
    port = free_port_block(1)
    out = subprocess.run([sys.executable, "-c", WATCH, str(port)], capture_output=True,
                         text=True, timeout=100)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"status": 503, "heavy": [], "tokenizer": True}, out.stderr[-2000:]
