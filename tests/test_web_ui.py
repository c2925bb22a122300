"""The web chat page that `flashmoe serve` serves at / (pyflashmoe/web: index.html, app.js,
style.css, favicon.svg; no build step, nothing from other hosts).

Without a browser (FastAPI's TestClient): / and its files are served with their content types and
a Content-Security-Policy, without the API key but behind the Host check; the files name no other
host; the package data ships them; the page's own POSTs (browsers send Origin on every POST) pass
RequestGuard, other origins do not.

In headless Chromium (the system `chromium`, driven over the Chrome DevTools Protocol with
websocket-client) against a real `flashmoe serve --api-key ...` on 127.0.0.1 with the embedded demo
model: the page loads with no console error and no request to another host, asks for the API key,
sends a typed message, streams the answer with the thinking folded and the markdown rendered,
shows usage and tok/s, stops a long generation (the server sees the disconnect, frees the engine
and answers the next request), shows server errors, and its markdown renderer keeps HTML in model
text as text. A screenshot goes to the test's tmp dir (its path is printed)."""
import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'pyflashmoe[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from pyflashmoe import generate as G  # noqa: E402
from pyflashmoe.server import (WEB_DIR, WEB_FILES, RequestGuard, Server, build_app,  # noqa: E402
                               default_allowed_hosts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from serve_process import serve_process  # noqa: E402

# the only URLs the page's files may contain: the SVG namespace (an identifier, never fetched)
ALLOWED_URLS = {"http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def demo_server():
    server = Server(G.Model.load(G.DEMO_MODEL_DIR), "demo")
    yield server
    server.close()


# ----------------------------------------------------------------------------- without a browser
def test_page_and_files_served(demo_server):
    c = TestClient(build_app(demo_server))
    r = c.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="web/app.js"' in r.text and 'href="web/style.css"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")]:
        r = c.get("/web/" + name)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), name
        with open(os.path.join(WEB_DIR, name), "rb") as f:
            assert r.content == f.read()
    for bad in ("/web/nope.js", "/web/index.html", "/web/..%2Fserver.py", "/web/%2e%2e/server.py"):
        r = c.get(bad)
        assert r.status_code == 404, bad
    assert "app.js" in c.get("/web/nope.js").json()["error"]["message"]  # names what there is


def test_page_open_without_api_key_but_behind_host_check(demo_server):
    c = TestClient(build_app(demo_server, api_key="s3cret", allowed_hosts=["testserver"]))
    assert c.get("/").status_code == 200
    assert c.get("/web/app.js").status_code == 200
    assert c.get("/v1/models").status_code == 401  # the key guards the API, not the page
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/", headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_missing_web_file_is_a_clear_404(demo_server, tmp_path):
    from fastapi import FastAPI

    from pyflashmoe.server import add_web_routes
    (tmp_path / "app.js").write_text("1")
    app = FastAPI()
    add_web_routes(app, str(tmp_path))
    c = TestClient(app)
    r = c.get("/")
    assert r.status_code == 404 and "index.html" in r.json()["error"]["message"]
    assert c.get("/web/app.js").text == "1"


def test_web_files_name_no_other_host():
    names = sorted(os.listdir(WEB_DIR))
    assert set(WEB_FILES) <= set(names)
    for name in names:
        with open(os.path.join(WEB_DIR, name), encoding="utf-8") as f:
            text = f.read()
        urls = set(re.findall(r"https?://[^\s\"'<>()]+", text, re.I))
        # the markdown renderer's link/autolink patterns mention the schemes, no host
        urls = {u for u in urls if re.match(r"https?://[a-z0-9]", u, re.I)}
        assert urls <= ALLOWED_URLS, (name, urls - ALLOWED_URLS)
        assert not re.search(r"""(src|href)\s*=\s*["']?//""", text, re.I), name  # protocol-relative
        assert not re.search(r"@import|@font-face|url\(\s*['\"]?(https?:)?//", text, re.I), name


def test_web_files_are_package_data():
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11) or tomli")
    import fnmatch
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["pyflashmoe"]
    for name in os.listdir(WEB_DIR):
        assert any(fnmatch.fnmatch("web/" + name, g) for g in globs), f"web/{name} is not package data"


