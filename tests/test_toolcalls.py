"""Tool-call / reasoning parsing (pyflashmoe.toolcalls).

The model-output strings are rendered by the official chat templates themselves (Qwen3.5's XML
format from tests/data/qwen35_chat_template, Qwen3's JSON format from the Qwen3
tokenizer_config.json): an assistant turn with tool_calls is rendered, its text is fed to the
parser, and the parser must recover the calls the template was given. Literal strings cover the
edge cases (content before a call, several calls, reasoning, malformed and unterminated blocks).
"""
import json

import pytest

from pyflashmoe.tokenizer import Tokenizer
from pyflashmoe.toolcalls import (OutputParser, parse_output, parse_tool_calls,
                                  prompt_opens_thinking)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
        "units": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string"}, "exact": {"type": "boolean"}},
        "required": ["city"]}}}
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}

CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "zip": "75001",
                                          "units": {"temp": "C", "wind": ["km/h", 1]},
                                          "tags": ["a", "b c"], "note": "line one\nline \"two\"",
                                          "exact": True}},
    {"name": "search", "arguments": {"q": "weather {today} <b>"}},
]


@pytest.fixture(scope="module")
def qwen3_tok(test_data):
    return Tokenizer.from_dir(test_data.qwen3_tokenizer)


@pytest.fixture(scope="module")
def qwen35_tok(test_data):
    d = test_data.qwen3_tokenizer
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tpl = test_data.qwen35_chat_template.read_text()
    return Tokenizer(d / "tokenizer.json", cfg, chat_template=tpl)


def _assistant_text(tok, content, calls, reasoning=None):
    """The text the template writes for an assistant turn with tool calls (what a model that
    follows the template emits), without the <|im_start|>assistant header and <|im_end|>."""
    msgs = [{"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": content, "reasoning_content": reasoning,
             "tool_calls": [{"id": f"c{i}", "type": "function",
                             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                            for i, c in enumerate(calls)]}]
    text = tok.apply_chat_template(msgs, tools=[WEATHER_TOOL, SEARCH_TOOL], add_generation_prompt=False)
    start = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    return text[start:text.rindex("<|im_end|>")]


def _check_calls(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["type"] == "function" and g["id"].startswith("call_")
        assert g["function"]["name"] == w["name"]
        assert isinstance(g["function"]["arguments"], str)
        assert json.loads(g["function"]["arguments"]) == w["arguments"]


@pytest.mark.parametrize("which", ["qwen35", "qwen3"])
@pytest.mark.parametrize("content", ["", "Let me check."])
def test_template_round_trip(which, content, qwen3_tok, qwen35_tok):
    tok = qwen35_tok if which == "qwen35" else qwen3_tok
    text = _assistant_text(tok, content, CALLS)
    if which == "qwen35":
        assert "<function=get_weather>" in text and "<parameter=city>" in text
    else:
        assert '"name": "get_weather"' in text
    # the Qwen3.5 template writes an (empty) think block for the turn after the last user query
    res = parse_output(text, tools=[WEATHER_TOOL, SEARCH_TOOL])
    _check_calls(res.tool_calls, CALLS)
    assert res.content == content
    assert "<tool_call>" not in res.content and "<think>" not in res.content


def test_xml_values_json_or_string():
    out = ("<tool_call>\n<function=f>\n<parameter=a>\n42\n</parameter>\n<parameter=b>\nhello world\n"
           "</parameter>\n<parameter=c>\n{\"k\": [1, 2]}\n</parameter>\n<parameter=d>\nnull\n</parameter>\n"
           "<parameter=e>\n007\n</parameter>\n<parameter=f>\n  padded\n\n</parameter>\n</function>\n</tool_call>")
    _, calls = parse_tool_calls(out)
    args = json.loads(calls[0]["function"]["arguments"])
    assert args == {"a": 42, "b": "hello world", "c": {"k": [1, 2]}, "d": None, "e": "007",
                    "f": "  padded\n"}
    # with a schema that declares `a` a string, it stays a string
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}, "c": {"type": ["string", "object"]}}}}}]
    _, calls = parse_tool_calls(out, tools)
    args = json.loads(calls[0]["function"]["arguments"])
    assert args["a"] == "42" and args["c"] == {"k": [1, 2]}


