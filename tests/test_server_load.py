"""Load test of a real `flashmoe serve` (a subprocess on 127.0.0.1, the tiny model of
test_server.py): 64 and then 128 concurrent streaming clients all complete with well-formed SSE,
then 5 phases of the same load plus big request bodies (refused before tokenization, or with 413),
and the server's RSS after the 5th phase is within 5% of its RSS after the 1st (issue 9).
Continuous batching (issue 10 item 4, --parallel 4): two concurrent streams progress together and
each equals its answer alone (greedy); a stalled or departed client does not hold up another
request; n > 1 choices (chat and completions, streaming and not, seeds seed + i).

Bounded: every HTTP call has a timeout, every phase a deadline, and the server is killed at the
end whatever happens.
"""
import asyncio
import json
import os
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'pyflashmoe[serve]')")
httpx = pytest.importorskip("httpx", reason="the load test's clients use httpx")
pytest.importorskip("uvicorn", reason="flashmoe serve needs uvicorn (pip install 'pyflashmoe[serve]')")
pytest.importorskip("llguidance", reason="test_server.py's tiny model fixture needs llguidance")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from serve_process import serve_process  # noqa: E402
from test_server import build_tiny  # noqa: E402

MAX_TOKENS = 4
PHASE_S = 90  # deadline per phase


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, test_data):
    return build_tiny(tmp_path_factory, test_data)


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/PID/status")