def _scope(host, origin, method="POST"):
    h = [(b"host", host.encode()), (b"content-type", b"application/json")]
    if origin is not None:
        h.append((b"origin", origin.encode()))
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": h}


def test_same_origin_post_passes_the_guard():
    """Browsers send Origin on every POST, also to their own origin: the page's calls must pass,
    other origins must not, and a DNS name under allowed_hosts '*' stays refused (it could be a
    rebinding attacker's name pointing at this server)."""
    loop = RequestGuard(None, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    assert loop.check(_scope("127.0.0.1:8000", "http://127.0.0.1:8000")) is None
    assert loop.check(_scope("localhost:8000", "http://localhost:8000/")) is None
    assert loop.check(_scope("[::1]:8000", "http://[::1]:8000")) is None
    for host, origin in [("127.0.0.1:8000", "http://evil.example"),
                         ("127.0.0.1:8000", "http://127.0.0.1:8001"),
                         ("127.0.0.1:8000", "http://localhost:8000"),
                         ("127.0.0.1:8000", "null")]:
        e = loop.check(_scope(host, origin))
        assert e is not None and e.status == 403 and e.param == "Origin", (host, origin)
    anyhost = RequestGuard(None, allowed_hosts=None)  # bound to 0.0.0.0: any Host
    assert anyhost.check(_scope("192.168.1.5:8000", "http://192.168.1.5:8000")) is None
    assert anyhost.check(_scope("[fd00::5]:8000", "https://[fd00::5]:8000")) is None
    e = anyhost.check(_scope("evil.example:8000", "http://evil.example:8000"))
    assert e is not None and e.status == 403
    named = RequestGuard(None, allowed_hosts=["chat.lan"])
    assert named.check(_scope("chat.lan:8000", "http://chat.lan:8000")) is None
    # the API key is still needed
    keyed = RequestGuard(None, allowed_hosts=default_allowed_hosts("127.0.0.1"), api_key="k")
    e = keyed.check(_scope("127.0.0.1:8000", "http://127.0.0.1:8000"))
    assert e is not None and e.status == 401


def test_same_origin_chat_request_end_to_end(demo_server):
    c = TestClient(build_app(demo_server, allowed_hosts=["testserver"]))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    r = c.post("/v1/chat/completions", json=body, headers={"Origin": "http://testserver"})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    r = c.post("/v1/chat/completions", json=body, headers={"Origin": "http://other.example"})
    assert r.status_code == 403


# ----------------------------------------------------------------------------- headless Chromium
def _chromium():
    env = os.environ.get("FLASHMOE_TEST_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDP:
    """A minimal Chrome DevTools Protocol client over one page target (websocket-client)."""

    def __init__(self, ws_url):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True,
                                              enable_multithread=False)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise AssertionError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expr, await_promise=False):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr[:200]!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, timeout=60, what=None):
        deadline = time.time() + timeout
        while True:
            v = self.js(expr)
            if v:
                return v
            assert time.time() < deadline, f"timed out waiting for {what or expr}"
            time.sleep(0.05)

    def wait_event(self, method, timeout=30):
        deadline = time.time() + timeout
        while True:
            for ev in self.events:
                if ev["method"] == method:
                    self.events.remove(ev)
                    return ev
            self.ws.settimeout(max(0.1, deadline - time.time()))
            msg = json.loads(self.ws.recv())
            self.ws.settimeout(60)
            if "method" in msg:
                self.events.append(msg)
            assert time.time() < deadline, f"no {method} event"

    def drain(self):
        """Reads the events queued so far."""
        self.ws.settimeout(0.2)
        try:
            while True:
                msg = json.loads(self.ws.recv())
                if "method" in msg:
                    self.events.append(msg)
        except Exception:  # websocket timeout: nothing more queued
            pass
        finally:
            self.ws.settimeout(60)

    def type_and_enter(self, selector, text):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


def _problems(events, base):
    """Console errors, uncaught exceptions, failed loads and requests to other hosts in CDP events."""
    out = []
    for ev in events:
        m, p = ev["method"], ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            out.append(f"console.{p['type']}: " + json.dumps(p.get("args"))[:500])
        elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            out.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        elif m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not (url.startswith(base + "/") or url.startswith("data:")):
                out.append("request to another host: " + url)
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append("loading failed: " + p.get("errorText", ""))
    return out


