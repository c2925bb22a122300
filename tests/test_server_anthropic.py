"""The Anthropic Messages API (POST /v1/messages, pyflashmoe.server_anthropic) end to end: the
official `anthropic` Python client against a real uvicorn server on 127.0.0.1 serving the embedded
demo model (Qwen3.5 chat template, trained on chat + tool-call markup).

The anthropic client (2.x) has no temperature / top_p / top_k arguments any more: they go in
extra_body, as the Messages API still defines them."""
import json
import os
import sys

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'pyflashmoe[serve]')")
pytest.importorskip("uvicorn", reason="the live server needs uvicorn (pip install 'pyflashmoe[serve]')")
pytest.importorskip("llguidance", reason="tool_choice 'any' needs llguidance (pip install 'pyflashmoe[serve]')")
anthropic = pytest.importorskip("anthropic", reason="needs the official anthropic client (pip install anthropic)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema")

from pyflashmoe import generate as G  # noqa: E402
from pyflashmoe.server import Server, build_app, default_allowed_hosts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_server import _Live  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 40},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}}
ALARM = {"name": "set_alarm", "description": "Set an alarm",
         "input_schema": {"type": "object", "properties": {
             "hour": {"type": "integer", "minimum": 0, "maximum": 23},
             "loud": {"type": "boolean"}},
             "required": ["hour"], "additionalProperties": False}}
TOOLS = [WEATHER, ALARM]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
HI = [{"role": "user", "content": "Tell me a story about the sea."}]


@pytest.fixture(scope="module")
def live():
    model = G.Model.load(G.DEMO_MODEL_DIR)
    server = Server(model, "demo")
    # the limits `flashmoe serve` sets on a loopback address (Host names checked)
    with _Live(build_app(server, allowed_hosts=default_allowed_hosts("127.0.0.1"))) as lv:
        lv.server_obj = server
        yield lv
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key="local-key", max_retries=0, timeout=120)


def _post(live, body, **headers):
    import httpx
    return httpx.post(live.url + "/v1/messages", json=body, timeout=120,
                      headers={"x-api-key": "k", "anthropic-version": "2023-06-01", **headers})


def test_create_non_streaming(client):
    msg = client.messages.create(model="demo", max_tokens=12, messages=HI, extra_body={"temperature": 0},
                                 system="You are terse.", metadata={"user_id": "u1"})
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text
    assert msg.usage.output_tokens == 12 or msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 10
    # system as text blocks renders the same prompt: same greedy answer
    again = client.messages.create(model="demo", max_tokens=12, messages=HI, extra_body={"temperature": 0},
                                   system=[{"type": "text", "text": "You are "},
                                           {"type": "text", "text": "terse."}])
    assert again.content[0].text == msg.content[0].text


def test_system_prompt_changes_the_prompt(client):
    a = client.messages.create(model="demo", max_tokens=4, messages=HI, extra_body={"temperature": 0})
    b = client.messages.create(model="demo", max_tokens=4, messages=HI, extra_body={"temperature": 0},
                               system="You are a pirate who answers in rhymes.")
    tot = lambda u: u.input_tokens + (u.cache_read_input_tokens or 0)  # noqa: E731
    assert tot(b.usage) > tot(a.usage)


def test_max_tokens_stop_reason(client):
    msg = client.messages.create(model="demo", max_tokens=3, messages=HI, extra_body={"temperature": 0})
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_streaming_matches_non_streaming(client):
    ref = client.messages.create(model="demo", max_tokens=10, messages=HI, extra_body={"temperature": 0})
    with client.messages.stream(model="demo", max_tokens=10, messages=HI, extra_body={"temperature": 0}) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(texts) == ref.content[0].text == final.content[0].text
    assert final.stop_reason == ref.stop_reason
    assert final.usage.output_tokens == ref.usage.output_tokens


def test_create_stream_event_sequence(client):
    events = list(client.messages.create(model="demo", max_tokens=8, messages=HI, extra_body={"temperature": 0},
                                         stream=True))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types[1] == "content_block_start" and types[-3] == "content_block_stop"
    assert set(types[2:-3]) == {"content_block_delta"}
    assert all(e.delta.type == "text_delta" for e in events if e.type == "content_block_delta")
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8


