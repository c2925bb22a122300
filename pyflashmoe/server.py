"""OpenAI-compatible HTTP server: `flashmoe serve DIR [--host 127.0.0.1] [--port 8000]`.

Endpoints: GET /v1/models, GET /v1/models/{id}, GET /health, POST /v1/chat/completions,
POST /v1/completions.

* One Model behind a lock: one generation at a time, other requests wait their turn. The
  model's session keeps its state, so a chat request whose prompt extends the previous request's
  prompt + answer only evaluates the new tokens.
* Sampling: temperature, top_p, max_tokens / max_completion_tokens, stop, seed, n=1, plus the
  common extensions top_k, min_p, repetition_penalty and chat_template_kwargs (e.g.
  {"enable_thinking": false}). Omitted sampling fields use the model's generation_config.json
  (greedy when it has none). presence_penalty / frequency_penalty are accepted and ignored.
  max_tokens defaults to the rest of the context.
* stream=true sends Server-Sent Events: `data: {chunk}` lines and a final `data: [DONE]`;
  stream_options.include_usage adds a usage chunk.
* Tool calls (tools, tool_choice "auto" | "none" | "required" | {"type": "function", ...}): the
  chat template renders the tools; the output's `<tool_call>` blocks (Qwen3.5 XML or Qwen3 JSON,
  see pyflashmoe.toolcalls) become `tool_calls` with finish_reason "tool_calls". "required" and a
  named function are not enforced by a grammar: the model is asked, not forced.
* Reasoning (`<think>...</think>`) is returned as `reasoning_content`, never in `content`.
* response_format {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema":
  ...}}: decoding is masked by llguidance so the output is JSON (matching the schema). Thinking is
  switched off for these requests unless chat_template_kwargs sets enable_thinking.
* Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}; a malformed request
  gets a 400 naming the field.
"""
import json
import math
import threading
import time
import uuid

from pyflashmoe.errors import ArgumentError, ContextFullError, FlashMoEError
from pyflashmoe.toolcalls import OutputParser, prompt_opens_thinking