def _requests(events, path):
    return [ev["params"]["request"] for ev in events if ev["method"] == "Network.requestWillBeSent"
            and ev["params"]["request"]["url"].split("?")[0].endswith(path)]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: install it (Debian: apt-get install chromium) or set "
                    "FLASHMOE_TEST_CHROMIUM to a Chrome/Chromium binary")
    pytest.importorskip("websocket", reason="driving Chromium needs websocket-client (pip install websocket-client)")
    import httpx
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                             "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--disable-features=Translate,MediaRouter,OptimizationHints",
                             "--metrics-recording-only", "--mute-audio", "--window-size=1280,900",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited: " + proc.stderr.read()[-2000:]
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(domain + ".enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


KEY = "web-test-key"


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("uvicorn", reason="the live server needs uvicorn (pip install 'pyflashmoe[serve]')")
    with serve_process("--api-key", KEY, "--model-name", "demo") as (proc, url):
        yield url


def _health(url):
    import httpx
    return httpx.get(url + "/health", timeout=10).json()


def _png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _think_ids():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(G.DEMO_MODEL_DIR, "tokenizer.json"))
    return tok.token_to_id("</think>"), [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]


def _answers(cdp):
    return cdp.js("document.querySelectorAll('.msg.assistant').length")


def _wait_answer(cdp, n, timeout=90):
    cdp.wait(f"document.querySelectorAll('.msg.assistant[data-done]').length >= {n}", timeout,
             f"answer {n} to finish")
    return cdp.js(f"""(() => {{
        const m = document.querySelectorAll('.msg.assistant')[{n - 1}];
        const d = m.querySelector('details.thinking');
        return {{answer: m.querySelector('.answer').textContent, html: m.querySelector('.answer').innerHTML,
                 meta: m.querySelector('.meta').textContent,
                 error: [...m.querySelectorAll('.error')].map(e => e.textContent).join('\\n'),
                 thinking: d ? {{open: d.open, summary: d.querySelector('summary').textContent,
                                 text: d.querySelector('.thought').textContent}} : null}};
    }})()""")


