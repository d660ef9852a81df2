"""Tool calling (proxy/tools.py): plans from tools + tool_choice, the parsers of "auto", and
the streamed deltas the openai SDK assembles into the same calls as the whole response."""

from __future__ import annotations

import json

import pytest

from pdserve.proxy.errors import OpenAIError
from pdserve.proxy.tools import ToolStream, parse_calls, plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def test_plans():
    assert plan_tools(None, None, auto_parser=None) is None
    assert plan_tools([WEATHER], "none", auto_parser=None) is None
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                       auto_parser=None)
    assert named.mode == "named" and named.schema() == {"type": "object", "properties": {}}
    req = plan_tools([WEATHER, TIME], "required", auto_parser=None)
    schema = req.schema()
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [o["properties"]["name"] for o in schema["items"]["anyOf"]] == [
        {"const": "get_weather"}, {"const": "get_time"}]
    assert plan_tools([WEATHER], None, auto_parser="hermes").mode == "auto"  # the default


@pytest.mark.parametrize("tools, choice, param, why", [
    ([WEATHER], None, "tool_choice", "--enable-auto-tool-choice"),
    ([WEATHER], "auto", "tool_choice", "--enable-auto-tool-choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "not one of"),
    ([WEATHER], "sometimes", "tool_choice", "must be"),
    (None, "required", "tool_choice", "needs tools"),
    ([{"type": "function", "function": {}}], "required", "tools.0", "must be"),
])
def test_bad_plans_are_400s_naming_the_parameter(tools, choice, param, why):
    with pytest.raises(OpenAIError) as e:
        plan_tools(tools, choice, auto_parser=None)
    assert e.value.status_code == 400 and e.value.param == param and why in e.value.message


def test_hermes_parser():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_calls("hermes", text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert parse_calls("hermes", "just text <tool_call>{not json}</tool_call>") == (
        "just text <tool_call>{not json}</tool_call>", [])


def test_llama3_json_parser():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = parse_calls("llama3_json", text)
    assert content is None
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"}, {}]
    assert parse_calls("llama3_json", "Hello {there}") == ("Hello {there}", [])
    assert parse_calls("llama3_json", '{"name": "x", "parameters": {') == (
        '{"name": "x", "parameters": {', [])


def assemble(stream: ToolStream, pieces: list[str], finish: str) -> dict:
    """Feed pieces as one choice's updates; assemble the deltas as the openai SDK does."""
    content, calls, last = "", {}, None
    for i, p in enumerate(pieces):
        delta, fin = stream.delta(0, p, finish if i == len(pieces) - 1 else None)
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            slot["id"] = tc.get("id") or slot["id"]
            fn = tc.get("function", {})
            slot["name"] = fn.get("name") or slot["name"]
            slot["arguments"] += fn.get("arguments") or ""
        last = fin
    return {"content": content, "calls": [calls[k] for k in sorted(calls)], "finish": last}


def test_named_call_streams_its_arguments():
    plan = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}},
                      auto_parser=None)
    got = assemble(ToolStream(plan), ['{"ci', 'ty": "Li', 'ma"}'], "stop")
    assert got["content"] == "" and got["finish"] == "stop"
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [
        ("get_weather", '{"city": "Lima"}')]


def test_required_calls_come_whole_with_the_finish():
    plan = plan_tools([WEATHER, TIME], "required", auto_parser=None)
    text = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": ' \
           '{"city": "Kyiv"}}]'
    got = assemble(ToolStream(plan), [text[:10], text[10:40], text[40:]], "stop")
    assert got["finish"] == "tool_calls" and got["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
        ("get_time", {}), ("get_weather", {"city": "Kyiv"})]
    # cut short: no calls, the text is the content
    cut = assemble(ToolStream(plan), [text[:30]], "length")
    assert cut == {"content": text[:30], "calls": [], "finish": "length"}


def test_auto_hermes_streams_content_and_holds_a_call():
    plan = plan_tools([WEATHER], "auto", auto_parser="hermes")
    pieces = ["Sure", ", one moment <tool", '_call>{"name": "get_weather", ',
              '"arguments": {"city": "Quito"}}</tool_call>']
    stream = ToolStream(plan)
    first, _ = stream.delta(0, pieces[0], None)
    assert first == {"content": "Sure"}  # content streams at once
    second, _ = stream.delta(0, pieces[1], None)
    assert second == {"content": ", one moment "}  # "<tool" held: it may open a call
    got = assemble(stream, pieces[2:], "stop")
    assert got["finish"] == "tool_calls" and got["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
        ("get_weather", {"city": "Quito"})]
    # no call after all: the held text is content at the finish
    plain = assemble(ToolStream(plan), ["a <tool", "box> b"], "stop")
    assert plain == {"content": "a <toolbox> b", "calls": [], "finish": "stop"}


def test_auto_llama3_json_holds_from_an_opening_brace():
    plan = plan_tools([WEATHER], "auto", auto_parser="llama3_json")
    got = assemble(ToolStream(plan), ['{"name": "get_wea', 'ther", "parameters": {"city": '
                                      '"Lagos"}}'], "stop")
    assert got["content"] == "" and got["finish"] == "tool_calls"
    assert json.loads(got["calls"][0]["arguments"]) == {"city": "Lagos"}
    assert assemble(ToolStream(plan), ["Hello", " world"], "stop") == {
        "content": "Hello world", "calls": [], "finish": "stop"}


def test_auto_tool_choice_needs_a_parser_at_start():
    from pdserve.config import ConfigError
    from pdserve.serve import ServeConfig, run_serve

    with pytest.raises(ConfigError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        run_serve(ServeConfig(enable_auto_tool_choice=True, decode=["http://127.0.0.1:9"],
                              internal_token="t" * 32))