def test_raw_sse_framing(live):
    import httpx
    body = {"model": "demo", "max_tokens": 4, "messages": HI, "stream": True}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f.strip()]
    for f in frames:
        ev, data = f.split("\n")
        assert ev.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == ev[7:]
    assert "[DONE]" not in raw


def test_stop_sequences(client):
    ref = client.messages.create(model="demo", max_tokens=24, messages=HI, extra_body={"temperature": 0})
    text = ref.content[0].text
    words = [w for w in text.split() if len(w) >= 3]
    assert len(words) >= 2, text
    stop = words[1]
    cut = text[:text.index(stop)]
    msg = client.messages.create(model="demo", max_tokens=24, messages=HI, extra_body={"temperature": 0},
                                 stop_sequences=["@@never@@", stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert "".join(b.text for b in msg.content if b.type == "text") == cut
    with client.messages.stream(model="demo", max_tokens=24, messages=HI, extra_body={"temperature": 0},
                                stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_then_tool_result(client, stream):
    kw = dict(model="demo", max_tokens=64, extra_body={"temperature": 1.0}, tools=TOOLS,
              tool_choice={"type": "any", "disable_parallel_tool_use": True},
              messages=[{"role": "user", "content": "What is the weather in Paris for 3 days?"}])
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(**kw)
    assert msg.stop_reason == "tool_use", msg
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id.startswith("toolu_")
    assert uses[0].name in SCHEMAS
    jsonschema.validate(uses[0].input, SCHEMAS[uses[0].name])
    # the follow-up turn carries the tool_use and its tool_result
    follow = kw["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": uses[0].id,
             "content": [{"type": "text", "text": "Sunny, 21 C."}]},
            {"type": "text", "text": "Thanks. Summarize."}]}]
    nxt = client.messages.create(model="demo", max_tokens=8, extra_body={"temperature": 0}, tools=TOOLS,
                                 messages=follow)
    assert nxt.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert nxt.usage.input_tokens + (nxt.usage.cache_read_input_tokens or 0) > \
        msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


def test_named_tool_is_forced(client):
    msg = client.messages.create(model="demo", max_tokens=48, extra_body={"temperature": 1.0}, tools=TOOLS,
                                 tool_choice={"type": "tool", "name": "set_alarm"}, messages=HI)
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "set_alarm" and msg.stop_reason == "tool_use"
    jsonschema.validate(use.input, SCHEMAS["set_alarm"])


def test_tool_result_is_error_and_history_render(live):
    """tool_result with is_error and string content, thinking blocks in assistant history: the
    converted messages render through the template (checked on the prompt the server builds)."""
    from pyflashmoe import server_anthropic as A
    body = {"max_tokens": 4, "system": "sys", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call it.", "signature": "x"},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Oslo", "days": 2}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no network",
             "is_error": True}]}], "tools": TOOLS}
    msgs = A.parse_messages(body)  # a dict is validated (api_models.CountTokensRequest) first
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["reasoning_content"] == "I should call it."
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": {"city": "Oslo", "days": 2}}
    assert msgs[3]["content"] == "Error: no network" and msgs[3]["tool_call_id"] == "toolu_1"
    tools, _, _ = A.parse_tools(body)
    text, _ = live.server_obj.chat_prompt(msgs, tools, None, {"enable_thinking": False})
    assert "<function=get_weather>" in text and "Error: no network" in text and "Oslo" in text
    r = _post(live, body)
    assert r.status_code == 200, r.text