def _check_sse(text):
    """Strict SSE: `data: {json}` events, each followed by a blank line, the last `data: [DONE]`;
    the first chunk carries the role, the last choice chunk the finish reason, then usage."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev, repr(ev)
        chunks.append(json.loads(ev[len("data: "):]))
    assert not any("error" in c for c in chunks), chunks
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    body = [c for c in chunks if c["choices"]]
    assert body[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]["usage"]
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in body)


async def _stream(c, url, i):
    body = {"messages": [{"role": "user", "content": f"Client {i} asks a question."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await c.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return _check_sse(r.text)


async def _big(c, url, n_chars, want):
    # a body of ~n_chars bytes: refused before tokenization (400) or by --max-body (413)
    body = {"messages": [{"role": "user", "content": "w" * n_chars}], "max_tokens": 2}
    r = await c.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == want, r.text[:300]
    assert r.json()["error"]["code"] in ("context_length_exceeded", "request_too_large")


async def _phase(url, n_clients, big=False):
    limits = httpx.Limits(max_connections=n_clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as c:
        jobs = [_stream(c, url, i) for i in range(n_clients)]
        if big:
            jobs += [_big(c, url, 3 << 20, 400), _big(c, url, 3 << 20, 400), _big(c, url, 5 << 20, 413)]
        out = await asyncio.wait_for(asyncio.gather(*jobs), PHASE_S)
    texts = out[:n_clients]
    assert len(texts) == n_clients
    return texts


def _wait_idle(url, timeout=30):
    deadline = time.time() + timeout
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if h["running"] == 0 and h["queue_depth"] == 0:
            return h
        assert time.time() < deadline, f"server not idle: {h}"
        time.sleep(0.05)


def test_serve_under_load_and_rss_is_stable(tiny_dir):
    with serve_process(str(tiny_dir), "--threads", "1", "--timeout", "120") as (p, url):
        # 64, then 128 concurrent streaming clients: all complete, each with its own answer
        t64 = asyncio.run(_phase(url, 64))
        t128 = asyncio.run(_phase(url, 128))
        assert t64 == t128[:64]  # greedy: client i gets the same text in both rounds
        # 5 phases of the same load plus big bodies; RSS after each
        rss = []
        for _ in range(5):
            asyncio.run(_phase(url, 128, big=True))
            h = _wait_idle(url)
            time.sleep(0.8)  # the server trims its heap once idle (0.25 s)
            rss.append(_rss_kib(p.pid))
        assert h["engine_thread"] == "alive" and h["failed"] == 0
        assert h["completed"] == 64 + 128 + 5 * 128
        print(f"server RSS after each phase (KiB): {rss}")
        drift = abs(rss[4] - rss[0]) / rss[0]
        assert drift <= 0.05, f"RSS after each phase (KiB): {rss}"
        assert p.poll() is None


# ------------------------------------------------------------------------------ continuous batching
# (issue 10 item 4) the same tiny model served with --parallel 4: concurrent requests are decoded
# together, each one's answer equals what it gets alone, and n > 1 runs n sequences of a request.
LONG = 120  # tokens per stream: long enough for the two streams to overlap


@pytest.fixture(scope="module")
def batch_server(tiny_dir):
    with serve_process(str(tiny_dir), "--threads", "1", "--timeout", "120", "--parallel", "4") as (p, url):
        from pyflashmoe.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(str(tiny_dir))
        bias = {str(tok.eos_token_id): -100, "2": -100}
        yield url, bias


def _chat_body(i, bias, **kw):
    return dict({"messages": [{"role": "user", "content": f"Stream {i}, tell me a long story."}],
                 "max_tokens": LONG, "temperature": 0, "logit_bias": bias}, **kw)


async def _timed_stream(c, url, body):
    """(text, [arrival time of each content chunk], usage) of one streaming chat request."""
    times, parts, usage = [], [], None
    async with c.stream("POST", url + "/v1/chat/completions",
                        json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            assert "error" not in ch, ch
            if ch.get("usage"):
                usage = ch["usage"]
            for choice in ch["choices"]:
                if choice["delta"].get("content"):
                    times.append(time.monotonic())
                    parts.append(choice["delta"]["content"])
    return "".join(parts), times, usage


def test_two_streams_are_decoded_together_and_equal_alone(batch_server):
    url, bias = batch_server
    alone = [httpx.post(url + "/v1/chat/completions", json=_chat_body(i, bias), timeout=60).json()
             for i in range(2)]
    want = [a["choices"][0]["message"]["content"] for a in alone]
    assert all(a["usage"]["completion_tokens"] == LONG for a in alone)
    h0 = httpx.get(url + "/health", timeout=10).json()

    async def both():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as c:
            return await asyncio.gather(*[_timed_stream(c, url, _chat_body(i, bias)) for i in range(2)])

    (ta, xa, ua), (tb, xb, ub) = asyncio.run(both())
    assert [ta, tb] == want  # greedy: batched decoding gives each stream its answer alone
    assert ua["completion_tokens"] == ub["completion_tokens"] == LONG
    # both progressed at once: each stream got chunks before the other one's last chunk
    assert xa[0] < xb[-1] and xb[0] < xa[-1]
    h = _wait_idle(url)
    steps, batched = h["steps"] - h0["steps"], h["batched_tokens"] - h0["batched_tokens"]
    assert batched > steps  # some steps evaluated both sequences together
    assert h["parallel"] == 4 and h["failed"] == 0


def test_a_stalled_or_gone_client_does_not_hold_up_the_others(batch_server):
    url, bias = batch_server
    want = httpx.post(url + "/v1/chat/completions", json=_chat_body(7, bias), timeout=60).json()
    want = want["choices"][0]["message"]["content"]

    async def run():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as c:
            # a client that reads one line and then stalls, and one that goes away mid-stream
            stalled = c.stream("POST", url + "/v1/chat/completions",
                               json=dict(_chat_body(8, bias, max_tokens=450), stream=True))
            rs = await stalled.__aenter__()
            assert rs.status_code == 200
            await rs.aiter_lines().__anext__()
            gone = c.stream("POST", url + "/v1/chat/completions",
                            json=dict(_chat_body(9, bias, max_tokens=450), stream=True))
            rg = await gone.__aenter__()
            assert rg.status_code == 200
            await rg.aiter_lines().__anext__()
            await gone.__aexit__(None, None, None)
            text, _, _ = await asyncio.wait_for(_timed_stream(c, url, _chat_body(7, bias)), 30)
            await stalled.__aexit__(None, None, None)
            return text

    assert asyncio.run(run()) == want
    h = _wait_idle(url)
    assert h["cancelled"] >= 1 and h["engine_thread"] == "alive" and h["failed"] == 0


def test_n_choices(batch_server):
    url, bias = batch_server
    body = _chat_body(3, bias, max_tokens=12)
    one = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    r = httpx.post(url + "/v1/chat/completions", json=dict(body, n=3), timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["message"] == one["choices"][0]["message"] for c in r["choices"])  # greedy
    assert r["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert r["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    # sampled with a seed: choice i is what seed + i gives alone
    sb = dict(body, temperature=1.0, seed=41)
    r = httpx.post(url + "/v1/chat/completions", json=dict(sb, n=2), timeout=60).json()
    for i in range(2):
        alone = httpx.post(url + "/v1/chat/completions", json=dict(sb, seed=41 + i), timeout=60).json()
        assert r["choices"][i]["message"] == alone["choices"][0]["message"], i
    # streaming: chunks of both choices, one id, one usage chunk; the same texts
    rs = httpx.post(url + "/v1/chat/completions", timeout=60,
                    json=dict(sb, n=2, stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(ev[6:]) for ev in rs.text.split("\n\n")
              if ev.startswith("data: ") and ev != "data: [DONE]"]
    assert rs.text.endswith("data: [DONE]\n\n") and len({c["id"] for c in chunks}) == 1
    texts, fins = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                fins[ch["index"]] = ch["finish_reason"]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in r["choices"]]
    assert sorted(fins) == [0, 1]
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["usage"] == r["usage"]
    # completions, streaming and not
    cb = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2}
    rc = httpx.post(url + "/v1/completions", json=cb, timeout=60).json()
    assert [c["index"] for c in rc["choices"]] == [0, 1]
    rcs = httpx.post(url + "/v1/completions", json=dict(cb, stream=True), timeout=60)
    got = {0: "", 1: ""}
    for ev in rcs.text.split("\n\n"):
        if ev.startswith("data: {"):
            for ch in json.loads(ev[6:])["choices"]:
                got[ch["index"]] += ch["text"]
    assert [got[0], got[1]] == [c["text"] for c in rc["choices"]]
    # more choices than --parallel: a 400 naming n
    r = httpx.post(url + "/v1/chat/completions", json=dict(body, n=5), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "--parallel" in r.json()["error"]["message"]


def test_an_error_in_a_batched_step_ends_its_sequences_and_the_engine_goes_on(test_data):
    """In-process server over test_server.py's controllable fake engine, --parallel 3: three
    requests decode together; an I/O error inside a batched step ends the three (500 naming the
    error; the sessions are reset), and the next request is served."""
    import threading

    from pyflashmoe.errors import ModelIOError
    from pyflashmoe.server import Server, build_app
    from test_server import _ctl_model, _Live, _msgs, _post, _tok
    qtok = _tok(test_data, "qwen3")
    m, eng = _ctl_model(qtok)
    server = Server(m, "fake", parallel=3)
    calls = {"n": 0}

    def failing(e, tokens):
        if tokens.size == 1:
            calls["n"] += 1
            if calls["n"] == 6:  # step 1: the first request alone (1 call); steps 2, 3: 3 calls
                return ModelIOError("expert read failed (test)")
        return None

    with _Live(build_app(server)) as live:
        eng.gate = threading.Event()  # hold the first prefill until the others are queued
        out = {}
        ts = [threading.Thread(target=lambda i=i: out.setdefault(i, _post(
            live.url, {"messages": _msgs(i), "max_tokens": 20, "temperature": 0}))) for i in range(3)]
        ts[0].start()
        live.wait_health(lambda h: h["running"] == 1)
        for t in ts[1:]:
            t.start()
        live.wait_health(lambda h: h["queue_depth"] == 2)
        eng.fail = failing
        eng.gate.set()
        for t in ts:
            t.join(60)
        assert [out[i].status_code for i in range(3)] == [500, 500, 500], [out[i].text for i in range(3)]
        assert all("expert read failed" in out[i].json()["error"]["message"] for i in range(3))
        assert all(s.pos == 0 for s in m.pool.sessions())
        eng.fail = None
        r = _post(live.url, {"messages": _msgs(3), "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        h = live.health()
        assert h["failed"] == 3 and h["engine_thread"] == "alive" and h["parallel"] == 3
        assert h["batched_tokens"] > h["steps"]
    server.close()


def test_serve_parallel_flag_is_checked():
    import subprocess
    for bad in ("0", "257"):
        r = subprocess.run([sys.executable, "-m", "pyflashmoe", "serve", "--parallel", bad, "--port", "1"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode != 0 and f"--parallel must be in [1, 256], got {bad}" in r.stderr, r.stderr


def test_scheduler_take_fifo_slots_and_capacity():
    """take() admits the oldest waiting requests whose sequences (job.n) fit the free slots, never
    overtaking the head; max_queue counts waiting requests besides the `slots` running ones."""
    from pyflashmoe.server import APIError, Scheduler

    class J:
        def __init__(self, n):
            self.n = n

    s = Scheduler(max_queue=1, slots=2)
    a, b, c, d = J(1), J(2), J(1), J(1)
    for j in (a, b, c):  # 2 slots + 1 waiting
        s.submit(j)
    with pytest.raises(APIError) as ei:
        s.submit(d)
    assert ei.value.status == 503
    assert s.take(2) == [a]  # b needs 2 slots: it waits, and c does not overtake it
    assert s.take(1) == [] and s.depth() == 2
    s.finished(a)
    assert s.take(2) == [b] and s.take(0) == []
    s.finished(b)
    assert s.take(2) == [c]
    s.submit(a)
    s.submit(d)
    assert s.take(2, max_jobs=1) == [a] and s.take(1) == [d]
    assert s.close() == [] and s.take(2) is None


def test_a_request_whose_thread_cannot_start_fails_alone(test_data, monkeypatch):
    from pyflashmoe import server as S
    from pyflashmoe.server import Server, build_app
    from test_server import _ctl_model, _Live, _msgs, _post, _tok
    m, _ = _ctl_model(_tok(test_data, "qwen3"))
    server = Server(m, "fake", parallel=2)
    real = S.threading.Thread

    class NoThread(real):
        def start(self):
            if self.name == "flashmoe-request" and not getattr(NoThread, "used", False):
                NoThread.used = True
                raise RuntimeError("can't start new thread (test)")
            return super().start()

    with _Live(build_app(server)) as live:
        monkeypatch.setattr(S.threading, "Thread", NoThread)
        r = _post(live.url, {"messages": _msgs(0), "max_tokens": 3})
        assert r.status_code == 500 and "can't start new thread" in r.json()["error"]["message"]
        r = _post(live.url, {"messages": _msgs(1), "max_tokens": 3})
        assert r.status_code == 200
        monkeypatch.setattr(S.threading, "Thread", real)
        h = live.wait_health(lambda h: h["running"] == 0)
        assert h["failed"] == 1 and h["completed"] == 1
    server.close()


def test_logprobs_computed_only_when_asked(test_data):
    """The engine thread computes a token's logprob (a log-softmax over the vocabulary per
    sequence and step) only for requests that ask for logprobs."""
    from pyflashmoe.server import Server
    from test_server import _ctl_model, _msgs, _tok
    m, _ = _ctl_model(_tok(test_data, "qwen3"))
    server = Server(m, "fake", parallel=2)
    try:
        def prep(**kw):
            return server.prepare_chat(dict({"messages": _msgs(0), "max_tokens": 2}, **kw))["gens"]
        assert [g.want_logprobs for g in prep(n=2)] == [False, False]
        assert [g.want_logprobs for g in prep(logprobs=True, top_logprobs=2)] == [True]
        assert [g.want_logprobs for g in server.prepare_completion(
            {"prompt": "x", "max_tokens": 2, "logprobs": 1})["gens"]] == [True]
        assert [g.want_logprobs for g in server.prepare_completion(
            {"prompt": "x", "max_tokens": 2})["gens"]] == [False]
    finally:
        server.close()
