"""The OpenAI-compatible endpoints end to end with the official `openai` Python client against a
real `flashmoe serve` process on 127.0.0.1 serving the embedded demo model (its Qwen3.5 chat
template teaches thinking and the XML tool-call format): chat streaming and not, completions,
tool calls forced by tool_choice, JSON-schema output, logprobs, and errors surfacing as the
client's exception types with the field in `param`. Few tokens per request: the whole module
takes seconds once the server is up."""
import json
import os
import sys

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'pyflashmoe[serve]')")
pytest.importorskip("uvicorn", reason="flashmoe serve needs uvicorn (pip install 'pyflashmoe[serve]')")
pytest.importorskip("llguidance", reason="tool_choice / json_schema need llguidance (pip install 'pyflashmoe[serve]')")
openai = pytest.importorskip("openai", reason="needs the official openai client (pip install openai)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema")

from pyflashmoe import generate as G  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from serve_process import serve_process  # noqa: E402

KEY = "sk-local-test"
HI = [{"role": "user", "content": "Tell me a story about the sea."}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm",
    "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "loud": {"type": "boolean"}},
        "required": ["hour"], "additionalProperties": False}}}
TOOLS = [WEATHER, ALARM]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    """`flashmoe serve` of the demo model with an API key and a small body limit (64 KiB)."""
    with serve_process(G.DEMO_MODEL_DIR, "--model-name", "demo", "--api-key", KEY,
                       "--max-body", "64KiB") as (proc, url):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["demo"]


def test_chat_non_streaming_and_streaming(client):
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=8, temperature=0,
                                       extra_body=NO_THINK)
    ch = r.choices[0]
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")
    assert ch.message.role == "assistant" and ch.message.content
    assert ch.finish_reason in ("length", "stop") and ch.logprobs is None
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="demo", messages=HI, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=NO_THINK)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ch.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ch.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # thinking on (the demo template's default): reasoning comes apart from the content
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=6, temperature=0)
    assert r.choices[0].message.model_extra.get("reasoning_content")


def test_completions(client):
    r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, temperature=0)
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.text and ch.finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ch.text
    # token ids as the prompt, echo
    r = client.completions.create(model="demo", prompt=[1, 2, 3], max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text and r.usage.prompt_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "set_alarm"}),
    ({"type": "function", "function": {"name": "set_alarm"}}, {"set_alarm"}),
])
def test_tool_calls_forced(client, choice, names, stream):
    kw = dict(model="demo", messages=HI, tools=TOOLS, tool_choice=choice, max_tokens=64,
              temperature=1.0, seed=2, parallel_tool_calls=False, extra_body=NO_THINK)
    if stream:
        calls, finish = {}, None
        for c in client.chat.completions.create(stream=True, **kw):
            for d in c.choices[0].delta.tool_calls or ():
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            finish = c.choices[0].finish_reason or finish
        got = [(v["name"], v["arguments"]) for _, v in sorted(calls.items())]
    else:
        ch = client.chat.completions.create(**kw).choices[0]
        finish = ch.finish_reason
        got = [(t.function.name, t.function.arguments) for t in ch.message.tool_calls]
        assert all(t.type == "function" and t.id for t in ch.message.tool_calls)
    assert finish == "tool_calls"
    (name, args), = got
    assert name in names
    jsonschema.validate(json.loads(args), SCHEMAS[name])


def test_tool_result_round_trip(client):
    """The assistant's call and a tool message go back in: the template renders them (200)."""
    first = client.chat.completions.create(model="demo", messages=HI, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64, temperature=0,
                                           extra_body=NO_THINK).choices[0].message
    call = first.tool_calls[0]
    msgs = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="demo", messages=msgs, tools=[WEATHER], max_tokens=4,
                                       temperature=0, extra_body=NO_THINK)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output(client, stream):
    kw = dict(model="demo", messages=[{"role": "user", "content": "Describe a sailor as JSON."}],
              response_format={"type": "json_schema", "json_schema": {
                  "name": "person", "schema": PERSON, "strict": True}},
              max_tokens=60, temperature=0)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_with_the_clients_parse_helper(client):
    """client.chat.completions.parse(response_format=<pydantic model>) sends a strict
    json_schema and parses the answer into the model."""
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="demo", messages=[{"role": "user", "content": "A sailor as JSON."}],
              response_format=Person, max_tokens=60, temperature=0)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and 0 <= p.age <= 120


def test_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=NO_THINK)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    streamed = [e for c in client.chat.completions.create(
        model="demo", messages=HI, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
        stream=True, extra_body=NO_THINK) if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    c = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=4,
                                  temperature=0, logprobs=2).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)


@pytest.mark.parametrize("kw,param", [
    ({"temperature": 500}, "temperature"),
    ({"top_logprobs": 3}, "top_logprobs"),                  # needs logprobs=True
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"max_tokens": 10 ** 6}, "max_tokens"),                # above the served context
    ({"max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
    ({"stop": [""]}, "stop.0"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
])
def test_errors_are_bad_request_errors_with_the_param(client, kw, param):
    kw = {"model": "demo", "messages": HI, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(**kw)
    e = ei.value
    assert e.status_code == 400 and e.param == param, e.body
    assert e.type == "invalid_request_error" and param.split(".")[0] in e.message


def test_other_errors(client, server):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="demo", prompt="x", max_tokens=2, logprobs=9)
    assert ei.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as ei:  # the served context is 4096 tokens
        client.completions.create(model="demo", prompt="x", max_tokens=5000)
    assert ei.value.param == "max_tokens" and "context length" in ei.value.message
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    assert ei.value.code == "model_not_found" and ei.value.param == "model"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.chat.completions.create(model="demo", messages=HI, max_tokens=1)
    assert ei.value.code == "invalid_api_key"
    # the body limit (--max-body 64KiB): 413 naming the limit and the option
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="demo", max_tokens=1,
                                       messages=[{"role": "user", "content": "x" * 70000}])
    e = ei.value
    assert e.status_code == 413 and e.code == "request_too_large" and "--max-body" in e.message
    # and the server is still fine
    assert client.chat.completions.create(model="demo", messages=HI, max_tokens=1).choices


def test_n_choices(client):
    """n > 1 (decoded together, up to --parallel): one choice per index, each with its own
    logprobs; streamed chunks carry their choice's index."""
    r = client.chat.completions.create(model="demo", messages=HI, max_tokens=4, temperature=1.0,
                                       seed=3, n=2, logprobs=True, extra_body=NO_THINK)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert "".join(e.token for e in c.logprobs.content) == c.message.content
    seen = {c.choices[0].index for c in client.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=3, temperature=1.0, n=2, stream=True)
        if c.choices}
    assert seen == {0, 1}