def test_thinking_enabled_returns_a_thinking_block(client):
    msg = client.messages.create(model="demo", max_tokens=48, messages=HI, extra_body={"temperature": 0},
                                 thinking={"type": "enabled", "budget_tokens": 32})
    assert msg.content and msg.content[0].type == "thinking", msg.content
    assert msg.content[0].thinking.strip()
    with client.messages.stream(model="demo", max_tokens=16, messages=HI, extra_body={"temperature": 0},
                                thinking={"type": "enabled", "budget_tokens": 32}) as s:
        deltas = [e.delta.type for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert deltas and deltas[0] == "thinking_delta"
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking == msg.content[0].thinking[:len(final.content[0].thinking)]
    off = client.messages.create(model="demo", max_tokens=8, messages=HI, extra_body={"temperature": 0},
                                 thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in off.content)


@pytest.mark.parametrize("extra,field", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10 ** 9}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": "x"}, "top_k"),
    ({"stop_sequences": "x" * 600}, "stop_sequences"),
    ({"stop_sequences": ["a"] * 17}, "stop_sequences"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"system": 5}, "system"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tools": [{"input_schema": {}}]}, "tools.0.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_requests(client, extra, field):
    body = {"model": "demo", "max_tokens": 4, "messages": HI}
    body.update(extra)
    if body["max_tokens"] is None:
        del body["max_tokens"]
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.post("/v1/messages", body=body, cast_to=object)
    e = ei.value
    assert e.status_code == 400
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error"
    assert field in e.body["error"]["message"], e.body


def test_client_side_missing_max_tokens_and_error_shapes(client, live):
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(model="demo", max_tokens=4, messages=[], extra_body={"temperature": 0})
    assert "messages" in ei.value.body["error"]["message"]
    r = _post(live, {"model": "demo", "messages": HI})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                    "message": "'max_tokens' is required"}}
    # the request guard and body errors answer in Anthropic's shape on this path too
    import httpx
    r = httpx.post(live.url + "/v1/messages", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"
    r = httpx.post(live.url + "/v1/messages", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/messages", json={"max_tokens": 1, "messages": HI},
                   headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["type"] == "error" and "Host" in r.json()["error"]["message"]
    # the OpenAI path keeps its shape
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "param" in r.json()["error"]


def test_prefilled_answer_is_continued(client, live):
    """A final assistant message is the start of the answer: the model continues it (Anthropic's
    prefill), rather than the template closing that turn and opening another."""
    ref = client.messages.create(model="demo", max_tokens=12, messages=HI,
                                 extra_body={"temperature": 0})
    text = ref.content[0].text
    head = text[:text.index(" ", 3)]
    cont = client.messages.create(model="demo", max_tokens=12, extra_body={"temperature": 0},
                                  messages=HI + [{"role": "assistant", "content": head}])
    assert (head + cont.content[0].text).startswith(text[:len(head) + 8]), (head, cont.content)
    r = _post(live, {"max_tokens": 4, "messages": HI + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]}]})
    assert r.status_code == 400 and "messages.1" in r.json()["error"]["message"]


def test_count_tokens(client):
    kw = dict(model="demo", messages=HI, system="You are terse.", tools=TOOLS)
    n = client.messages.count_tokens(**kw).input_tokens
    msg = client.messages.create(max_tokens=1, extra_body={"temperature": 0}, **kw)
    assert n == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 100
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.count_tokens(model="demo", messages=[{"role": "robot", "content": "x"}])
    assert "messages.0.role" in ei.value.body["error"]["message"]


def test_engine_error_mid_stream_is_an_anthropic_error_event(live, client, monkeypatch):
    """A generation that fails after its first tokens ends the stream with Anthropic's `error`
    event (no OpenAI [DONE]), the non-streaming call with a 500 in Anthropic's shape, and the
    next request is served."""
    import httpx

    from pyflashmoe.errors import FlashMoEError
    model = live.server_obj.model
    real = model._eval_batch  # the engine loop's decode step
    calls = {"n": 0}

    def failing(sessions, tokens):  # the 2nd decode step of each request fails
        calls["n"] += 1
        if calls["n"] == 2:
            calls["n"] = 0
            raise FlashMoEError("disk read failed (test)")
        return real(sessions, tokens)

    monkeypatch.setattr(model, "_eval_batch", failing)
    body = {"model": "demo", "max_tokens": 8, "messages": HI, "stream": True}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, timeout=60) as r:
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f.strip()]
    assert frames[0].startswith("event: message_start") and "[DONE]" not in raw
    assert frames[-1].startswith("event: error\n")
    assert json.loads(frames[-1].split("data: ", 1)[1]) == {
        "type": "error", "error": {"type": "api_error", "message": "disk read failed (test)"}}
    with pytest.raises(anthropic.InternalServerError) as ei:
        client.messages.create(model="demo", max_tokens=8, messages=HI)
    assert ei.value.body["error"]["type"] == "api_error"
    monkeypatch.setattr(model, "_eval_batch", real)
    assert client.messages.create(model="demo", max_tokens=2, messages=HI).stop_reason == "max_tokens"


