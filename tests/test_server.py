"""The OpenAI-compatible server (pyflashmoe.server), in process through FastAPI's TestClient.

A tiny random Qwen3.5-MoE model (tests/tiny_models.py, converted at 16 bits) with the tiny
tokenizer of test_generate.py serves real requests: the server's output must equal what
Model.generate gives for the chat template's prompt, streams must be framed as Server-Sent Events,
JSON-constrained output must parse and validate (jsonschema) even from a random model.
Tool calls are driven by test_generate's scripted fake engine, with the official Qwen3.5 and Qwen3
chat templates, so the model "emits" exactly the format each template teaches.
"""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'pyflashmoe[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("llguidance", reason="JSON constraints need llguidance (pip install 'pyflashmoe[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from pyflashmoe import generate as G  # noqa: E402
from pyflashmoe.server import Server, build_app  # noqa: E402
from pyflashmoe.tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_generate import FakeEngine, FakeSession, _engine_available, _tiny_tokenizer  # noqa: E402
from serve_process import free_port, serve_process  # noqa: E402

_BUILT: dict = {}


def build_tiny(tmp_path_factory, test_data):
    """Converted tiny model dir with a tokenizer and the Qwen3 chat template (built once per
    session; test_chat.py reuses it)."""
    if not _engine_available():
        pytest.skip("needs the engine (pyflashmoe._core.Engine)")
    if "dir" not in _BUILT:
        from pyflashmoe.convert import convert
        from tiny_models import make_tiny_hf
        base = tmp_path_factory.mktemp("serve_tiny")
        hf = base / "hf"
        make_tiny_hf("qwen3_5_moe", str(hf), seed=5)
        _tiny_tokenizer(hf, test_data)
        out = base / "tiny-moe"
        convert(str(hf), str(out), bits=16, group_size=32, progress=False)
        _BUILT["dir"] = out
    return _BUILT["dir"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, test_data):
    return build_tiny(tmp_path_factory, test_data)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return G.Model.load(tiny_dir, threads=2)


@pytest.fixture(scope="module")
def client(model):
    return TestClient(build_app(Server(model, "tiny-moe")))


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


def _chat(client, **kw):
    body = {"messages": MSGS, "max_tokens": 12, "temperature": 0}
    body.update(kw)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(resp):
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line;
    the last one is [DONE]."""
    text = resp.text
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    out = []
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev, repr(ev)
        out.append(json.loads(ev[len("data: "):]))
    return out


def _ref_text(model, msgs, n, **kw):
    ids = model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    pieces = list(model.generate(ids, max_tokens=n, **kw))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason, len(ids), len(pieces)


# ----------------------------------------------------------------------------- basics
def test_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    d = r.json()
    assert d["object"] == "list" and [m["id"] for m in d["data"]] == ["tiny-moe"]
    assert d["data"][0]["object"] == "model"
    assert client.get("/v1/models/tiny-moe").json()["id"] == "tiny-moe"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["engine_thread"] == "alive" and h["queue_depth"] == 0
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_chat_matches_model_generate(client, model):
    d = _chat(client)
    text, finish, n_prompt, n_gen = _ref_text(model, MSGS, 12, temperature=0)
    assert d["object"] == "chat.completion" and d["model"] == "tiny-moe"
    ch = d["choices"][0]
    assert ch["message"]["role"] == "assistant"
    assert ch["message"]["content"] == text
    assert ch["finish_reason"] == finish
    assert d["usage"]["prompt_tokens"] == n_prompt
    assert d["usage"]["completion_tokens"] == n_gen
    assert d["usage"]["total_tokens"] == n_prompt + n_gen
    # max_completion_tokens is the newer spelling of max_tokens
    d2 = _chat(client, max_tokens=None, max_completion_tokens=5)
    assert d2["usage"]["completion_tokens"] <= 5


def test_streaming_sse(client):
    ref = _chat(client, max_tokens=16)["choices"][0]
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": MSGS, "max_tokens": 16, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()
    chunks = _sse(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    body = [c for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert text == ref["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in body]
    assert finishes[-1] == ref["finish_reason"] and all(f is None for f in finishes[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    # without include_usage: no usage chunk
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": MSGS, "max_tokens": 4, "stream": True}) as r:
        r.read()
    assert all(c["choices"] for c in _sse(r))


def test_stop_strings(client, model):
    full = _chat(client, max_tokens=24)["choices"][0]["message"]["content"]
    assert len(full) > 6
    stop = full[3:6]
    cut = full[:full.find(stop)]
    d = _chat(client, max_tokens=24, stop=[stop, "zzzz-not-there"])
    assert d["choices"][0]["message"]["content"] == cut
    assert d["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": MSGS, "max_tokens": 24, "temperature": 0, "stop": stop,
                             "stream": True}) as r:
        r.read()
    chunks = _sse(r)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_determinism(client):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95)
    a = _chat(client, seed=11, **kw)["choices"][0]["message"]["content"]
    b = _chat(client, seed=11, **kw)["choices"][0]["message"]["content"]
    c = _chat(client, seed=12, **kw)["choices"][0]["message"]["content"]
    assert a == b
    assert a != c


def test_completions(client, model):
    prompt = "ROMEO: I"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    ref = list(model.generate(prompt, max_tokens=10, temperature=0))
    assert d["object"] == "text_completion"
    assert d["choices"][0]["text"] == "".join(p.text for p in ref)
    assert d["choices"][0]["finish_reason"] == ref[-1].finish_reason
    assert d["usage"]["prompt_tokens"] == len(model.tokenizer.encode(prompt, add_special_tokens=True))
    # token-id prompt, echo, list-of-one prompt
    ids = model.tokenizer.encode(prompt)
    d2 = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": 0}).json()
    assert d2["choices"][0]["text"] == d["choices"][0]["text"]
    d3 = client.post("/v1/completions", json={"prompt": [prompt], "max_tokens": 10, "temperature": 0,
                                              "echo": True}).json()
    assert d3["choices"][0]["text"] == prompt + d["choices"][0]["text"]
    # streaming
    with client.stream("POST", "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}) as r:
        r.read()
    chunks = _sse(r)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == d["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == d["choices"][0]["finish_reason"]
    # seeded sampling is reproducible here too
    kw = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    t1 = client.post("/v1/completions", json=kw).json()["choices"][0]["text"]
    t2 = client.post("/v1/completions", json=kw).json()["choices"][0]["text"]
    assert t1 == t2


# ----------------------------------------------------------------------------- JSON output
def test_json_object(client):
    jsonschema = pytest.importorskip("jsonschema")
    assert jsonschema
    # unconstrained, the random model does not write JSON ...
    free = _chat(client, max_tokens=40, temperature=1.0, seed=1)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)
    # ... constrained, it must
    for seed in range(4):
        d = _chat(client, max_tokens=200, temperature=1.0, seed=seed,
                  response_format={"type": "json_object"})
        ch = d["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        assert isinstance(json.loads(ch["message"]["content"]), dict)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "admin": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "mood", "admin", "scores", "address"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema(client, stream):
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed, temp in ((0, 0.0), (1, 1.0), (2, 1.0)):
        body = {"messages": MSGS, "max_tokens": 300, "temperature": temp, "seed": seed,
                "response_format": rf}
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
                r.read()
            chunks = _sse(r)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            d = _chat(client, **body)
            text, finish = d["choices"][0]["message"]["content"], d["choices"][0]["finish_reason"]
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_constraint_on_completions(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    d = client.post("/v1/completions", json={
        "prompt": "Answer:", "max_tokens": 50, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}).json()
    assert isinstance(json.loads(d["choices"][0]["text"])["ok"], bool)


# ----------------------------------------------------------------------------- errors
OK = {"role": "user", "content": "hi"}
BAD_CHAT = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.0}, "min_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"seed": "abc"}, "seed"),
    ({"n": 2}, "n"),
    ({"stop": [""]}, "stop.0"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": 1}, "stream_options"),
    ({"presence_penalty": 7}, "presence_penalty"),
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [OK, "x"]}, "messages.1"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [OK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [OK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": [1]}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [OK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object",
                                                                            "minProperties": "x"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    # limits (issue 9): values the server used to accept, clamp or crash on
    ({"max_tokens": 1e300}, "max_tokens"),
    ({"max_tokens": 513}, "max_tokens"),  # the tiny model's context is 512
    ({"max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": 101}, "temperature"),
    ({"top_k": 1e20}, "top_k"),
    ({"top_k": 10 ** 6}, "top_k"),
    ({"repetition_penalty": 1e9}, "repetition_penalty"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop": "x" * 513}, "stop"),
    ({"chat_template_kwargs": {"chat_template": "{{ 'owned' }}"}}, "chat_template_kwargs.chat_template"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),  # was a 500
    ({"chat_template_kwargs": {"tools": None}}, "chat_template_kwargs.tools"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": [OK] * 4097}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
]


@pytest.mark.parametrize("extra,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_requests(client, extra, param):
    body = {"messages": [OK], "max_tokens": 2}
    body.update(extra)
    if body["messages"] is None:
        del body["messages"]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_validation_messages_say_what_was_wrong(client):
    """The request bodies are pydantic models (pyflashmoe.api_models) that FastAPI validates; the
    one error reported names the field as a dotted path and says what was wrong and what came."""
    cases = [({"temperature": 101}, "temperature", "'temperature' must be <= 100, got 101"),
             ({"stream": "yes"}, "stream", "'stream' must be a boolean, got 'yes'"),
             ({"max_tokens": 2.5}, "max_tokens", "'max_tokens' must be an integer, got 2.5"),
             ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role",
              "'messages.0.role' must be 'system', 'developer', 'user', 'assistant' or 'tool', got 'bot'"),
             ({"response_format": {"type": "xml"}}, "response_format.type",
              "'response_format.type' must be one of 'text', 'json_object', 'json_schema', got 'xml'"),
             ({"messages": []}, "messages", "'messages' must be a non-empty list"),
             ({"max_tokens": 10 ** 6}, "max_tokens",
              "'max_tokens' must be <= 512 (the model's context length), got 1000000")]
    for extra, param, msg in cases:
        r = client.post("/v1/chat/completions", json={"messages": [OK], "max_tokens": 2, **extra})
        assert r.status_code == 400
        assert r.json() == {"error": {"message": msg, "type": "invalid_request_error",
                                      "param": param, "code": None}}, r.text
    # unknown fields are ignored, as before
    r = client.post("/v1/chat/completions", json={"messages": [OK], "max_tokens": 1, "whatever": 1})
    assert r.status_code == 200, r.text
    # FastAPI knows the request models (its OpenAPI schema lists them)
    names = set(client.get("/openapi.json").json()["components"]["schemas"])
    assert {"ChatCompletionRequest", "CompletionRequest", "MessagesRequest",
            "CountTokensRequest"} <= names


def test_bad_bodies_and_completions(client, model):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    cases = [({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": ""}, "prompt"),
             ({"prompt": [1, model.n_vocab + 7]}, "prompt"), ({"prompt": "x", "suffix": "y"}, "suffix"),
             ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "temperature": -0.5}, "temperature"),
             ({"prompt": "x", "echo": "yes"}, "echo")]
    for body, param in cases:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    # a prompt longer than the context
    r = client.post("/v1/completions", json={"prompt": [5] * model.context_length})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "word " * model.context_length}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # the server is still fine afterwards
    assert _chat(client, max_tokens=3)["usage"]["completion_tokens"] == 3


def test_concurrent_requests_queue(client, model):
    """Requests arriving together are served one at a time, each with its own correct answer."""
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(4)]
    want = [_ref_text(model, p, 10, temperature=0)[0] for p in prompts]
    got = [None] * 4

    def worker(i):
        r = client.post("/v1/chat/completions", json={"messages": prompts[i], "max_tokens": 10,
                                                      "temperature": 0, "stream": i % 2 == 1})
        if i % 2:
            got[i] = "".join(c["choices"][0]["delta"].get("content") or "" for c in _sse(r))
        else:
            got[i] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_abandoned_stream_releases_the_model(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": MSGS, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        it = r.iter_lines()
        assert next(it).startswith("data: ")
    # the client went away after the first event; the next request must not hang
    done = {}

    def later():
        done["r"] = _chat(client, max_tokens=3)

    t = threading.Thread(target=later)
    t.start()
    t.join(60)
    assert "r" in done and done["r"]["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- tool calls
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"},
                                                    "zip": {"type": "string"}},
                   "required": ["city"]}}}
TOOL_MSGS = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def _tok(test_data, template):
    d = test_data.qwen3_tokenizer
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tpl = None
    if template == "qwen35":
        tpl = test_data.qwen35_chat_template.read_text()
    return Tokenizer(d / "tokenizer.json", cfg, chat_template=tpl)


def _fake_client(tok, script_text, msgs, tools, **template_kw):
    """A server over the scripted fake engine: after the prompt the request will render, greedy
    decoding replays script_text and then EOS."""
    ids = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True,
                                  **template_kw)
    eng = FakeEngine(tok.vocab_size, tok.encode(script_text) + [tok.eos_token_id], len(ids))
    m = G.Model(eng, FakeSession, tokenizer=tok, spec={"max_position_embeddings": 4096},
                context_length=4096)
    return TestClient(build_app(Server(m, "fake"))), m, ids


XML_OUT = ("The user wants the weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n"
           "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
           "<parameter=zip>\n75001\n</parameter>\n</function>\n</tool_call>")
JSON_OUT = ("<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "zip": "75001"}}\n</tool_call>')
WANT_ARGS = {"city": "Paris", "days": 3, "zip": "75001"}


@pytest.mark.parametrize("template,out", [("qwen35", XML_OUT), ("qwen3", JSON_OUT)])
def test_tool_calls(test_data, template, out):
    tok = _tok(test_data, template)
    c, m, ids = _fake_client(tok, out, TOOL_MSGS, [WEATHER])
    body = {"messages": TOOL_MSGS, "tools": [WEATHER], "temperature": 0, "max_tokens": 200}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    # the model saw the tools in its prompt
    assert m.session.hist[:len(ids)] == ids
    assert "get_weather" in tok.decode(ids) and "<tools>" in tok.decode(ids)
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    msg = ch["message"]
    assert msg["content"] is None
    assert msg["reasoning_content"] == "The user wants the weather."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WANT_ARGS
    # streamed: reasoning deltas, then one tool_calls delta, finish_reason tool_calls
    with c.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
        r.read()
    chunks = _sse(r)
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    assert "".join(d.get("content") or "" for d in deltas) == ""
    tcs = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert len(tcs) == 1 and tcs[0]["index"] == 0 and tcs[0]["function"]["name"] == "get_weather"
    assert json.loads(tcs[0]["function"]["arguments"]) == WANT_ARGS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the next turn (assistant tool call + tool result) renders and runs
    turn2 = TOOL_MSGS + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 21}"}]
    r = c.post("/v1/chat/completions", json={"messages": turn2, "tools": [WEATHER], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert "<tool_response>" in tok.decode(m.session.hist)


def test_tool_choice_none_and_plain_answers(test_data):
    tok = _tok(test_data, "qwen35")
    answer = "Let me think.\n</think>\n\nIt is sunny in Paris."
    c, m, ids = _fake_client(tok, answer, TOOL_MSGS, None)
    r = c.post("/v1/chat/completions", json={"messages": TOOL_MSGS, "tools": [WEATHER],
                                             "tool_choice": "none", "temperature": 0})
    assert r.status_code == 200
    assert "<tools>" not in tok.decode(m.session.hist)  # tools were not offered
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "stop"
    assert ch["message"]["content"] == "It is sunny in Paris."
    assert ch["message"]["reasoning_content"] == "Let me think."
    assert "tool_calls" not in ch["message"]
    # enable_thinking=false through chat_template_kwargs reaches the template
    c, m, ids = _fake_client(tok, "Sunny.", TOOL_MSGS, None, enable_thinking=False)
    r = c.post("/v1/chat/completions", json={"messages": TOOL_MSGS, "temperature": 0,
                                             "chat_template_kwargs": {"enable_thinking": False}})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Sunny."}
    assert m.session.hist[:len(ids)] == ids


# ----------------------------------------------------------------------------- the real CLI
def test_cli_serve(tiny_dir):
    import httpx
    with serve_process(str(tiny_dir), "--model-name", "tm", "--threads", "2") as (p, url):
        port = int(url.rsplit(":", 1)[1])
        r = httpx.get(url + "/v1/models", timeout=5)
        assert r.json()["data"][0]["id"] == "tm"
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tm", "messages": [OK], "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        # bound to 127.0.0.1: a foreign Host (DNS rebinding) and any Origin are refused
        r = httpx.get(url + "/v1/models", headers={"Host": "rebind.example"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        r = httpx.get(url + "/v1/models", headers={"Host": f"localhost:{port}"}, timeout=10)
        assert r.status_code == 200
        r = httpx.post(url + "/v1/chat/completions", headers={"Origin": "http://page.example"},
                       json={"messages": [OK], "max_tokens": 1}, timeout=10)
        assert r.status_code == 403
        r = httpx.post(url + "/v1/chat/completions", content=json.dumps({"messages": [OK]}),
                       headers={"Content-Type": "text/plain"}, timeout=10)
        assert r.status_code == 415
        h = httpx.get(url + "/health", timeout=10).json()
        assert h["max_queue"] == 256 and h["completed"] == 1


def test_cli_serve_bad_dir(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr


# ----------------------------------------------------------------------------- limits (issue 9)
def test_body_size_limit(model):
    c = TestClient(build_app(Server(model, "tiny-moe"), max_body=4096))
    small = {"messages": [OK], "max_tokens": 2}
    assert c.post("/v1/chat/completions", json=small).status_code == 200
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 2}).encode()
    hdr = {"content-type": "application/json"}
    r = c.post("/v1/chat/completions", content=big, headers=hdr)  # Content-Length declared
    assert r.status_code == 413, r.text
    e = r.json()["error"]
    assert e["code"] == "request_too_large" and "4096" in e["message"] and "--max-body" in e["message"]

    def chunked():  # no Content-Length: the limit applies to the bytes as they arrive
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = c.post("/v1/completions", content=chunked(), headers=hdr)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = c.post("/v1/completions", content=b"{}", headers=dict(hdr, **{"content-length": "1e9"}))
    assert r.status_code == 400
    assert c.post("/v1/chat/completions", json=small).status_code == 200


def test_oversized_prompt_is_not_tokenized(client, model, monkeypatch):
    """A prompt with more characters than the context can hold (context x the longest token) is
    refused before tokenization."""
    calls = []
    real = model.tokenizer.encode

    def spy(text, *a, **kw):
        calls.append(len(text))
        return real(text, *a, **kw)

    monkeypatch.setattr(model.tokenizer, "encode", spy)
    limit = model.context_length * max(len(t) for t in model.tokenizer._tok.get_vocab(True))
    one = {"role": "user", "content": "y" * (limit + 1)}
    r = client.post("/v1/chat/completions", json={"messages": [one], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    half = {"role": "user", "content": "y" * (limit // 2 + 10)}
    r = client.post("/v1/chat/completions", json={"messages": [half, half], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "not tokenized" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "z" * (limit + 1), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"prompt": [1] * (10 * model.context_length)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    assert _chat(client, max_tokens=2)["usage"]["completion_tokens"] == 2  # still tokenizes normally
    assert calls


def test_client_template_kwargs_allowed(client):
    d = _chat(client, max_tokens=2, chat_template_kwargs={"enable_thinking": False})
    assert d["usage"]["completion_tokens"] == 2
    assert _chat(client, max_tokens=2, chat_template_kwargs={"enable_thinking": None})


# ----------------------------------------------------------------------------- a controllable fake model
class CtlEngine(FakeEngine):
    """FakeEngine whose sessions can be slowed (delay per eval), held (gate) or made to fail."""

    def __init__(self, n_vocab):
        super().__init__(n_vocab)
        self.delay = 0.0
        self.gate = None  # threading.Event: eval waits for it
        self.fail = None  # fn(engine, tokens) -> exception to raise, or None
        self.prompts = []  # the prefill token lists evaluated
        self.lock = threading.Lock()


class CtlSession(FakeSession):
    def eval(self, tokens, all_logits=False):
        e = self.engine
        if e.gate is not None:
            assert e.gate.wait(60), "test gate never opened"
        if e.delay:
            time.sleep(e.delay)
        with e.lock:
            if tokens.size > 1:
                e.prompts.append([int(t) for t in tokens])
        exc = e.fail(e, tokens) if e.fail is not None else None
        if exc is not None:
            raise exc
        return super().eval(tokens, all_logits)


@pytest.fixture(scope="module")
def qtok(test_data):
    return _tok(test_data, "qwen3")


def _ctl_model(qtok):
    eng = CtlEngine(qtok.vocab_size)
    return G.Model(eng, CtlSession, tokenizer=qtok, spec={"max_position_embeddings": 4096},
                   context_length=4096), eng


class _Live:
    """A real uvicorn server on 127.0.0.1 in a thread (for concurrency and disconnects)."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                             lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)

    def health(self):
        import httpx
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_health(self, pred, timeout=20):
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if pred(h):
                return h
            assert time.time() < deadline, f"health never matched: {h}"
            time.sleep(0.02)


def _msgs(i):
    return [{"role": "user", "content": f"request number {i}"}]


def _post(url, body, timeout=30):
    import httpx
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def test_queue_full_gets_503_with_retry_after(qtok):
    m, eng = _ctl_model(qtok)
    eng.gate = threading.Event()
    server = Server(m, "fake", max_queue=2)
    results = {}

    def call(i):
        results[i] = _post(live.url, {"messages": _msgs(i), "max_tokens": 3, "temperature": 0})

    with _Live(build_app(server)) as live:
        try:
            ts = [threading.Thread(target=call, args=(0,))]
            ts[0].start()
            live.wait_health(lambda h: h["running"] == 1)
            for i in (1, 2):
                ts.append(threading.Thread(target=call, args=(i,)))
                ts[-1].start()
                live.wait_health(lambda h: h["queue_depth"] == i)
            r = _post(live.url, {"messages": _msgs(3), "max_tokens": 3}, timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "queue_full" and "--max-queue" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            with __import__("httpx").stream("POST", live.url + "/v1/chat/completions", timeout=10,
                                            json={"messages": _msgs(4), "stream": True}) as rs:
                assert rs.status_code == 503
        finally:
            eng.gate.set()
        for t in ts:
            t.join(60)
        assert [results[i].status_code for i in range(3)] == [200, 200, 200]
        # served in arrival order
        import re
        order = [int(re.search(r"request number (\d+)", qtok.decode(p)).group(1)) for p in eng.prompts]
        assert order == [0, 1, 2]
        h = live.health()
        assert h["rejected"] == 2 and h["completed"] == 3 and h["queue_depth"] == 0
    server.close()


def test_request_timeout(qtok):
    m, eng = _ctl_model(qtok)
    eng.delay = 0.02
    server = Server(m, "fake", timeout=1.0)
    with _Live(build_app(server)) as live:
        t0 = time.time()
        r = _post(live.url, {"messages": _msgs(0), "max_tokens": 3000, "temperature": 0})
        assert r.status_code == 504, r.text
        e = r.json()["error"]
        assert e["code"] == "request_timeout" and "--timeout" in e["message"]
        assert time.time() - t0 < 10
        # streaming: the tokens so far, then an error event, then [DONE]
        import httpx
        r = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                       json={"messages": _msgs(1), "max_tokens": 3000, "stream": True})
        events = _sse(r)
        assert events[-1]["error"]["code"] == "request_timeout"
        assert len(events) > 2 and all("choices" in ev for ev in events[:-1])
        # a request queued behind a long one times out too, counting its time in the queue
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("a", _post(
            live.url, {"messages": _msgs(2), "max_tokens": 3000})))
        th.start()
        live.wait_health(lambda h: h["running"] == 1)
        eng.gate = threading.Event()  # hold the engine inside the running request
        r = _post(live.url, {"messages": _msgs(3), "max_tokens": 2})
        assert r.status_code == 504 and "waiting in the queue" in r.json()["error"]["message"]
        eng.gate.set()
        eng.gate = None
        th.join(30)
        assert out["a"].status_code == 504
        # the engine goes on
        r = _post(live.url, {"messages": _msgs(4), "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert live.health()["timed_out"] >= 3
    server.close()


def test_disconnects_free_their_slots(qtok):
    """48 streams (more than Starlette's 40 worker threads) on a slow model, all abandoned: the
    queued ones never run, the running one stops, and the next request is served at once."""
    import asyncio

    import httpx
    m, eng = _ctl_model(qtok)
    eng.delay = 0.01
    server = Server(m, "fake")
    with _Live(build_app(server)) as live:
        async def main():
            async with httpx.AsyncClient(timeout=httpx.Timeout(20.0),
                                         limits=httpx.Limits(max_connections=100)) as c:
                opened = []
                for i in range(48):
                    cm = c.stream("POST", live.url + "/v1/chat/completions",
                                  json={"messages": _msgs(i), "max_tokens": 3000, "stream": True})
                    opened.append((cm, await cm.__aenter__()))
                assert all(r.status_code == 200 for _, r in opened)
                lines = opened[0][1].aiter_lines()
                assert (await lines.__anext__()).startswith("data: ")
                # the queued ones first, then the running one: a queued request must never start
                # (closing the running one first would let the next start before its own close)
                for cm, _ in opened[1:] + opened[:1]:
                    await cm.__aexit__(None, None, None)

        asyncio.run(main())
        h = live.wait_health(lambda h: h["running"] == 0 and h["queue_depth"] == 0, timeout=10)
        assert h["cancelled"] == 48
        n_prompts = len(eng.prompts)
        assert n_prompts <= 2  # the first one, maybe the second if it started before its cancel
        t0 = time.time()
        r = _post(live.url, {"messages": _msgs(99), "max_tokens": 3})
        assert r.status_code == 200 and time.time() - t0 < 5
        assert len(eng.prompts) == n_prompts + 1
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            _post(live.url, {"messages": _msgs(100), "max_tokens": 3000}, timeout=1.0)
        live.wait_health(lambda h: h["cancelled"] == 49 and h["running"] == 0, timeout=10)
    server.close()


def test_engine_error_ends_only_that_request(qtok):
    from pyflashmoe import errors
    numerical = getattr(errors, "NumericalError", errors.FlashMoEError)
    m, eng = _ctl_model(qtok)
    fail = {"n": 0}

    def failing(e, tokens):
        if fail["n"] > 0 and tokens.size == 1:  # mid-generation, after a few tokens
            fail["n"] -= 1
            if fail["n"] == 0:
                return numerical("non-finite hidden state after layer 3 (inf)")
        return None

    eng.fail = failing
    server = Server(m, "fake")
    with _Live(build_app(server)) as live:
        fail["n"] = 3
        r = _post(live.url, {"messages": _msgs(0), "max_tokens": 20})
        assert r.status_code == 500, r.text
        assert "layer 3" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
        import httpx
        fail["n"] = 3
        r = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                       json={"messages": _msgs(1), "max_tokens": 20, "stream": True})
        assert r.status_code == 200
        events = _sse(r)
        assert "layer 3" in events[-1]["error"]["message"]
        # a non-project exception (a bug) ends its request too, and the engine thread goes on
        eng.fail = lambda e, t: RuntimeError("boom") if t.size > 1 else None
        r = _post(live.url, {"messages": _msgs(2), "max_tokens": 5})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        eng.fail = None
        r = _post(live.url, {"messages": _msgs(3), "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        h = live.health()
        assert h["engine_thread"] == "alive" and h["failed"] == 3 and h["status"] == "ok"
    server.close()


def test_scheduler_fifo_and_capacity():
    from pyflashmoe.server import APIError, Scheduler
    s = Scheduler(max_queue=2)
    jobs = [object() for _ in range(5)]
    for j in jobs[:3]:  # nothing running yet: 2 waiting + the one about to run
        s.submit(j)
    with pytest.raises(APIError) as ei:
        s.submit(jobs[3], retry_after=7)
    assert ei.value.status == 503 and ei.value.headers == {"Retry-After": "7"}
    assert s.pick_next() is jobs[0]  # FIFO
    assert s.full() and s.depth() == 2
    assert s.remove(jobs[1]) and not s.remove(jobs[1]) and not s.full()
    s.submit(jobs[3])
    assert [s.pick_next() for _ in range(1)] == [jobs[2]]
    s.finished(jobs[0])
    s.finished(jobs[2])
    assert s.pick_next() is jobs[3]
    # max_queue=0: one request at a time, none waiting
    z = Scheduler(max_queue=0)
    z.submit(jobs[0])
    with pytest.raises(APIError):
        z.submit(jobs[1])
    assert z.pick_next() is jobs[0]
    with pytest.raises(APIError):
        z.submit(jobs[1])
    z.finished(jobs[0])
    z.submit(jobs[1])
    assert z.close() == [jobs[1]] and z.pick_next() is None


def test_health_tells_the_truth(qtok):
    """/health is 503 when the engine is stuck inside one step past a request's deadline, and
    when the engine thread is gone; requests then get 503 at once."""
    m, eng = _ctl_model(qtok)
    server = Server(m, "fake", timeout=0.3)
    server.engine.STALL_SLACK_S = 0.3
    with _Live(build_app(server)) as live:
        eng.gate = threading.Event()  # the engine hangs in its first eval
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("r", _post(live.url, {"messages": _msgs(0)})))
        th.start()
        h = live.wait_health(lambda h: h["status"] == "stalled", timeout=10)
        assert h["running"] == 1 and h["running_for_s"] > 0.3
        import httpx
        assert httpx.get(live.url + "/health", timeout=10).status_code == 503
        eng.gate.set()
        th.join(30)
        assert out["r"].status_code == 504
        live.wait_health(lambda h: h["status"] == "ok" and h["running"] == 0)
    c = TestClient(build_app(server))
    assert c.get("/health").status_code == 200
    server.close()
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["engine_thread"] == "dead"
    r = c.post("/v1/chat/completions", json={"messages": _msgs(0), "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"


# ----------------------------------------------------------------------------- Host / Origin / CORS
def test_host_check_on_loopback(qtok):
    from pyflashmoe.server import default_allowed_hosts
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("192.168.1.2") is None
    hosts = default_allowed_hosts("127.0.0.1")
    assert {"127.0.0.1", "localhost", "::1"} <= set(hosts)
    m, _ = _ctl_model(qtok)
    c = TestClient(build_app(Server(m, "fake"), allowed_hosts=hosts), base_url="http://127.0.0.1:8000")
    for h in ("127.0.0.1:8000", "127.0.0.1", "localhost", "LocalHost:1234", "[::1]:8000", "[::1]"):
        r = c.get("/v1/models", headers={"host": h})
        assert r.status_code == 200, (h, r.text)
    for h in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil:80",
              "[::1]x", "::1", "", "127.0.0.1:80:80"):
        r = c.get("/v1/models", headers={"host": h})
        assert r.status_code == 400, (h, r.text)
        assert r.json()["error"]["code"] == "invalid_host" and "--allowed-hosts" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", headers={"host": h},
                   json={"messages": _msgs(0), "max_tokens": 2})
        assert r.status_code == 400
    c2 = TestClient(build_app(Server(m, "fake"), allowed_hosts="api.example, localhost"))
    assert c2.get("/v1/models", headers={"host": "api.example:443"}).status_code == 200
    assert c2.get("/v1/models", headers={"host": "other.example"}).status_code == 400
    c3 = TestClient(build_app(Server(m, "fake"), allowed_hosts="*"))
    assert c3.get("/v1/models", headers={"host": "anything.example"}).status_code == 200


def test_cross_origin_requests_refused(qtok):
    m, eng = _ctl_model(qtok)
    server = Server(m, "fake")
    c = TestClient(build_app(server))
    body = json.dumps({"messages": _msgs(0), "max_tokens": 2})
    # a browser's "simple" cross-origin POST: text/plain, no preflight
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        hdr = {"content-type": ct} if ct else {}
        r = c.post("/v1/chat/completions", content=body, headers=hdr)
        assert r.status_code == 415, (ct, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert eng.prompts == []  # nothing ran
    r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    # any Origin is refused while CORS is off, even with a JSON body
    r = c.post("/v1/chat/completions", content=body,
               headers={"content-type": "application/json", "origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert c.get("/v1/models", headers={"origin": "null"}).status_code == 403
    assert "access-control-allow-origin" not in c.get("/v1/models").headers
    # --cors-origins: the listed origin gets CORS headers (and preflights), others a 403
    c = TestClient(build_app(server, cors_origins="http://app.example"))
    r = c.post("/v1/chat/completions", content=body,
               headers={"content-type": "application/json", "origin": "http://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = c.options("/v1/chat/completions", headers={"origin": "http://app.example",
                                                   "access-control-request-method": "POST",
                                                   "access-control-request-headers": "content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = c.get("/v1/models", headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    c = TestClient(build_app(server, cors_origins="*"))
    assert c.get("/v1/models", headers={"origin": "http://any.example"}).status_code == 200
    server.close()


# ---- tool_choice "required" / a named function: enforced by the grammar (Qwen3.5 XML template)
DEMO_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm",
        "parameters": {"type": "object", "properties": {
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "loud": {"type": "boolean"}},
            "required": ["hour"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def demo_client():
    from pyflashmoe.generate import DEMO_MODEL_DIR
    model = G.Model.load(DEMO_MODEL_DIR)
    server = Server(model, "demo")
    yield TestClient(build_app(server))
    server.close()


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "set_alarm"}),
    ({"type": "function", "function": {"name": "set_alarm"}}, {"set_alarm"}),
])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tool_choice_is_enforced(demo_client, choice, names, seed):
    import jsonschema
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in DEMO_TOOLS}
    body = {"messages": [{"role": "user", "content": "Tell me a story about the sea."}],
            "tools": DEMO_TOOLS, "tool_choice": choice, "max_tokens": 64, "temperature": 1.0,
            "seed": seed, "parallel_tool_calls": False,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = demo_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    (call,) = ch["message"]["tool_calls"]
    name = call["function"]["name"]
    assert name in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


def test_tool_choice_auto_is_not_forced(demo_client):
    body = {"messages": [{"role": "user", "content": "Tell me a story about the sea."}],
            "tools": DEMO_TOOLS, "max_tokens": 24, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = demo_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_parallel_tool_calls_must_be_bool(demo_client):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": DEMO_TOOLS,
            "tool_choice": "required", "parallel_tool_calls": "yes"}
    r = demo_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"


def test_api_key():
    from pyflashmoe.generate import DEMO_MODEL_DIR
    server = Server(G.Model.load(DEMO_MODEL_DIR), "demo")
    try:
        c = TestClient(build_app(server, api_key="s3cret"))
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
        assert "no API key" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong API key" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200  # liveness stays open
        assert c.post("/v1/chat/completions", json=chat,
                      headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # Anthropic clients send x-api-key, and get Anthropic-shaped errors
        msg = {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        r = c.post("/v1/messages", json=msg)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.post("/v1/messages", json=msg, headers={"x-api-key": "s3cret"}).status_code == 200
        # without a key configured, nothing is asked
        c2 = TestClient(build_app(server))
        assert c2.get("/v1/models").status_code == 200
    finally:
        server.close()


# ----------------------------------------------------------------------------- model name, logit_bias
def test_unknown_model_is_404(demo_client):
    for path, body in [("/v1/chat/completions", {"messages": [OK], "max_tokens": 1}),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 1})]:
        r = demo_client.post(path, json={**body, "model": "gpt-9"})
        assert r.status_code == 404
        assert r.json() == {"error": {"message": "model 'gpt-9' not found; this server serves 'demo'",
                                      "type": "invalid_request_error", "param": "model",
                                      "code": "model_not_found"}}
        for ok in ("demo", "", None):  # the served id, or none given
            b = dict(body) if ok is None else {**body, "model": ok}
            assert demo_client.post(path, json=b).status_code == 200
    assert demo_client.get("/v1/models").json()["data"][0]["id"] == "demo"


def test_logit_bias_api(demo_client):
    body = {"model": "demo", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}
    ref = demo_client.post("/v1/completions", json=body).json()
    r = demo_client.post("/v1/chat/completions", json={"messages": [OK], "max_tokens": 2,
                                                        "temperature": 0, "logit_bias": {"5": 100}})
    assert r.status_code == 200
    m = G.Model.load(G.DEMO_MODEL_DIR)
    want = m.tokenizer.decode([5, 5])
    msg = r.json()["choices"][0]["message"]  # the demo template opens a reasoning block
    assert (msg.get("reasoning_content") or "") + (msg["content"] or "") == want
    r = demo_client.post("/v1/completions", json={**body, "logit_bias": {"5": 100}})
    assert r.json()["choices"][0]["text"] == m.tokenizer.decode([5, 5, 5])
    first = m.tokenizer.encode(ref["choices"][0]["text"], add_special_tokens=False)[0]
    r = demo_client.post("/v1/completions", json={**body, "max_tokens": 1,
                                                   "logit_bias": {str(first): -100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] != m.tokenizer.decode([first])
    nv = m.n_vocab
    for bad, key in [({"abc": 1}, "'abc'"), ({str(nv): 1}, repr(str(nv))), ({"-1": 1}, "'-1'"),
                     ({"5": 100.5}, "'5'"), ({"5": "x"}, "'5'"), ({"5": None}, "'5'"),
                     ({str(i): 1 for i in range(301)}, "301"), ([1], "logit_bias")]:
        r = demo_client.post("/v1/chat/completions", json={"messages": [OK], "max_tokens": 1,
                                                            "logit_bias": bad})
        assert r.status_code == 400, bad
        e = r.json()["error"]
        assert e["param"] == "logit_bias" and "logit_bias" in e["message"] and key in e["message"]


def test_logit_bias_grammar_mask_wins(demo_client):
    # +100 on '&': the JSON grammar still decides where it may go (only inside a string)
    r = demo_client.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 12, "temperature": 0, "logit_bias": {"5": 100},
        "response_format": {"type": "json_object"}})
    text = r.json()["choices"][0]["text"]
    assert isinstance(json.loads(text), dict) and "&" in text


# ----------------------------------------------------------------------------- logprobs
def _sse_chunks(r):
    return [json.loads(ev[len("data: "):]) for ev in r.text.split("\n\n")
            if ev.startswith("data: ") and ev != "data: [DONE]"]


def test_chat_logprobs(demo_client):
    """logprobs + top_logprobs: OpenAI's shape, the raw distribution's values (as Model.generate
    gives them), sorted top lists; streaming carries the same entries spread over its chunks."""
    body = {"messages": [OK], "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    d = demo_client.post("/v1/chat/completions", json=body).json()
    ch = d["choices"][0]
    content = ch["logprobs"]["content"]
    assert ch["logprobs"]["refusal"] is None
    assert len(content) == d["usage"]["completion_tokens"] == 5
    m = G.Model.load(G.DEMO_MODEL_DIR)
    ids = m.tokenizer.apply_chat_template([OK], add_generation_prompt=True, tokenize=True)
    ref = list(m.generate(ids, max_tokens=5, temperature=0, top_logprobs=3))
    for e, p in zip(content, ref):
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(e["bytes"]) == m.tokenizer.token_bytes(p.token)
        assert e["token"] == bytes(e["bytes"]).decode()
        assert e["logprob"] == pytest.approx(p.logprob, abs=1e-6) and e["logprob"] <= 0
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx([v for _, v in p.top_logprobs])
        assert [bytes(t["bytes"]) for t in e["top_logprobs"]] == \
            [m.tokenizer.token_bytes(t) for t, _ in p.top_logprobs]
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy picks the most likely
    text = (ch["message"].get("reasoning_content") or "") + (ch["message"]["content"] or "")
    assert "".join(e["token"] for e in content).strip() == text.strip()
    chunks = _sse_chunks(demo_client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"]
                for e in ch["logprobs"]["content"]]
    assert streamed == content
    # logprobs alone: entries with empty top lists; not asked: null
    d = demo_client.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()
    assert [e["top_logprobs"] for e in d["choices"][0]["logprobs"]["content"]] == [[]] * 5
    d = demo_client.post("/v1/chat/completions", json={"messages": [OK], "max_tokens": 2}).json()
    assert d["choices"][0]["logprobs"] is None
    r = demo_client.post("/v1/chat/completions", json={**body, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs(demo_client, echo):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "echo": echo}
    ch = demo_client.post("/v1/completions", json=body).json()["choices"][0]
    lp = ch["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    start = len("Once upon a time") if echo else 0
    assert lp["text_offset"][0] == start
    for tok, off, top, v in zip(lp["tokens"], lp["text_offset"], lp["top_logprobs"],
                                lp["token_logprobs"]):
        assert ch["text"][off:off + len(tok)] == tok
        assert len(top) == 2 and max(top.values()) == pytest.approx(v)  # greedy
    chunks = _sse_chunks(demo_client.post("/v1/completions", json={**body, "stream": True}))
    got = {k: [x for c in chunks if c["choices"][0]["logprobs"]
               for x in c["choices"][0]["logprobs"][k]] for k in lp}
    assert got == lp
    assert "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
    for bad in (6, -1, True, "2"):
        r = demo_client.post("/v1/completions", json={**body, "logprobs": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", bad
