"""Tool calling on /v1/chat/completions, as OpenAI defines it and vLLM serves it.

`tool_choice`:
- "none": the tools reach the chat template; the output is text.
- a named function ({"type": "function", "function": {"name": ...}}): the output is
  constrained to that function's `parameters` schema (a structured-output grammar) and
  returned as one tool call whose arguments are the output; finish_reason "stop".
- "required": the output is constrained to a JSON array of {"name", "parameters"} objects,
  one of the tools each (vLLM's format); returned as tool calls, finish_reason "tool_calls".
- "auto" (the default when tools are given): free text, parsed afterwards for the model
  family's tool-call format; needs `--enable-auto-tool-choice` and `--tool-call-parser`
  (`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; `llama3_json`: a JSON
  object {"name": ..., "parameters": {...}}, optionally after `<|python_tag|>`, several
  separated by ";"). Calls found: finish_reason "tool_calls", the text around them the content.

Streaming: a named call's arguments stream as they are drawn; "required" and "auto" hold the
text from where a call may begin and send the calls, whole, with the finish (the SDK assembles
tool_calls deltas either way).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pdserve.proxy.errors import OpenAIError

PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_OPEN = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_EMPTY_PARAMS = {"type": "object", "properties": {}}


def call_id() -> str:
    return "call_" + os.urandom(12).hex()


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema; OpenAIError for a malformed tool."""
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise OpenAIError(f"tools.{i} must be {{\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"parameters\": {...}}}", param=f"tools.{i}")
        params = fn.get("parameters") or _EMPTY_PARAMS
        if not isinstance(params, dict):
            raise OpenAIError(f"tools.{i}.function.parameters must be a JSON schema object",
                              param=f"tools.{i}.function.parameters")
        out[fn["name"]] = params
    return out


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice ask of the output."""

    mode: str  # "named" | "required" | "auto"
    functions: dict[str, dict[str, Any]]
    name: str | None = None  # named
    parser: str | None = None  # auto

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow (None: free text)."""
        if self.mode == "named":
            assert self.name is not None
            return self.functions[self.name]
        if self.mode == "required":
            return {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": name},
                                                  "parameters": params},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, params in self.functions.items()]}}
        return None

    # ---- a whole output ------------------------------------------------------------------

    def calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of one choice's whole text."""
        if self.mode == "named":
            return None, [_call(self.name or "", text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut short (max_tokens): no calls, the text as content
                return text, []
            return None, [_call(it["name"], json.dumps(it["parameters"], ensure_ascii=False))
                          for it in items]
        return parse_calls(self.parser or "", text)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parsed_call(obj: Any, args_key: str) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return _call(obj["name"], args if isinstance(args, str)
                 else json.dumps(args, ensure_ascii=False))


def parse_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Tool calls in free text, per `parser`; (content, calls). Text that holds none (or
    none that parses) is all content."""
    if parser == "hermes":
        calls = []
        for m in _HERMES.finditer(text):
            try:
                c = _parsed_call(json.loads(m.group(1)), "arguments")
            except ValueError:
                c = None
            if c is not None:
                calls.append(c)
        if not calls:
            return text, []
        content = text[:text.find(_HERMES_OPEN)].strip()
        return content or None, calls
    if parser == "llama3_json":
        body = text.strip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        dec = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = dec.raw_decode(body, pos)
            except ValueError:
                return text, []
            c = _parsed_call(obj, "parameters")
            if c is None:
                return text, []
            calls.append(c)
            pos = end
            while pos < len(body) and body[pos] in " \t\n;":
                pos += 1
        return None, calls
    raise ValueError(f"unknown tool-call parser {parser!r}")


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               *, auto_parser: str | None) -> ToolPlan | None:
    """The plan for a request (None: no tool calling); OpenAIError (400) for a bad choice
    or "auto" on a server started without a parser."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan("required", functions)
    if choice == "auto":
        if auto_parser is None:
            raise OpenAIError('"auto" tool choice needs the server started with '
                              "--enable-auto-tool-choice and --tool-call-parser; or send "
                              'tool_choice "required", "none" or a named function',
                              param="tool_choice")
        return ToolPlan("auto", functions, parser=auto_parser)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise OpenAIError(f"tool_choice names function {name!r}, which is not one of "
                              f"the tools {sorted(functions)}", param="tool_choice")
        return ToolPlan("named", functions, name=name)
    raise OpenAIError('tool_choice must be "none", "auto", "required" or {"type": '
                      '"function", "function": {"name": ...}}', param="tool_choice")


@dataclass
class _ChoiceState:
    text: str = ""  # everything drawn
    sent: int = 0  # characters of it sent as content (auto) or arguments (named)
    holding: bool = False  # a call may have begun: hold the rest until the finish
    started: bool = False  # named: the call's header went out


@dataclass
class ToolStream:
    """Streaming deltas of one request's choices under a plan."""

    plan: ToolPlan
    _choices: dict[int, _ChoiceState] = field(default_factory=dict)

    def delta(self, index: int, text: str, finish: str | None
              ) -> tuple[dict[str, Any], str | None]:
        """(the delta to send, the finish reason to report) for one update."""
        st = self._choices.setdefault(index, _ChoiceState())
        st.text += text
        plan = self.plan
        if plan.mode == "named":
            if not text:
                return {}, finish
            if not st.started:
                st.started = True
                return {"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                        "function": {"name": plan.name, "arguments": text}}]}, \
                    finish
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}, finish
        delta: dict[str, Any] = {}
        if plan.mode == "auto" and not st.holding:
            safe = self._safe_content(st)
            if safe:
                delta["content"] = safe
        if finish is None:
            return delta, None
        content, calls = plan.calls(st.text)
        if not calls:  # nothing parsed: whatever was held is content after all
            rest = st.text[st.sent:]
            if rest:
                delta["content"] = delta.get("content", "") + rest
            return delta, finish
        if content is not None and plan.parser == "hermes":  # the text before the first call
            rest = st.text[st.sent:st.text.find(_HERMES_OPEN)].rstrip()
            if rest:
                delta["content"] = delta.get("content", "") + rest
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        return delta, "tool_calls"

    def _safe_content(self, st: _ChoiceState) -> str:
        """auto: the content that cannot be part of a call, sent now; from where a call may
        begin the text is held."""
        text = st.text
        if self.plan.parser == "llama3_json":
            if st.sent == 0 and text.strip() and text.lstrip()[0] in "{<":
                st.holding = True  # a call (or the python tag) opens the output
                return ""
            if not text.strip():
                return ""
            out, st.sent = text[st.sent:], len(text)
            return out
        start = text.find(_HERMES_OPEN, max(0, st.sent - len(_HERMES_OPEN)))
        if start >= 0:
            st.holding = True
            out, st.sent = text[st.sent:start], start
            return out
        # hold a suffix that could begin "<tool_call>"
        keep = next((k for k in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1)
                     if _HERMES_OPEN.startswith(text[-k:])), 0)
        end = len(text) - keep
        out, st.sent = text[st.sent:end], max(st.sent, end)
        return out