def test_flashmoe_serve_subprocess():
    """`flashmoe serve` of the demo model (a real process, as users run it) answers the official
    client, streaming and not, with x-api-key / anthropic-version headers sent."""
    from serve_process import serve_process
    with serve_process(G.DEMO_MODEL_DIR, "--model-name", "demo") as (_, url):
        c = anthropic.Anthropic(base_url=url, api_key="anything", max_retries=0, timeout=60)
        msg = c.messages.create(model="demo", max_tokens=4, messages=HI, system="Be brief.")
        assert msg.content[0].type == "text" and msg.usage.output_tokens <= 4
        with c.messages.stream(model="demo", max_tokens=4, messages=HI) as s:
            final = s.get_final_message()
        assert final.stop_reason in ("max_tokens", "end_turn") and final.content
        with pytest.raises(anthropic.BadRequestError) as ei:
            c.messages.create(model="demo", max_tokens=4, messages=HI, stop_sequences=[""])
        assert "stop_sequences" in ei.value.body["error"]["message"]


def test_cache_read_input_tokens(client):
    """A request whose prompt extends the previous prompt + answer (here: the answer sent back as a
    prefill) evaluates only the new tokens; usage splits them: input_tokens (evaluated) +
    cache_read_input_tokens (reused). A prompt no earlier test sent: the server keeps states of
    earlier prompts (pyflashmoe/prefix.py), so a repeated one starts with cached tokens."""
    hi = [{"role": "user", "content": "Tell me a story about the cache of the sea."}]
    a = client.messages.create(model="demo", max_tokens=6, messages=hi, extra_body={"temperature": 0})
    assert a.usage.cache_read_input_tokens == 0
    b = client.messages.create(model="demo", max_tokens=6, extra_body={"temperature": 0},
                               messages=hi + [{"role": "assistant", "content": a.content[0].text}])
    assert b.usage.cache_read_input_tokens >= a.usage.input_tokens
    n = client.messages.count_tokens(model="demo", messages=hi + [
        {"role": "assistant", "content": a.content[0].text}]).input_tokens
    assert b.usage.input_tokens + b.usage.cache_read_input_tokens == n
    assert b.usage.input_tokens < n - a.usage.input_tokens


def test_unknown_model_is_404(live):
    r = _post(live, {"model": "claude-9", "max_tokens": 1, "messages": HI})
    assert r.status_code == 404
    assert r.json() == {"type": "error", "error": {
        "type": "not_found_error", "message": "model 'claude-9' not found; this server serves 'demo'"}}
    assert _post(live, {"model": "demo", "max_tokens": 1, "messages": HI}).status_code == 200


def test_caps_in_anthropic_shape(live):
    """max_tokens above the served context and a body past --max-body (default 4 MiB) are
    Anthropic-shaped errors naming the field / the option."""
    r = _post(live, {"model": "demo", "max_tokens": 5000, "messages": HI})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("'max_tokens' must be <= 4096 (the model's context "
                                            "length), got 5000")
    big = {"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    r = _post(live, big)
    assert r.status_code == 413
    e = r.json()
    assert e["type"] == "error" and e["error"]["type"] == "request_too_large"
    assert "--max-body" in e["error"]["message"]
    assert _post(live, {"model": "demo", "max_tokens": 1, "messages": HI}).status_code == 200