def test_chat_in_headless_chromium(browser, live, tmp_path):
    cdp = browser
    cdp.call("Page.navigate", url=live + "/")
    cdp.wait_event("Page.loadEventFired")
    # the server needs a key: the page says so (its /v1/models call got 401)
    cdp.wait("document.getElementById('model-name').textContent.includes('API key')", 20, "the key notice")
    # sending without the key: the server's 401 is shown in the page
    cdp.type_and_enter("#input", "hello")
    a = _wait_answer(cdp, 1)
    assert "HTTP 401" in a["error"] and "API key" in a["error"], a
    assert cdp.js("!document.getElementById('settings').hidden")  # settings opened for the key
    cdp.drain()
    unexpected = [p for p in _problems(cdp.events, live) if "status of 401" not in p]
    assert not unexpected, unexpected

    # the key (kept in localStorage), settings, and a reload: from here on no console error at all
    cdp.js(f"""(() => {{
        const set = (id, v) => {{ const e = document.getElementById(id); e.value = v;
                                  e.dispatchEvent(new Event('input', {{bubbles: true}})); }};
        set('api-key', {json.dumps(KEY)}); set('temperature', '0'); set('top_k', '20');
        set('max_tokens', '120'); set('system', 'You are a helpful assistant.');
    }})()""")
    cdp.events.clear()
    cdp.call("Page.reload")
    cdp.wait_event("Page.loadEventFired")
    cdp.wait("document.getElementById('model-name').textContent === 'demo'", 20, "the model name")
    assert cdp.js("document.getElementById('temperature').value") == "0"

    # a scripted exchange: the user's text stays text, the answer streams and finishes
    cdp.type_and_enter("#input", "Tell me a story about the sea. <b>bold?</b>")
    cdp.wait("document.getElementById('stop').hidden === false || "
             "document.querySelectorAll('.msg.assistant[data-done]').length >= 1", 20, "generation to start")
    a = _wait_answer(cdp, 1)
    assert not a["error"], a
    assert cdp.js("document.querySelector('.msg.user .body').textContent").endswith("<b>bold?</b>")
    assert cdp.js("document.querySelectorAll('.msg.user .body b').length") == 0
    assert a["answer"].strip(), a
    assert a["thinking"] is not None and a["thinking"]["open"] is False, a  # folded once the answer came
    assert a["thinking"]["text"].strip() and a["thinking"]["summary"].startswith("Thought for"), a
    assert "tok/s" in a["meta"] and "tokens" in a["meta"] and "prompt" in a["meta"], a
    assert cdp.js("document.getElementById('stop').hidden") is True
    req = _requests(cdp.events, "/v1/chat/completions")[-1]
    body = json.loads(req["postData"])
    assert req["headers"].get("Authorization") == "Bearer " + KEY
    assert body["stream"] is True and body["temperature"] == 0 and body["top_k"] == 20
    assert body["max_tokens"] == 120 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert body["model"] == "demo"

    # a second turn carries the conversation
    cdp.type_and_enter("#input", "And then?")
    a2 = _wait_answer(cdp, 2)
    assert not a2["error"] and a2["answer"].strip(), a2
    body = json.loads(_requests(cdp.events, "/v1/chat/completions")[-1]["postData"])
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == a["answer"] or body["messages"][2]["content"].strip()

    cdp.js("document.getElementById('toggle-settings').click()")  # the settings in the picture
    shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    path = tmp_path / "web_chat.png"
    path.write_bytes(shot)
    print(f"\nweb chat screenshot: {path}")
    assert _png_size(shot) == (1280, 900) and len(shot) > 20000, len(shot)

    # stop: a generation that cannot end by itself (</think> and the end tokens banned), thinking
    # open while it streams; Stop aborts the fetch, the server cancels the request
    end_think, eos = _think_ids()
    cancelled = _health(live).get("cancelled", 0)
    extra = json.dumps({"logit_bias": {str(t): -100 for t in [end_think, *eos]}, "max_tokens": 3000})
    cdp.js(f"document.getElementById('extra').value = {json.dumps(extra)}")
    cdp.type_and_enter("#input", "Think about the sea for a long time.")
    cdp.wait("(() => { const m = document.querySelectorAll('.msg.assistant')[2]; const d = m && "
             "m.querySelector('details.thinking'); return d && d.open && "
             "d.querySelector('.thought').textContent.length > 40; })()", 30, "thinking to stream")
    assert cdp.js("document.querySelectorAll('.msg.assistant')[2].querySelector('summary').textContent") \
        .startswith("Thinking")
    assert _health(live)["running"] == 1
    assert cdp.js("document.getElementById('stop').hidden") is False
    t0 = time.time()
    cdp.js("document.getElementById('stop').click()")
    a3 = _wait_answer(cdp, 3, timeout=10)
    assert a3["meta"].startswith("stopped") and not a3["error"], a3
    deadline = time.time() + 10
    while True:  # the server saw the disconnect and freed the engine
        h = _health(live)
        if h["running"] == 0 and h.get("cancelled", 0) > cancelled:
            break
        assert time.time() < deadline, h
        time.sleep(0.05)
    assert time.time() - t0 < 10 and h["status"] == "ok"

    # New chat during a generation stops it too, and the late end of that request does not leak
    # into the new conversation
    cancelled = h.get("cancelled", 0)
    cdp.type_and_enter("#input", "Think about the sky for a long time.")
    cdp.wait("(() => { const m = document.querySelectorAll('.msg.assistant')[3]; const d = m && "
             "m.querySelector('details.thinking'); return d && d.open; })()", 30, "thinking to stream")
    cdp.js("document.getElementById('new-chat').click()")
    cdp.wait("document.getElementById('stop').hidden", 10, "the request to end")
    assert cdp.js("document.querySelectorAll('.msg').length") == 0
    assert cdp.js("flashmoe.state.messages.length") == 0
    h = _health(live)
    deadline = time.time() + 10
    while not (h["running"] == 0 and h.get("cancelled", 0) > cancelled):
        assert time.time() < deadline, h
        time.sleep(0.05)
        h = _health(live)

    # a server error is shown in the page (a 400 naming the field), then the next request answers
    cdp.js("document.getElementById('extra').value = '{\"top_p\": 7}'")
    cdp.type_and_enter("#input", "hello again")
    a4 = _wait_answer(cdp, 1)
    assert "HTTP 400" in a4["error"] and "top_p" in a4["error"], a4
    cdp.js("document.getElementById('extra').value = ''")
    cdp.type_and_enter("#input", "hello again")
    a5 = _wait_answer(cdp, 2)
    assert not a5["error"] and a5["answer"].strip() and "tok/s" in a5["meta"], a5
    assert a5["thinking"] is not None

    # thinking off: enable_thinking false, no thinking block
    cdp.js("document.getElementById('thinking').click()")
    cdp.type_and_enter("#input", "Say hello.")
    a6 = _wait_answer(cdp, 3)
    assert not a6["error"] and a6["thinking"] is None and a6["answer"].strip(), a6
    body = json.loads(_requests(cdp.events, "/v1/chat/completions")[-1]["postData"])
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    cdp.js("document.getElementById('thinking').click()")

    # new chat empties the page and the conversation
    cdp.js("document.getElementById('new-chat').click()")
    assert cdp.js("document.querySelectorAll('.msg').length") == 0
    assert cdp.js("flashmoe.state.messages.length") == 0

    cdp.drain()
    problems = [p for p in _problems(cdp.events, live) if "status of 400" not in p]
    assert not problems, problems  # no console error, no request to another host