def test_json_format_variants():
    out = ('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "noargs"}\n</tool_call>\n'
           '<tool_call>{"name": "strargs", "arguments": "{\\"a\\": 1}"}</tool_call>')
    content, calls = parse_tool_calls(out)
    assert content == ""
    assert [c["function"]["name"] for c in calls] == ["search", "noargs", "strargs"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "x"}, {}, {"a": 1}]
    assert len({c["id"] for c in calls}) == 3


def test_malformed_and_unterminated():
    bad = "Sure.\n<tool_call>\n{not json at all\n</tool_call>"
    content, calls = parse_tool_calls(bad)
    assert calls == [] and content == bad
    # an unterminated last block (cut by max_tokens) is still parsed when it can be
    cut = "<tool_call>\n<function=search>\n<parameter=q>\ncats\n</parameter>\n"
    content, calls = parse_tool_calls(cut)
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"q": "cats"}
    cut_json = '<tool_call>\n{"name": "search", "arguments": {"q": "ca'
    content, calls = parse_tool_calls(cut_json)
    assert calls == [] and content == cut_json
    # no tool calls at all
    assert parse_tool_calls("plain <b>text</b>") == ("plain <b>text</b>", [])


REASONING_CASES = [
    # (output, prompt opened <think>, expected reasoning, expected content, n calls)
    ("I think so.\n</think>\n\nThe answer is 4.", True, "I think so.", "The answer is 4.", 0),
    ("<think>\nhmm\n</think>\n\nHello!", False, "hmm", "Hello!", 0),
    ("Hello, no thinking here.", False, "", "Hello, no thinking here.", 0),
    ("\n\nstill thinking when cut", True, "still thinking when cut", "", 0),
    ("Need a tool.\n</think>\n\n<tool_call>\n<function=search>\n<parameter=q>\ncats\n</parameter>\n"
     "</function>\n</tool_call>", True, "Need a tool.", "", 1),
    ("<think>\nx < y and a <b>\n</think>\n\nLet me look.\n\n<tool_call>\n{\"name\": \"search\", "
     "\"arguments\": {\"q\": \"<think>\"}}\n</tool_call>", False, "x < y and a <b>", "Let me look.", 1),
    ("a <tool_ca and <thin but not tags </thi", False, "", "a <tool_ca and <thin but not tags </thi", 0),
]


@pytest.mark.parametrize("case", REASONING_CASES)
def test_reasoning_and_streaming_equivalence(case):
    out, opened, reasoning, content, ncalls = case
    whole = parse_output(out, in_reasoning=opened, tools=[SEARCH_TOOL])
    assert whole.reasoning == reasoning
    assert whole.content == content
    assert len(whole.tool_calls) == ncalls
    # streamed in pieces of every size: the concatenated deltas equal the whole-output result
    for step in (1, 2, 3, 7):
        p = OutputParser(in_reasoning=opened, tools=[SEARCH_TOOL], parse_tools=True)
        got = {"reasoning": "", "content": ""}
        for i in range(0, len(out), step):
            for kind, text in p.feed(out[i:i + step]):
                got[kind] += text
        events, calls = p.finish()
        for kind, text in events:
            got[kind] += text
        assert got["reasoning"] == reasoning, step
        assert got["content"] == content, step
        assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]


def test_tools_off_keeps_text():
    out = "<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>"
    res = parse_output(out, parse_tools=False)
    assert res.content == out and res.tool_calls == []


def test_prompt_opens_thinking(qwen35_tok, qwen3_tok):
    msgs = [{"role": "user", "content": "hi"}]
    assert prompt_opens_thinking(qwen35_tok.apply_chat_template(msgs))
    assert not prompt_opens_thinking(qwen35_tok.apply_chat_template(msgs, enable_thinking=False))
    assert not prompt_opens_thinking(qwen3_tok.apply_chat_template(msgs))
