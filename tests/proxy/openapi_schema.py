"""Validate bodies against the OpenAI OpenAPI description (/work/shared/data, beside the
checkout as ../shared/data), after rewriting OpenAPI 3.0's `nullable: true` into JSON Schema.

One deliberate relaxation: `CreateCompletionResponse` says it is also the shape of streamed
chunks, but marks `finish_reason` non-null, while the real API (and vLLM) stream null until the
last chunk; streamed completion chunks are checked against a copy that admits null there.

A second: completions with `echo` and `logprobs` report the prompt's logprobs first, and the
first prompt token has none (nothing predicts it): `token_logprobs[0]` and `top_logprobs[0]`
are null, as OpenAI's own legacy API and vLLM answer (and lm-eval reads), while the schema's
arrays hold numbers and objects only; both completion shapes admit null items there.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SPEC = DATA_DIR / "openai-openapi.yaml"
URI = "urn:openai-openapi"
COMPLETION_CHUNK = "PdserveCompletionStreamChunk"


def _rewrite_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _rewrite_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        if "type" in node:
            t = node["type"]
            node["type"] = (t + ["null"] if "null" not in t else t) if isinstance(t, list) \
                else [t, "null"]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = node["enum"] + [None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _validators() -> Any:
    import jsonschema
    import referencing
    import referencing.jsonschema
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SPEC, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=loader)
    schemas = doc["components"]["schemas"]
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    fr = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    fr["type"] = [fr["type"], "null"]
    fr["enum"] = fr["enum"] + [None]
    schemas[COMPLETION_CHUNK] = chunk
    for shape in (schemas["CreateCompletionResponse"], chunk):
        lps = shape["properties"]["choices"]["items"]["properties"]["logprobs"]["anyOf"][0][
            "properties"]
        for key in ("token_logprobs", "top_logprobs"):
            lps[key]["items"] = {"anyOf": [lps[key]["items"], {"type": "null"}]}
    doc = {"components": _rewrite_nullable(doc["components"])}
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource(URI, resource)
    return jsonschema, registry


def require_spec() -> None:
    if not SPEC.exists():
        pytest.skip(f"OpenAI OpenAPI description not found at {SPEC} (../shared/data beside "
                    "the checkout)")


def validate(name: str, obj: Any) -> None:
    """Raise jsonschema.ValidationError unless `obj` is a valid `#/components/schemas/name`."""
    require_spec()
    jsonschema, registry = _validators()
    schema = {"$ref": f"{URI}#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