_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, message, param=None, status=400, type_="invalid_request_error", code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ------------------------------------------------------------------------------ validation
def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(body, key, lo=None, hi=None, lo_open=False, hi_open=False):
    v = body.get(key)
    if v is None:
        return None
    if not _is_num(v):
        raise APIError(f"'{key}' must be a finite number, got {v!r}", key)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise APIError(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise APIError(f"'{key}' must be {'<' if hi_open else '<='} {hi}, got {v}", key)
    return float(v)


def _integer(body, key, lo=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise APIError(f"'{key}' must be an integer, got {v!r}", key)
    v = int(v)
    if lo is not None and v < lo:
        raise APIError(f"'{key}' must be >= {lo}, got {v}", key)
    return v


def _bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{key}' must be a boolean, got {v!r}", key)
    return v


def parse_sampling(body: dict) -> dict:
    """Validated generate() keyword arguments from an OpenAI request body."""
    kw = {}
    t = _number(body, "temperature", lo=0)
    if t is not None:
        kw["temperature"] = t
    p = _number(body, "top_p", lo=0, hi=1, lo_open=True)
    if p is not None:
        kw["top_p"] = p
    k = _integer(body, "top_k", lo=-1)
    if k is not None:
        kw["top_k"] = max(k, 0)  # -1 = disabled (vLLM convention)
    m = _number(body, "min_p", lo=0, hi=1, hi_open=True)
    if m is not None:
        kw["min_p"] = m
    r = _number(body, "repetition_penalty", lo=0, lo_open=True)
    if r is not None:
        kw["repetition_penalty"] = r
    for key in ("presence_penalty", "frequency_penalty"):
        _number(body, key, lo=-2, hi=2)
    seed = _integer(body, "seed")
    if seed is not None:
        kw["seed"] = seed % (1 << 64)
    for key in ("max_completion_tokens", "max_tokens"):
        n = _integer(body, key, lo=0)
        if n is not None:
            kw["max_tokens"] = n
            break
    n = _integer(body, "n", lo=1)
    if n is not None and n != 1:
        raise APIError("'n' > 1 is not supported (one choice per request)", "n")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError("'stop' must be a string or a list of strings", "stop")
        if any(s == "" for s in stop):
            raise APIError("'stop' strings must not be empty", "stop")
        if stop:
            kw["stop"] = stop
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        key = "logprobs" if body.get("logprobs") not in (None, False) else "top_logprobs"
        raise APIError(f"'{key}' is not supported by this server", key)
    return kw


def _text_of(content, where):
    """Message content -> str (text parts joined) or None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, dict):
                raise APIError(f"{where}[{j}] must be an object", f"{where}[{j}]")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{where}[{j}]: only text content parts are supported "
                               f"(got type {part.get('type')!r})", f"{where}[{j}].type")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"{where} must be a string, a list of content parts or null", where)


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError("'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object", where)
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(_ROLES)})",
                           f"{where}.role")
        content = _text_of(m.get("content"), f"{where}.content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if role in ("system", "developer", "user", "tool") and content is None:
            raise APIError(f"{where}.content is required for role {role!r}", f"{where}.content")
        if role == "assistant":
            rc = m.get("reasoning_content", m.get("reasoning"))
            if rc is not None:
                if not isinstance(rc, str):
                    raise APIError(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
                msg["reasoning_content"] = rc
            tcs = m.get("tool_calls")
            if tcs is not None:
                if not isinstance(tcs, list):
                    raise APIError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
                calls = []
                for j, tc in enumerate(tcs):
                    w = f"{where}.tool_calls[{j}]"
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise APIError(f"{w}.function.name is required", f"{w}.function.name")
                    args = fn.get("arguments", "{}")
                    if isinstance(args, str):
                        try:
                            args_obj = json.loads(args) if args.strip() else {}
                        except ValueError:
                            raise APIError(f"{w}.function.arguments is not valid JSON",
                                           f"{w}.function.arguments") from None
                    else:
                        args_obj = args
                    if not isinstance(args_obj, dict):
                        raise APIError(f"{w}.function.arguments must be a JSON object",
                                       f"{w}.function.arguments")
                    calls.append({"id": tc.get("id"), "type": "function",
                                  "function": {"name": fn["name"], "arguments": args_obj}})
                if calls:
                    msg["tool_calls"] = calls
            if content is None:  # templates read message.content (None would be dropped)
                msg["content"] = ""
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def parse_tools(body: dict):
    """(tools or None, tool_choice) validated."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError("'tool_choice' needs 'tools'", "tool_choice")
        return None, "none"
    if not isinstance(tools, list):
        raise APIError("'tools' must be a list", "tools")
    names = []
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        if not isinstance(t, dict):
            raise APIError(f"{w} must be an object", w)
        if t.get("type", "function") != "function":
            raise APIError(f"{w}.type must be 'function'", f"{w}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise APIError(f"{w}.function is required", f"{w}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"{w}.function.name must be a non-empty string", f"{w}.function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(f"{w}.function.parameters must be a JSON schema object",
                           f"{w}.function.parameters")
        names.append(fn["name"])
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError("'tool_choice' object must be {\"type\": \"function\", \"function\": "
                           "{\"name\": ...}}", "tool_choice")
        if name not in names:
            raise APIError(f"'tool_choice' names function {name!r}, which is not in 'tools'",
                           "tool_choice")
        tools = [t for t in tools if t["function"]["name"] == name]
        return tools, "required"
    if choice not in ("none", "auto", "required"):
        raise APIError("'tool_choice' must be 'none', 'auto', 'required' or a function object",
                       "tool_choice")
    return (tools if choice != "none" else None), choice


def parse_response_format(body: dict):
    """None, or ("json", schema-or-None)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise APIError("'response_format' must be an object", "response_format")
    typ = rf.get("type")
    if typ == "text":
        return None
    if typ == "json_object":
        return ("json", None)
    if typ == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError("'response_format.json_schema' must be an object with a 'schema'",
                           "response_format.json_schema")
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:
            schema = {}
        if not isinstance(schema, (dict, bool)):
            raise APIError("'response_format.json_schema.schema' must be a JSON schema object",
                           "response_format.json_schema.schema")
        return ("json", schema)
    raise APIError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {typ!r}",
                   "response_format.type")


_PARAM_WORDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                "max_tokens", "stop", "chat_template_kwargs", "messages", "schema")


def _param_from_message(msg: str):
    for w in _PARAM_WORDS:
        if msg.startswith(w) or f"'{w}'" in msg or f" {w} " in msg:
            return w
    return None


# ------------------------------------------------------------------------------ server
class Server:
    """Request handling independent of the web framework (build_app wraps it in FastAPI)."""

    def __init__(self, model, model_name: str = "model"):
        self.model = model
        self.model_name = model_name
        self.lock = threading.Lock()
        self.created = int(time.time())

    # ----- request -> prepared generation
    def _constraint(self, fmt, max_tokens):
        if fmt is None:
            return None
        from pyflashmoe.constrain import json_constraint
        try:
            return json_constraint(self.model, fmt[1], max_tokens=max_tokens)
        except ArgumentError as e:
            param = "response_format.json_schema" if fmt[1] is not None else "response_format"
            raise APIError(f"{param}: {e}", param) from None

    def prepare_chat(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", None)
        msgs = parse_messages(body)
        kw = parse_sampling(body)
        tools, choice = parse_tools(body)
        fmt = parse_response_format(body)
        ctk = body.get("chat_template_kwargs")
        if ctk is None:
            ctk = {}
        if not isinstance(ctk, dict):
            raise APIError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        ctk = dict(ctk)
        tok = self.model.tokenizer
        if tok is None:
            raise APIError("this model has no tokenizer.json; chat completions are unavailable", None,
                           status=500, type_="server_error")
        if fmt is not None and "enable_thinking" not in ctk and tok.chat_template \
                and "enable_thinking" in tok.chat_template:
            ctk["enable_thinking"] = False
        enable_thinking = ctk.pop("enable_thinking", None)
        try:
            text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                           enable_thinking=enable_thinking, **ctk)
        except ArgumentError as e:
            raise APIError(f"messages: {e}", "messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        in_reasoning = prompt_opens_thinking(text) and fmt is None
        parser_args = dict(in_reasoning=in_reasoning, tools=tools,
                           parse_tools=bool(tools) and fmt is None)
        return self._start(ids, kw, fmt, parser_args)

    def prepare_completion(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", None)
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError("'prompt' is required", "prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise APIError("this model has no tokenizer.json; pass 'prompt' as token ids", "prompt")
            if prompt == "":
                raise APIError("'prompt' must not be empty", "prompt")
            ids = tok.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if t < 0 or t >= self.model.n_vocab]
            if bad:
                raise APIError(f"'prompt' token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.model.n_vocab})", "prompt")
        else:
            raise APIError("'prompt' must be a non-empty string or a list of token ids "
                           "(one prompt per request)", "prompt")
        if body.get("suffix") is not None:
            raise APIError("'suffix' is not supported", "suffix")
        best_of = _integer(body, "best_of", lo=1)
        if best_of not in (None, 1):
            raise APIError("'best_of' > 1 is not supported", "best_of")
        kw = parse_sampling(body)
        fmt = parse_response_format(body)
        echo = _bool(body, "echo")
        st = self._start(ids, kw, fmt, None)
        st["echo"] = (prompt if isinstance(prompt, str) else (tok.decode(ids) if tok else "")) \
            if echo else ""
        return st

    def _start(self, ids, kw, fmt, parser_args) -> dict:
        m = self.model
        if len(ids) >= m.context_length:
            raise APIError(f"the prompt has {len(ids)} tokens; the model's context length is "
                           f"{m.context_length}", "messages" if parser_args is not None else "prompt",
                           code="context_length_exceeded")
        kw = dict(kw)
        kw.setdefault("max_tokens", m.context_length - len(ids))
        budget = min(kw["max_tokens"], m.context_length - len(ids))
        constraint = self._constraint(fmt, budget)
        try:
            gen = m.generate(ids, logits_processor=constraint, **kw)
        except ContextFullError as e:
            raise APIError(str(e), "messages", code="context_length_exceeded") from None
        except ArgumentError as e:
            raise APIError(str(e), _param_from_message(str(e))) from None
        return {"gen": gen, "n_prompt": len(ids), "parser_args": parser_args}

    # ----- running (call with the lock held)
    def _usage(self, st):
        s = self.model.stats or {}
        n = int(s.get("generated_tokens", 0))
        return {"prompt_tokens": st["n_prompt"], "completion_tokens": n,
                "total_tokens": st["n_prompt"] + n,
                "prompt_tokens_details": {"cached_tokens": int(s.get("cached_tokens", 0))}}

    def run_chat(self, st) -> dict:
        parser = OutputParser(**st["parser_args"])
        finish = None
        for piece in st["gen"]:
            if piece.text:
                parser.feed(piece.text)
            finish = piece.finish_reason or finish
        parser.finish()
        res = parser.result()
        msg = {"role": "assistant", "content": res.content if (res.content or not res.tool_calls) else None}
        if res.reasoning:
            msg["reasoning_content"] = res.reasoning
        if res.tool_calls:
            msg["tool_calls"] = res.tool_calls
            finish = "tool_calls"
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, "message": msg, "logprobs": None,
                             "finish_reason": finish or "stop"}],
                "usage": self._usage(st)}

    def run_completion(self, st) -> dict:
        finish = None
        parts = [st["echo"]]
        for piece in st["gen"]:
            parts.append(piece.text)
            finish = piece.finish_reason or finish
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, "text": "".join(parts), "logprobs": None,
                             "finish_reason": finish or "stop"}],
                "usage": self._usage(st)}

    def stream_chat(self, st, include_usage=False):
        """Yields chunk dicts (the caller frames them as SSE)."""
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def deltas(events):
            for kind, text in events:
                yield chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})

        parser = OutputParser(**st["parser_args"])
        yield chunk({"role": "assistant", "content": ""})
        finish = None
        for piece in st["gen"]:
            if piece.text:
                yield from deltas(parser.feed(piece.text))
            finish = piece.finish_reason or finish
        events, calls = parser.finish()
        yield from deltas(events)
        if calls:
            finish = "tool_calls"
            yield chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
        yield chunk({}, finish or "stop")
        if include_usage:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": self.model_name, "choices": [], "usage": self._usage(st)}

    def stream_completion(self, st, include_usage=False):
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(text, finish=None):
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": self.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if st["echo"]:
            yield chunk(st["echo"])
        for piece in st["gen"]:
            if piece.text or piece.finish_reason:
                yield chunk(piece.text, piece.finish_reason)
        if include_usage:
            yield {"id": cid, "object": "text_completion", "created": created,
                   "model": self.model_name, "choices": [], "usage": self._usage(st)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "pyflashmoe", "context_length": self.model.context_length}


def _error_body(e: Exception):
    if isinstance(e, APIError):
        return e.status, e.body()
    if isinstance(e, ContextFullError):
        return 400, APIError(str(e), "messages", code="context_length_exceeded").body()
    if isinstance(e, ArgumentError):
        return 400, APIError(str(e), _param_from_message(str(e))).body()
    if isinstance(e, FlashMoEError):
        return 500, APIError(str(e), None, 500, "server_error").body()
    return 500, APIError(f"internal error: {type(e).__name__}: {e}", None, 500, "server_error").body()


class _LockedStream:
    """A sync iterator over SSE lines that holds the server lock while generating and releases
    it when done, on error, or when the client goes away (close())."""

    def __init__(self, server: Server, chunks):
        self.server, self.chunks = server, chunks
        self.cancelled = False

    def __iter__(self):
        with self.server.lock:
            try:
                for c in self.chunks:
                    if self.cancelled:
                        break
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            except Exception as e:  # report mid-stream errors in-band, then end the stream
                yield f"data: {json.dumps(_error_body(e)[1], ensure_ascii=False)}\n\n"
            finally:
                close = getattr(self.chunks, "close", None)
                if close:
                    close()
        yield "data: [DONE]\n\n"


def build_app(server: Server):
    """The FastAPI application around a Server."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="pyflashmoe", docs_url=None, redoc_url=None)

    def err(e):
        status, body = _error_body(e)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request, exc):
        return JSONResponse(APIError(str(exc.detail), None, exc.status_code,
                                     "not_found_error" if exc.status_code == 404 else "invalid_request_error"
                                     ).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(request, exc):
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        return JSONResponse(APIError(f"invalid request: {errs[0].get('msg') if errs else exc}",
                                     loc or None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _any_exc(request, exc):
        return err(exc)

    async def read_body(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}", None) from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", None)
        return body

    def stream_opts(body):
        stream = _bool(body, "stream")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise APIError("'stream_options' must be an object", "stream_options")
        include_usage = bool(so and so.get("include_usage"))
        return stream, include_usage

    def _run_locked(fn, st):
        with server.lock:
            try:
                return fn(st)
            finally:
                close = getattr(st["gen"], "close", None)
                if close:
                    close()

    async def handle(request, prepare, run, stream_fn):
        try:
            body = await read_body(request)
            stream, include_usage = stream_opts(body)
            st = await run_in_threadpool(prepare, body)
        except Exception as e:
            return err(e)
        if stream:
            it = _LockedStream(server, stream_fn(st, include_usage))
            gen = iter(it)

            async def agen():
                try:
                    while True:
                        line = await run_in_threadpool(next, gen, None)
                        if line is None:
                            break
                        yield line
                finally:
                    it.cancelled = True
                    try:
                        gen.close()
                    except ValueError:  # still running in a worker thread: it stops at `cancelled`
                        pass

            return StreamingResponse(agen(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await run_in_threadpool(_run_locked, run, st))
        except Exception as e:
            return err(e)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            return err(APIError(f"model {model_id!r} not found (this server has {server.model_name!r})",
                                "model", 404, "not_found_error", "model_not_found"))
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, server.prepare_chat, server.run_chat, server.stream_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, server.prepare_completion, server.run_completion,
                            server.stream_completion)

    return app


def serve_cli(a) -> int:
    """`flashmoe serve DIR ...`: load the model once and serve it with uvicorn."""
    import os
    try:
        import uvicorn
    except ImportError:
        raise FlashMoEError("flashmoe serve needs fastapi and uvicorn: pip install 'pyflashmoe[serve]'") from None
    from pyflashmoe.generate import load_from_args
    model = load_from_args(a)
    name = a.model_name or os.path.basename(os.path.normpath(a.dir))
    app = build_app(Server(model, name))
    if model.tokenizer is not None and model.eos_token_ids:
        def warm():  # build llguidance's tokenizer now, not on the first JSON request
            try:
                from pyflashmoe.constrain import llg_tokenizer
                llg_tokenizer(model.tokenizer.path, model.n_vocab, model.eos_token_ids)
            except Exception:
                pass  # reported when a JSON request needs it
        threading.Thread(target=warm, daemon=True).start()
    print(f"flashmoe serve: {name} on http://{a.host}:{a.port}/v1", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0
