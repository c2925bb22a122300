"""Grammar-constrained tool calls (issue 11 item 6): pyflashmoe.constrain.tool_call_constraint.

* The grammar accepts exactly what the Qwen3.5 chat template writes for a call (rendered by the
  shipped demo's own template) and rejects calls that break the function's JSON schema.
* The closing (token budget): for every prefix of a valid call, the completion the closer
  proposes is accepted by the grammar, and the completed text parses (pyflashmoe.toolcalls) into
  a call whose arguments match the schema (jsonschema).
* The shipped demo model, at K = 1, 2, 4 and 8 experts per token, answers every prompt of
  tests/data/toolcalls_demo.json (32 prompts, 13 tools) with a call that parses and matches its
  schema, with at most 64 new tokens. bench/toolcalls_demo.py runs the full grid (bits x K,
  constrained and not) for bench/RESULTS.md.
"""
import json
import os

import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pip install 'pyflashmoe[serve]')")
pytest.importorskip("jsonschema", reason="schema checks need jsonschema (test extra)")

import pyflashmoe  # noqa: E402
from pyflashmoe.constrain import (ToolCallGrammar, _regex_example, llg_tokenizer,  # noqa: E402
                                  tool_call_constraint)
from pyflashmoe.errors import ArgumentError  # noqa: E402
from pyflashmoe.tokenizer import Tokenizer  # noqa: E402
from pyflashmoe.toolcalls import (parse_output, prompt_opens_thinking,  # noqa: E402
                                  tool_call_errors)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(pyflashmoe.__file__), "demo", "model")
DATA = os.path.join(ROOT, "tests", "data", "toolcalls_demo.json")
SPECIAL = ["<tool_call>", "</tool_call>", "</think>"]  # single added tokens of the demo tokenizer
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def records():
    with open(DATA, encoding="utf-8") as f:
        return json.load(f)["records"]


@pytest.fixture(scope="module")
def all_tools(records):
    tools = {}
    for r in records:
        for t in r["tools"]:
            tools[t["function"]["name"]] = t
    return list(tools.values())


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def lltok(tok):
    return llg_tokenizer(tok.path, tok.vocab_size, [tok.token_to_id("<|im_end|>")])


def _matcher(lltok, grammar):
    import llguidance as llg
    return llg.LLMatcher(lltok, grammar, log_level=0)


def _accepts(lltok, grammar, text) -> bool:
    m = _matcher(lltok, grammar)
    toks = lltok.tokenize_str(text)
    if m.validate_tokens(toks) != len(toks):
        return False
    for t in toks:
        m.consume_token(t)
    return m.is_accepting()


CALLS = [
    {"name": "create_event", "arguments": {"title": "planning", "attendees": ["Ann", "Bob"],
                                           "when": {"date": "2026-03-14", "time": "10:00"}}},
    {"name": "set_alarm", "arguments": {"hour": 6, "minute": 30, "label": "wake up\nnow",
                                        "repeat_daily": True}},
    {"name": "set_alarm", "arguments": {"hour": 23, "minute": 0}},
    {"name": "convert_units", "arguments": {"value": 42.5, "from_unit": "km", "to_unit": "mile"}},
    {"name": "search_notes", "arguments": {"query": "budget", "limit": 3}},
    {"name": "rate_book", "arguments": {"title": "Moby Dick", "stars": 4, "tags": ["long", "classic"]}},
    {"name": "send_message", "arguments": {"to": "ann@example.org", "body": "I will be late."}},
    {"name": "list_books", "arguments": {}},
    {"name": "lookup_verse", "arguments": {"book": "Ruth", "chapter": 1, "verse": 16}},
]
BAD = [
    {"name": "set_alarm", "arguments": {"hour": 24, "minute": 0}},            # maximum
    {"name": "set_alarm", "arguments": {"minute": 0}},                         # required
    {"name": "convert_units", "arguments": {"value": 1, "from_unit": "m", "to_unit": "km"}},  # enum
    {"name": "send_message", "arguments": {"to": "Ann", "body": "x"}},         # pattern
    {"name": "rate_book", "arguments": {"title": "x", "stars": 2, "extra": 1}},  # unknown name
    {"name": "create_event", "arguments": {"title": "x", "when": {"date": "soon"}}},  # nested pattern
    {"name": "no_such_function", "arguments": {}},
]


def _template_call(tok, tools, call):
    """The call text the demo's chat template writes for an assistant turn with this call."""
    msg = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, msg], tools=tools,
                                   add_generation_prompt=False)
    start = text.find("<tool_call>", text.find("<|im_start|>assistant\n"))
    end = text.rfind("</tool_call>") + len("</tool_call>")
    return text[start:end]


