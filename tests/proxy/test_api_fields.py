"""docs/api-fields.md's table, walked: each row's example gets the status the row names
(honoured and ignored: 200; refused: 400 naming the field), on each endpoint the row names;
every field the request models declare, and every name the protocol refuses or ignores by
design, has a row with that status."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.proxy.protocol import (
    IGNORED,
    NOT_IMPLEMENTED,
    ChatCompletionRequest,
    CompletionRequest,
)
from tests.proxy.conftest import MODEL

pytestmark = pytest.mark.timeout(120)
DOC = Path(__file__).resolve().parents[2] / "docs" / "api-fields.md"
PATHS = {"chat": "/v1/chat/completions", "cmpl": "/v1/completions"}
BASE = {"chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "cmpl": {"prompt": "hi", "max_tokens": 2}}


def rows() -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- fields:start -->", 1)[1].split("<!-- fields:end -->", 1)[0]
    out = []
    for line in table.strip().splitlines()[2:]:  # after the header and its rule
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        field, endpoint, status, example, notes = cells
        out.append({"field": field.strip("`"), "endpoints": ["chat", "cmpl"] if endpoint == "both"
                    else [endpoint], "status": status, "example": json.loads(example.strip("`")),
                    "notes": notes})
    return out


ROWS = rows()


def test_the_table_covers_every_declared_and_designed_field() -> None:
    by_name = {r["field"]: r for r in ROWS}
    assert len(by_name) == len(ROWS), "a field has two rows"
    for endpoint, model in (("chat", ChatCompletionRequest), ("cmpl", CompletionRequest)):
        for name in model.model_fields:
            assert name in by_name, f"{name} ({endpoint}) has no row in {DOC.name}"
            assert endpoint in by_name[name]["endpoints"], f"{name}: endpoint {endpoint}"
    for name in NOT_IMPLEMENTED:
        assert by_name[name]["status"] == "refused", name
    for name in IGNORED:
        assert by_name[name]["status"] == "ignored", name
    assert {r["status"] for r in ROWS} == {"honoured", "ignored", "refused"}


@pytest.mark.parametrize("row, endpoint", [(r, e) for r in ROWS for e in r["endpoints"]],
                         ids=lambda x: x["field"] if isinstance(x, dict) else x)
def test_each_row_gets_its_status(http: httpx.Client, row: dict[str, Any], endpoint: str) -> None:
    body = {"model": MODEL, **BASE[endpoint], **row["example"]}
    path = PATHS[endpoint]
    if body.get("stream"):
        with http.stream("POST", path, json=body) as r:
            status = r.status_code
            payload = r.read()
            if status == 200:
                events = payload.decode().split("\n\n")
                assert any("[DONE]" in e for e in events), payload
    else:
        r = http.post(path, json=body)
        status, payload = r.status_code, r.content
    if row["status"] == "refused":
        assert status == 400, (row["field"], payload)
        assert json.loads(payload)["error"]["param"] == row["field"], payload
    else:
        assert status == 200, (row["field"], endpoint, payload)
