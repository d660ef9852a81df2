"""A `StructuredOutputs` spec as llguidance's grammar text (no tokenizer, no torch: the proxy
checks requests with it, the engines build their token masks from it, engine/structured.py).
JSON is compiled with fixed separators and no free whitespace: random weights would
otherwise wander in it, and a schema's own "x-guidance" options may not loosen that."""

from __future__ import annotations

import json

from pdserve.common.params import StructuredOutputs

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for `spec`; ValueError (with llguidance's reason) if it does
    not compile. Needs no tokenizer: the proxy checks requests with it too."""
    from llguidance import LLMatcher, grammar_from

    try:
        if spec.json is not None:
            grammar = LLMatcher.grammar_from_json_schema(spec.json, overrides=JSON_OPTIONS)
        elif spec.regex is not None:
            grammar = grammar_from("regex", spec.regex)
        elif spec.choice is not None:
            grammar = grammar_from("choice", json.dumps(list(spec.choice)))
        else:
            grammar = grammar_from("grammar", spec.grammar or "")
        problem = LLMatcher.validate_grammar(grammar)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - ValueError, RuntimeError, or a Rust panic
        # (pyo3's PanicException is a BaseException): all mean this spec does not compile
        raise ValueError(f"{spec.kind}: {e}") from e
    if problem and not problem.startswith("WARNING"):
        raise ValueError(f"{spec.kind}: {problem}")
    return grammar