def test_grammar_accepts_template_calls_and_rejects_schema_breaks(tok, lltok, all_tools):
    g = ToolCallGrammar(all_tools, special=SPECIAL).grammar()
    for call in CALLS:
        text = _template_call(tok, all_tools, call)
        assert text.startswith("<tool_call>") and _accepts(lltok, g, text), text
        out = parse_output(text, tools=all_tools)
        assert tool_call_errors(out.tool_calls, all_tools) == []
    for call in BAD:
        text = _template_call(tok, all_tools, call)
        assert not _accepts(lltok, g, text), text
    # a named function: only that one
    g1 = ToolCallGrammar(all_tools, name="set_alarm", special=SPECIAL).grammar()
    assert _accepts(lltok, g1, _template_call(tok, all_tools, CALLS[1]))
    assert not _accepts(lltok, g1, _template_call(tok, all_tools, CALLS[0]))
    # reasoning first (the prompt opened <think>), then exactly one call unless parallel
    gr = ToolCallGrammar(all_tools, reasoning=True, special=SPECIAL).grammar()
    one = _template_call(tok, all_tools, CALLS[2])
    assert _accepts(lltok, gr, "I should set it.\n</think>\n\n" + one)
    assert not _accepts(lltok, gr, one + "\n" + one)
    gp = ToolCallGrammar(all_tools, parallel=True, special=SPECIAL).grammar()
    assert _accepts(lltok, gp, one + "\n" + one)


def test_closer_completes_every_prefix(tok, lltok, all_tools):
    """Any prefix of a valid output + the closer's suffix is a complete output that the grammar
    accepts and whose call matches the schema. (Not covered: a prefix that ends inside a JSON
    string whose schema has a pattern, like create_event's when.date: the closer knows no
    completion there and leaves the model to finish the value.)"""
    for reasoning in (False, True):
        tg = ToolCallGrammar(all_tools, reasoning=reasoning, special=SPECIAL)
        g = tg.grammar()
        for call in CALLS[1:]:
            text = _template_call(tok, all_tools, call)
            if reasoning:
                text = "Let me see.\n</think>\n\n" + text
            for cut in range(0, len(text) + 1, 3):
                prefix = text[:cut]
                suffix = tg.close(prefix)
                assert suffix is not None, (call["name"], prefix)
                full = prefix + suffix
                assert _accepts(lltok, g, full), (prefix, suffix)
                out = parse_output(full, in_reasoning=reasoning, tools=all_tools)
                assert tool_call_errors(out.tool_calls, all_tools) == [], (prefix, suffix)


def test_regex_examples():
    import re
    for p in [r"^[a-z]+@[a-z]+\.[a-z]+$", r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", r"\d{3}-(ab|c)+x?",
              r"^[^@]+@x$", r"^(?:red|green)$"]:
        ex = _regex_example(p)
        assert ex is not None and re.search(p, ex), p


def test_argument_errors(tok):
    class M:
        tokenizer, n_vocab, eos_token_ids = tok, tok.vocab_size, {tok.token_to_id("<|im_end|>")}
    ok = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for tools, name, match in [
            ([], None, "non-empty list"),
            ([{"type": "function", "function": {"name": "a<b"}}], None, "cannot be written"),
            ([{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {}}, "required": ["y"]}}}], None, "requires 'y'"),
            ([ok], "g", "not in tools"),
            ([ok, ok], None, "listed twice")]:
        with pytest.raises(ArgumentError, match=match):
            tool_call_constraint(M(), tools, name=name)


def test_tool_call_errors():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
    call = lambda args: [{"function": {"name": "f", "arguments": json.dumps(args)}}]  # noqa: E731
    assert tool_call_errors(call({"n": 1}), tools) == []
    assert tool_call_errors([], tools) == ["no tool call"]
    assert "required" in tool_call_errors(call({}), tools)[0]
    assert "not 'g'" in tool_call_errors(call({"n": 1}), tools, name="g")[0]


def _engine_available():
    try:
        from pyflashmoe import _core
        return hasattr(_core, "Engine")
    except ImportError:
        return False


@pytest.mark.skipif(not _engine_available(), reason="needs the engine (pyflashmoe._core.Engine)")
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_demo_constrained_calls_always_valid(k, records):
    """Every prompt of the set, on the shipped demo at K experts per token, greedy, at most 64
    new tokens: the output holds a tool call that parses and matches its function's schema."""
    from pyflashmoe import Model
    m = Model.load(DEMO, experts_per_token=k, threads=2)
    bad = []
    for i, r in enumerate(records):
        name = None if r["tool_choice"] == "required" else r["tool_choice"]
        kw = {} if r.get("enable_thinking", True) else {"enable_thinking": False}
        prompt = m.tokenizer.apply_chat_template(r["messages"], tools=r["tools"],
                                                 add_generation_prompt=True, **kw)
        think = prompt_opens_thinking(prompt)
        c = tool_call_constraint(m, r["tools"], name=name, reasoning=think, max_tokens=MAX_TOKENS)
        text = m.generate_text(m.tokenizer.encode(prompt), max_tokens=MAX_TOKENS, temperature=0,
                               logits_processor=c)
        out = parse_output(text, in_reasoning=think, tools=r["tools"])
        errs = tool_call_errors(out.tool_calls, r["tools"], name)
        if errs or m.stats["finish_reason"] != "stop":
            bad.append((i, errs, m.stats["finish_reason"], text))
    assert not bad, bad