EVIL = """# Title <script>window.__pwned = 1</script>
Some **bold** and *italic* and `inline <code>` text, a [link](https://example.org/a_b?x=1&y=2) and
a [bad link](javascript:window.__pwned=2) and <img src=x onerror="window.__pwned=3">.

- item <b>one</b>
- item two
  1. nested
  2. nested two

```html
<script>window.__pwned = 4</script>
```

> quote with <iframe src="javascript:1"></iframe>

| a | b |
|---|--:|
| <svg onload=x> | 2 |
"""


def test_markdown_renderer_escapes_html(browser, live):
    cdp = browser
    if not cdp.js("typeof window.flashmoe === 'object'"):
        cdp.call("Page.navigate", url=live + "/")
        cdp.wait_event("Page.loadEventFired")
        cdp.wait("typeof window.flashmoe === 'object'", 20)
    r = cdp.js(f"""(() => {{
        const box = document.createElement('div');
        box.className = 'answer';
        box.innerHTML = flashmoe.renderMarkdown({json.dumps(EVIL)});
        document.body.appendChild(box);
        const q = (s) => [...box.querySelectorAll(s)].map(e => e.textContent);
        const out = {{
            tags: [...new Set([...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()))].sort(),
            attrs: [...new Set([...box.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name)))].sort(),
            hrefs: [...box.querySelectorAll('a')].map(a => a.getAttribute('href')),
            h1: q('h1'), strong: q('strong'), em: q('em'), code: q('code'), li: q('li'),
            nested: box.querySelectorAll('ul > li ol > li').length, text: box.textContent,
            pwned: window.__pwned === undefined ? null : window.__pwned,
            th: q('th'), right: box.querySelectorAll('td.al-r').length,
        }};
        box.remove();
        return out;
    }})()""")
    assert not set(r["tags"]) & {"script", "img", "iframe", "svg", "b", "object", "embed"}, r["tags"]
    assert set(r["attrs"]) <= {"href", "target", "rel", "class", "type", "start"}, r["attrs"]
    assert r["hrefs"] == ["https://example.org/a_b?x=1&y=2"], r["hrefs"]  # no javascript: link
    assert r["pwned"] is None
    assert r["h1"] == ["Title <script>window.__pwned = 1</script>"]
    assert "bold" in r["strong"] and "italic" in r["em"]
    assert "inline <code>" in r["code"] and "<script>window.__pwned = 4</script>" in r["code"]
    assert "item <b>one</b>" in r["li"] and r["nested"] == 2
    for s in ('<img src=x onerror="window.__pwned=3">', "[bad link](javascript:window.__pwned=2)",
              '<iframe src="javascript:1"></iframe>', "<svg onload=x>"):
        assert s in r["text"], s
    assert r["th"] == ["a", "b"] and r["right"] == 1
    # the streaming case: an unclosed code fence renders as code so far
    html = cdp.js("flashmoe.renderMarkdown('text\\n```py\\nprint(1 < 2)')")
    assert "<pre>" in html and "print(1 &lt; 2)" in html
