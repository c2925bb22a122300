"""OpenAI- and Anthropic-compatible HTTP server: `flashmoe serve DIR [--host 127.0.0.1] [--port 8000]
[--parallel 4] [--max-queue 256] [--timeout 3600] [--max-body 4MiB] [--allowed-hosts H,...] [--cors-origins O,...]`.

Endpoints: GET /v1/models, GET /v1/models/{id}, GET /health, POST /v1/chat/completions,
POST /v1/completions, and Anthropic's Messages API: POST /v1/messages, POST
/v1/messages/count_tokens.
GET / is a web chat page (pyflashmoe/web: static files, no CDN; served without the API key,
which the page asks for when the server needs one).

* The Messages API (pyflashmoe.server_anthropic) is a conversion layer over the chat path: its
  system / messages (text, tool_use, tool_result, thinking blocks) become the OpenAI-style
  messages the chat template takes, tools / tool_choice ("any" and a named tool are enforced by
  the tool-call grammar like "required"), thinking -> enable_thinking, stop_sequences -> stop;
  it runs on the same engine thread, queue, limits and sampling ranges, and the output
  (OutputParser) comes back as thinking / text / tool_use content blocks with stop_reason and
  usage, or as Anthropic's SSE events (message_start ... message_stop). Its errors are
  Anthropic-shaped ({"type": "error", "error": {"type", "message"}}, the message naming the
  field). The anthropic-version header is accepted; x-api-key is the key when --api-key is set.
* One engine thread owns the Model and decodes up to --parallel N sequences together
  (continuous batching, default 4): between two decode steps it admits waiting requests in FIFO
  order of arrival (Scheduler.take: their prefill runs, then they join the batched step; while
  sequences run, one request is admitted per step, so a burst of long prompts does not stall the
  running streams for all of their prefills at once) and drops the finished, cancelled and
  timed-out ones; one step evaluates a token of every running
  sequence at once (Model._eval_batch: each MoE layer reads the union of their experts once).
  Each sequence's pieces go to its request's feed; each request has its own thread that turns
  them into chunks or a result and puts those on the request's asyncio queue (through
  loop.call_soon_threadsafe), so no request holds a lock while it waits or streams: a slow or
  stalled client cannot hold up the others. `n` > 1 (chat and completions) runs n sequences of
  one request (seeds seed, seed+1, ...; n <= --parallel), choices 0..n-1, streamed interleaved.
  Sessions come from the Model's StatePool, so a chat request whose prompt extends an earlier
  request's prompt + answer only evaluates the new tokens.
* At most --max-queue requests wait (default 256) besides the running ones; beyond that a request
  gets 503 with Retry-After. --timeout bounds a request's total time, queued + running (default
  3600 s, 0 = none): past it a request ends with 504 (in-band error event when streaming). A client
  that disconnects cancels its request at once: a queued one is dropped before it runs, a running
  one stops before its next token. An exception from a generation (e.g. NumericalError, an I/O
  error) ends that request with a 500 error (streaming: a `data: {"error": ...}` event, then
  `data: [DONE]`); the engine thread goes on with the next request. /health reports the engine
  thread, the queue depth and counters; it is 503 when the engine thread is not running, or
  is stuck in one step 30 s past the running request's deadline.
* Limits, each a 4xx naming the field: the body (--max-body, default 4 MiB, 413, enforced while
  reading, chunked or not), the message count (4096), each message's and the rendered prompt's
  length (a prompt with more characters than the context can hold, context length x the longest
  token in characters, is refused before it is tokenized), max_tokens / max_completion_tokens <=
  the context length, ranges of every sampling field (below), at most 16 stop strings of <= 512
  characters, at most 128 tools. chat_template_kwargs: a client may set only enable_thinking (a
  boolean); any other key is a 400 naming it.
* Sampling: temperature [0, 100], top_p (0, 1], top_k -1..vocab (-1/0 = off), min_p [0, 1),
  repetition_penalty (0, 100], seed any int64, max_tokens / max_completion_tokens, stop, n (1..--parallel).
  Omitted sampling fields use the model's generation_config.json (greedy when it has none).
  presence_penalty / frequency_penalty [-2, 2] are accepted and ignored. max_tokens defaults to
  the rest of the context.
* Browsers: POST bodies must be Content-Type application/json (else 415), so a cross-origin
  "simple" request cannot start a generation; a request with an Origin header is refused (403)
  unless --cors-origins lists it ("*" = any; CORS is off by default) or it is the server's own
  origin (http(s)://Host: the web page at /) with a Host that passed the allow-list or is an IP
  address or localhost (a DNS name under --allowed-hosts '*' could be rebinding). When bound to a loopback
  address only loopback Host headers (127.0.0.1, localhost, [::1], any port) are accepted (400
  otherwise: DNS rebinding); --allowed-hosts sets the list ("*" = any; the default for other
  addresses).
* --api-key KEY (or $FLASHMOE_API_KEY): every /v1/ request must carry the key as `Authorization:
  Bearer KEY` or `x-api-key: KEY` (401 otherwise; compared in constant time); /health stays open.
* Memory: big bodies are dropped as soon as they are parsed, and when the engine goes idle after
  work the heap is trimmed (glibc malloc_trim), so RSS comes back after large requests.
* logprobs (chat: `logprobs: true` + `top_logprobs` 0..20; completions: `logprobs` 0..5):
  OpenAI's shapes (chat: choices[i].logprobs.content = [{token, logprob, bytes, top_logprobs}];
  completions: {tokens, token_logprobs, top_logprobs, text_offset}), streamed on the chunks that
  follow the tokens. The values are the model's raw distribution (log-softmax of the logits
  before sampling settings, logit_bias or a grammar); the ending EOS token is not listed; with
  echo, the prompt's tokens are not listed (text_offset counts from the end of the echo).
* stream=true sends Server-Sent Events: `data: {chunk}` lines and a final `data: [DONE]`;
  stream_options.include_usage adds a usage chunk.
* Tool calls (tools, tool_choice "auto" | "none" | "required" | {"type": "function", ...}): the
  chat template renders the tools; the output's `<tool_call>` blocks (Qwen3.5 XML or Qwen3 JSON,
  see pyflashmoe.toolcalls) become `tool_calls` with finish_reason "tool_calls". With a chat
  template that uses the Qwen3.5 XML call format, "required" and a named function are enforced by
  an llguidance grammar (pyflashmoe.constrain.tool_call_constraint): the answer is a call to an
  offered function (or the named one; several when parallel_tool_calls is not false) whose
  arguments match its JSON schema. With other templates (Qwen3's JSON calls) the model is asked,
  not forced.
* Reasoning (`<think>...</think>`) is returned as `reasoning_content`, never in `content`.
* response_format {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema":
  ...}}: decoding is masked by llguidance so the output is JSON (matching the schema). Thinking is
  switched off for these requests unless chat_template_kwargs sets enable_thinking.
* Request bodies are pydantic models (pyflashmoe.api_models: ChatCompletionRequest,
  CompletionRequest, MessagesRequest, CountTokensRequest) that FastAPI validates; unknown fields
  are ignored. What needs the model (max_tokens against the context, top_k and logit_bias against
  the vocabulary, prompt lengths, a named tool) is checked when the request is prepared.
* Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}; a malformed request
  gets a 400 whose `param` is the field's dotted path (`messages.0.content.0.type`) and whose
  message says what was wrong and what was sent.
"""
import asyncio
import collections
import ctypes
import functools
import gc
import hmac
import ipaddress
import json
import math
import os
import queue
import threading
import time
import uuid

from pyflashmoe import errors as _errors
from pyflashmoe.errors import ArgumentError, ContextFullError, FlashMoEError

try:  # the request models need pydantic v2 (it comes with fastapi: pip install 'pyflashmoe[serve]')
    from pyflashmoe import api_models as _models
    from pyflashmoe.api_models import (CLIENT_TEMPLATE_KWARGS, MAX_MESSAGES, MAX_STOP,  # noqa: F401
                                       MAX_STOP_CHARS, MAX_TOOLS)
except ImportError as _e:  # pragma: no cover - depends on the install
    raise FlashMoEError(f"flashmoe serve needs fastapi, uvicorn and pydantic>=2: "
                        f"pip install 'pyflashmoe[serve]' ({_e})") from None
from pyflashmoe.toolcalls import OutputParser, prompt_opens_thinking

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_QUEUE = 256
DEFAULT_TIMEOUT = 3600.0
#: `flashmoe serve --parallel` default: sequences decoded together. Each running sequence holds
#: a session (its context's KV rows + recurrent state, made when first needed), and the batched
#: step reads the union of the sequences' experts once: 4 covers the usual local load (a few
#: agents or chat tabs) at 4 sessions' memory, and most of the gain of batching comes from the
#: first few sequences (their experts overlap least); raise it for more concurrent streams.
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 256
# request limits and field ranges: pyflashmoe.api_models (the request models)
BIG_BODY = 1 << 20  # bodies at least this big trigger a gc + heap trim once the server is idle
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
BODY_SIZE_KEY = "flashmoe.body_size"  # ASGI scope key: the POST body's size (RequestGuard)


class APIError(Exception):
    def __init__(self, message, param=None, status=400, type_="invalid_request_error", code=None,
                 headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _short(v, n=60):
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ------------------------------------------------------------------------------ validation
# The request bodies are pydantic models (pyflashmoe.api_models), validated by FastAPI; what
# follows turns a validated request into generate() arguments and template messages, with the
# checks that need the served model (context length, vocabulary, prompt length).
def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def invalid_request(errors, body_loc: bool = False) -> APIError:
    """The 400 APIError of pydantic's errors (api_models.error_of: the first error, its field as
    a dotted path)."""
    msg, param = _models.error_of(errors, body_loc)
    return APIError(msg, param)


def validate_request(cls, body):
    """body as a `cls` request model (a dict is validated; a cls instance is returned as is);
    else an APIError naming the field."""
    if isinstance(body, cls):
        return body
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", None)
    try:
        return cls.model_validate(body)
    except _models.ValidationError as e:
        raise invalid_request(e.errors()) from None


def sampling_kw(req, context_length: int | None = None, n_vocab: int | None = None) -> dict:
    """generate() keyword arguments of a validated request (OpenAI's, or Anthropic's sampling
    fields). With context_length, max_tokens above it is an error; with n_vocab, so are top_k
    above it and logit_bias ids outside the vocabulary."""
    kw = {}
    for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
        v = getattr(req, key, None)
        if v is not None:
            kw[key] = float(v)
    k = getattr(req, "top_k", None)
    if k is not None:
        if n_vocab is not None and k > n_vocab:
            raise APIError(f"'top_k' must be <= {n_vocab} (the vocabulary size), got {k}", "top_k")
        kw["top_k"] = max(k, 0)  # -1 = disabled (vLLM convention)
    seed = getattr(req, "seed", None)
    if seed is not None:
        kw["seed"] = seed % (1 << 64)
    for key in ("max_completion_tokens", "max_tokens"):
        n = getattr(req, key, None)
        if n is not None:
            if context_length is not None and n > context_length:
                raise APIError(f"'{key}' must be <= {context_length} (the model's context length), "
                               f"got {n}", key)
            kw["max_tokens"] = n
            break
    n = getattr(req, "n", None)
    if n is not None and n != 1:
        kw["n"] = n  # choices: Server._start checks it against --parallel
    stop = getattr(req, "stop", None)
    if stop:
        kw["stop"] = [stop] if isinstance(stop, str) else list(stop)
    bias = getattr(req, "logit_bias", None)
    if bias:
        bad = [i for i in bias if n_vocab is not None and i >= n_vocab]
        if bad:
            raise APIError(f"'logit_bias' key '{bad[0]}' is outside the vocabulary [0, {n_vocab})",
                           "logit_bias")
        kw["logit_bias"] = dict(bias)
    return kw


def _text_of(content) -> str | None:
    """Message content (a string, content parts or None) -> str or None."""
    if content is None or isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else p.text for p in content)


def _check_len(text, where, max_chars):
    if max_chars is not None and text is not None and len(text) > max_chars:
        raise APIError(f"'{where}' has {len(text)} characters, more than the model's context can "
                       f"hold (at most {max_chars})", where, code="context_length_exceeded")


def template_messages(messages, max_chars: int | None = None) -> list[dict]:
    """Validated OpenAI messages (api_models.ChatMessage) -> the chat template's message dicts.
    max_chars: the most characters one message may have."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role = m.role
        content = _text_of(m.content)
        _check_len(content, f"{where}.content", max_chars)
        if role != "assistant" and content is None:
            raise APIError(f"'{where}.content' is required for role {role!r}", f"{where}.content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant":
            rc = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if rc is not None:
                _check_len(rc, f"{where}.reasoning_content", max_chars)
                msg["reasoning_content"] = rc
            calls = []
            for j, tc in enumerate(m.tool_calls or ()):
                w = f"{where}.tool_calls.{j}.function.arguments"
                args = tc.function.arguments
                if isinstance(args, str):
                    _check_len(args, w, max_chars)
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise APIError(f"'{w}' is not valid JSON", w) from None
                if not isinstance(args, dict):
                    raise APIError(f"'{w}' must be a JSON object", w)
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": args}})
            if calls:
                msg["tool_calls"] = calls
            if content is None:  # templates read message.content (None would be dropped)
                msg["content"] = ""
        if role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if isinstance(m.name, str):
            msg["name"] = m.name
        out.append(msg)
    return out


def tool_spec(req):
    """(tools as template dicts or None, tool_choice "none" | "auto" | "required") of a chat
    request; a named function narrows the tools to it and is "required"."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise APIError("'tool_choice' needs 'tools'", "tool_choice")
        return None, "none"
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):
        name = choice.function.name
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise APIError(f"'tool_choice.function.name' names function {_short(name)}, which is "
                           f"not in 'tools'", "tool_choice.function.name")
        return tools, "required"
    return (tools if choice != "none" else None), choice


def response_format(rf):
    """None, or ("json", schema-or-None) of a validated response_format."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return ("json", None)
    schema = rf.json_schema.schema_
    return ("json", {} if schema is None else schema)


def template_kwargs(req) -> dict:
    """The client's chat_template_kwargs (only api_models.CLIENT_TEMPLATE_KWARGS can be set)."""
    ctk = req.chat_template_kwargs
    if ctk is None:
        return {}
    return {k: v for k, v in ctk.model_dump().items() if v is not None}


_PARAM_WORDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                "max_tokens", "stop", "chat_template_kwargs", "messages", "schema")


def _param_from_message(msg: str):
    for w in _PARAM_WORDS:
        if msg.startswith(w) or f"'{w}'" in msg or f" {w} " in msg:
            return w
    return None


# ------------------------------------------------------------------------------ server
def _prompt_char_limit(model):
    """The most characters a prompt that fits the context can have: context length x the longest
    token in characters (x4 when the tokenizer normalizes text: NFC and the like can merge up to
    4 characters into one). None when unknown (no tokenizer)."""
    tok = model.tokenizer
    hf = getattr(tok, "_tok", None)
    if hf is None:
        return None
    key = id(hf)
    got = _CHARS_PER_TOKEN.get(key)
    if got is None or got[0] is not hf:
        try:
            longest = max((len(t) for t in hf.get_vocab(with_added_tokens=True)), default=0)
            factor = 4 if hf.normalizer is not None else 1
        except Exception:
            return None
        if len(_CHARS_PER_TOKEN) > 8:
            _CHARS_PER_TOKEN.clear()
        got = _CHARS_PER_TOKEN[key] = (hf, longest * factor)
    if got[1] <= 0:
        return None
    return int(model.context_length) * got[1]


_CHARS_PER_TOKEN: dict = {}  # id(tokenizer) -> (tokenizer, bound on characters per token)


class Server:
    """Request handling independent of the web framework (build_app wraps it in FastAPI).

    prepare_chat / prepare_completion validate and tokenize a request (any thread); the engine
    thread (EngineLoop, started here) decodes up to `parallel` sequences together (None: as many
    as the Model's pool holds, Model.load(parallel=N); more grows the pool)."""

    def __init__(self, model, model_name: str = "model", max_queue: int = DEFAULT_MAX_QUEUE,
                 timeout: float | None = DEFAULT_TIMEOUT, parallel: int | None = None):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ArgumentError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if parallel is None:
            parallel = model.parallel
        if isinstance(parallel, bool) or not isinstance(parallel, int) or not \
                1 <= parallel <= MAX_PARALLEL:
            raise ArgumentError(f"parallel must be an integer in [1, {MAX_PARALLEL}], got {parallel!r}")
        model.ensure_parallel(parallel)
        self.parallel = parallel
        if timeout is not None and (not _is_num(timeout) or timeout < 0):
            raise ArgumentError(f"timeout must be a number of seconds >= 0 (0 = none), got {timeout!r}")
        self.model = model
        self.model_name = model_name
        self.timeout = float(timeout) if timeout else None
        self.created = int(time.time())
        self.max_prompt_chars = _prompt_char_limit(model)
        self.engine = EngineLoop(self, max_queue)

    def close(self):
        """Stop the engine thread (queued and running requests end with a 503 error)."""
        self.engine.close()

    # ----- request -> prepared generation
    def _constraint(self, fmt, max_tokens):
        if fmt is None:
            return None
        if fmt[0] == "tool_call":
            from pyflashmoe.constrain import tool_call_constraint
            _, tools, reasoning, parallel = fmt
            try:
                return tool_call_constraint(self.model, tools, reasoning=reasoning, parallel=parallel,
                                            max_tokens=max_tokens)
            except ArgumentError as e:
                raise APIError(f"tools: {e}", "tools") from None
        from pyflashmoe.constrain import json_constraint
        try:
            return json_constraint(self.model, fmt[1], max_tokens=max_tokens)
        except ArgumentError as e:
            param = "response_format.json_schema" if fmt[1] is not None else "response_format"
            raise APIError(f"{param}: {e}", param) from None

    def _too_long(self, n_chars, param):
        m = self.model
        return APIError(f"the prompt has {n_chars} characters, more than a {m.context_length}-token "
                        f"context can hold (at most {self.max_prompt_chars} for this tokenizer); "
                        f"it was not tokenized", param, code="context_length_exceeded")

    def check_model(self, name) -> None:
        """A request's `model`, when given (non-empty), must be the served one (the id that
        /v1/models lists): else a 404 model_not_found."""
        if isinstance(name, dict):  # a request body
            name = name.get("model")
        if name is None or name == "":
            return
        if not isinstance(name, str):
            raise APIError(f"'model' must be a string, got {_short(name)}", "model")
        if name != self.model_name:
            raise APIError(f"model {_short(name)} not found; this server serves "
                           f"{self.model_name!r}", "model", 404, code="model_not_found")

    def prepare_chat(self, body) -> dict:
        """A prepared chat generation of a /v1/chat/completions request (an api_models.
        ChatCompletionRequest, or its JSON dict)."""
        req = validate_request(_models.ChatCompletionRequest, body)
        self.check_model(req.model)
        m = self.model
        msgs = template_messages(req.messages, self.max_prompt_chars)
        kw = sampling_kw(req, m.context_length, m.n_vocab)
        n_top = None
        if req.logprobs:
            n_top = req.top_logprobs or 0
        elif req.top_logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if n_top is not None:
            kw["top_logprobs"] = n_top
        tools, choice = tool_spec(req)
        parallel = req.parallel_tool_calls is not False
        fmt = response_format(req.response_format)
        ctk = template_kwargs(req)
        del req
        st = self.prepare_chat_messages(msgs, kw, tools, choice, parallel, fmt, ctk)
        st["logprobs"] = n_top
        return st

    def chat_prompt(self, msgs, tools, fmt, ctk, prefill=""):
        """(prompt text, token ids) of validated OpenAI-style messages rendered by the chat
        template; prefill: text the answer starts with (appended after the generation prompt)."""
        tok = self.model.tokenizer
        if tok is None:
            raise APIError("this model has no tokenizer.json; chat completions are unavailable", None,
                           status=500, type_="server_error")
        ctk = dict(ctk)
        if fmt is not None and "enable_thinking" not in ctk and tok.chat_template \
                and "enable_thinking" in tok.chat_template:
            ctk["enable_thinking"] = False
        enable_thinking = ctk.pop("enable_thinking", None)
        try:
            text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                           enable_thinking=enable_thinking, **ctk)
        except ArgumentError as e:
            raise APIError(f"messages: {e}", "messages") from None
        text += prefill
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise self._too_long(len(text), "messages")
        return text, tok.encode(text, add_special_tokens=False)

    def prepare_chat_messages(self, msgs, kw, tools, choice, parallel, fmt, ctk, prefill="") -> dict:
        """A prepared chat generation from validated parts (prepare_chat's, or the Anthropic
        Messages API's converted to them): msgs from template_messages, kw from sampling_kw,
        (tools, choice) from tool_spec, fmt from response_format, ctk from template_kwargs;
        prefill as in chat_prompt."""
        tok = self.model.tokenizer
        text, ids = self.chat_prompt(msgs, tools, fmt, ctk, prefill)
        del msgs
        in_reasoning = prompt_opens_thinking(text) and fmt is None
        parser_args = dict(in_reasoning=in_reasoning, tools=tools,
                           parse_tools=bool(tools) and fmt is None)
        if tools and choice == "required" and fmt is None and "<function=" in (tok.chat_template or ""):
            # a call is required (or a named function, to which tool_spec narrowed `tools`):
            # the grammar makes it one, with schema-valid arguments
            fmt = ("tool_call", tools, in_reasoning, parallel)
        return self._start(ids, kw, fmt, parser_args)

    def prepare_completion(self, body) -> dict:
        """A prepared generation of a /v1/completions request (an api_models.CompletionRequest,
        or its JSON dict)."""
        req = validate_request(_models.CompletionRequest, body)
        self.check_model(req.model)
        m = self.model
        prompt = req.prompt  # a non-empty string or list of ints (api_models._prompt)
        tok = m.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise APIError("this model has no tokenizer.json; pass 'prompt' as token ids", "prompt")
            if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
                raise self._too_long(len(prompt), "prompt")
            ids = None
        else:
            if len(prompt) >= m.context_length:
                raise APIError(f"the prompt has {len(prompt)} tokens; the model's context length is "
                               f"{m.context_length}", "prompt", code="context_length_exceeded")
            ids = list(prompt)
            bad = [t for t in ids if t < 0 or t >= m.n_vocab]
            if bad:
                raise APIError(f"'prompt' token id {_short(bad[0])} is outside the vocabulary "
                               f"[0, {m.n_vocab})", "prompt")
        if req.suffix is not None:
            raise APIError("'suffix' is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise APIError("'best_of' > 1 is not supported", "best_of")
        kw = sampling_kw(req, m.context_length, m.n_vocab)
        if req.logprobs is not None:
            kw["top_logprobs"] = req.logprobs
        fmt = response_format(req.response_format)
        echo, n_top = bool(req.echo), req.logprobs
        del req
        if ids is None:
            ids = tok.encode(prompt, add_special_tokens=True)
        st = self._start(ids, kw, fmt, None)
        st["echo"] = (prompt if isinstance(prompt, str) else (tok.decode(ids) if tok else "")) \
            if echo else ""
        st["logprobs"] = n_top
        return st

    def _start(self, ids, kw, fmt, parser_args) -> dict:
        m = self.model
        if len(ids) >= m.context_length:
            raise APIError(f"the prompt has {len(ids)} tokens; the model's context length is "
                           f"{m.context_length}", "messages" if parser_args is not None else "prompt",
                           code="context_length_exceeded")
        kw = dict(kw)
        n = kw.pop("n", 1)
        if n > self.parallel:
            raise APIError(f"'n' must be <= {self.parallel} (the sequences this server decodes "
                           f"together, --parallel), got {n}", "n")
        kw.setdefault("max_tokens", m.context_length - len(ids))
        budget = min(kw["max_tokens"], m.context_length - len(ids))
        # a token's logprob (a log-softmax over the vocabulary, per sequence and step on the
        # engine thread) only when the request asked for logprobs
        kw.setdefault("logprobs", "top_logprobs" in kw)
        gens = []
        for i in range(n):  # n choices: n sequences, each with its own grammar state and seed
            kwi = dict(kw)
            if i and kwi.get("seed") is not None:
                kwi["seed"] = (kwi["seed"] + i) % (1 << 64)
            constraint = self._constraint(fmt, budget)
            try:
                gens.append(m._prepare(ids, logits_processor=constraint, **kwi))
            except ContextFullError as e:
                raise APIError(str(e), "messages", code="context_length_exceeded") from None
            except ArgumentError as e:
                raise APIError(str(e), _param_from_message(str(e))) from None
        return {"gens": gens, "n_prompt": len(ids), "parser_args": parser_args}

    # ----- running (on the request's own thread, fed by the engine thread)
    def run_job(self, job: "Job"):
        """Turn one admitted request's pieces (sent by the engine thread to job's feeds, one
        per choice) into its response, feeding job's queue. Runs on the request's own thread
        (EngineLoop starts it), so building and sending a response never holds up the engine or
        the other requests. Raises _Cancelled when the client went away, APIError (504) past
        the deadline, or what the model raised."""
        st = job.st
        gens = st["gens"]
        choices = [dict(st, gen=_guarded(job.feed(i), job), stats=g.stats)
                   for i, g in enumerate(gens)]
        try:
            job.check()  # cancelled or expired while queued: dropped before it runs
            if job.kind == "messages":
                from pyflashmoe import server_anthropic
                if job.stream:
                    chunks = server_anthropic.stream(self, choices[0])
                    try:
                        for c in chunks:
                            job.put("chunk", c)
                    finally:
                        chunks.close()
                else:
                    job.put("result", server_anthropic.run(self, choices[0]))
            elif job.stream:
                self._stream_choices(job, choices)
            else:
                fn = self.run_chat if job.kind == "chat" else self.run_completion
                results = [fn(c) for c in choices]  # the others' pieces wait in their feeds
                res = results[0]
                if len(results) > 1:
                    res["choices"] = [dict(r["choices"][0], index=i) for i, r in enumerate(results)]
                    res["usage"] = self._usage_n(st, choices)
                job.put("result", res)
        finally:
            for c in choices:
                c["gen"].close()

    def _stream_choices(self, job, choices):
        """The chunks of every choice, each choice on its own thread (the first on this one),
        so that they interleave as the batch decodes them; one id; one usage chunk at the end."""
        fn = self.stream_chat if job.kind == "chat" else self.stream_completion
        if len(choices) == 1:
            chunks = fn(choices[0], job.include_usage)
            try:
                for c in chunks:
                    job.put("chunk", c)
            finally:
                chunks.close()
            return
        ids = {}
        errors = []

        def run(i):
            chunks = fn(choices[i], False, index=i)
            try:
                for c in chunks:
                    first = ids.setdefault("id", (c["id"], c["created"]))
                    job.put("chunk", dict(c, id=first[0], created=first[1]))
            except BaseException as e:
                errors.append(e)
                job.abandoned = True  # the engine drops the job's other sequences
            finally:
                chunks.close()

        threads = [threading.Thread(target=run, args=(i,), daemon=True,
                                    name=f"flashmoe-choice-{i}") for i in range(1, len(choices))]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        if job.include_usage:
            cid, created = ids.get("id", ("chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())))
            obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
            job.put("chunk", {"id": cid, "object": obj, "created": created,
                              "model": self.model_name, "choices": [],
                              "usage": self._usage_n(job.st, choices)})

    def _usage_n(self, st, choices):
        """Usage of a request with several choices: the prompt once, the completions summed."""
        us = [self._usage(c) for c in choices]
        n = sum(u["completion_tokens"] for u in us)
        return {"prompt_tokens": st["n_prompt"], "completion_tokens": n,
                "total_tokens": st["n_prompt"] + n,
                "prompt_tokens_details": {"cached_tokens": us[0]["prompt_tokens_details"]["cached_tokens"]}}

    def _usage(self, st):
        s = st.get("stats") or self.model.stats or {}
        n = int(s.get("generated_tokens", 0))
        return {"prompt_tokens": st["n_prompt"], "completion_tokens": n,
                "total_tokens": st["n_prompt"] + n,
                "prompt_tokens_details": {"cached_tokens": int(s.get("cached_tokens", 0))}}

    def logprobs_of(self, st, offset=0) -> "LogprobsBuilder":
        """The logprobs builder of one choice of a prepared request (st["logprobs"]: None = not
        asked for, else the number of top_logprobs)."""
        return LogprobsBuilder(self.model, st.get("logprobs"), offset)

    def run_chat(self, st) -> dict:
        parser = OutputParser(**st["parser_args"])
        lpb = self.logprobs_of(st)
        finish = None
        for piece in st["gen"]:
            lpb.add(piece)
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
                "choices": [chat_choice(0, msg, finish or "stop", lpb.chat(lpb.take()))],
                "usage": self._usage(st)}

    def run_completion(self, st) -> dict:
        finish = None
        parts = [st["echo"]]
        lpb = self.logprobs_of(st, len(st["echo"]))
        for piece in st["gen"]:
            lpb.add(piece)
            parts.append(piece.text)
            finish = piece.finish_reason or finish
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                "created": int(time.time()), "model": self.model_name,
                "choices": [completion_choice(0, "".join(parts), finish or "stop",
                                              lpb.completion(lpb.take()))],
                "usage": self._usage(st)}

    def stream_chat(self, st, include_usage=False, index=0):
        """Yields chunk dicts (the caller frames them as SSE) of choice `index`. With logprobs,
        the tokens' entries ride on the next chunk sent after them (the last ones on the
        finish_reason chunk)."""
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        lpb = self.logprobs_of(st)

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name,
                    "choices": [{"index": index, "delta": delta,
                                 "logprobs": lpb.chat(lpb.take(), stream=True),
                                 "finish_reason": finish}]}

        def deltas(events):
            for kind, text in events:
                yield chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})

        parser = OutputParser(**st["parser_args"])
        yield chunk({"role": "assistant", "content": ""})
        finish = None
        for piece in st["gen"]:
            lpb.add(piece)
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

    def stream_completion(self, st, include_usage=False, index=0):
        cid = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        lpb = self.logprobs_of(st, len(st["echo"]))

        def chunk(text, finish=None):
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": self.model_name,
                    "choices": [completion_choice(index, text, finish, lpb.completion(lpb.take()))]}

        if st["echo"]:
            yield chunk(st["echo"])
        for piece in st["gen"]:
            lpb.add(piece)
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


def chat_choice(index, message, finish, logprobs=None) -> dict:
    """One choice of a chat.completion (logprobs: LogprobsBuilder.chat's object or None)."""
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def completion_choice(index, text, finish, logprobs=None) -> dict:
    """One choice of a text_completion, whole or streamed (logprobs: LogprobsBuilder.completion's
    object or None)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


_MIN_LOGPROB = -9999.0  # JSON has no -inf


class LogprobsBuilder:
    """Log-probabilities of one choice's generated tokens in OpenAI's shapes. add() each
    GenerationPiece; take() the entries gathered since the last take(); chat(entries) /
    completion(entries) give the response objects (None when logprobs were not asked for).

    The values are those of the model's raw distribution (GenerationPiece.logprob and
    .top_logprobs: log-softmax of the logits before sampling settings, logit_bias or a grammar).
    The token that ended the generation as EOS is not listed (OpenAI lists no end token).
    A token's text is its UTF-8 string, or "bytes:\\xNN..." when its bytes are not valid UTF-8
    alone (part of a character); `bytes` are its raw bytes."""

    def __init__(self, model, n_top, offset: int = 0):
        self.enabled = n_top is not None
        self.tok = model.tokenizer
        self.eos = model.eos_token_ids or ()
        self.offset = offset  # completions: text_offset of the next token
        self.pending = []
        self._cache = {}

    def _token(self, t):
        got = self._cache.get(t)
        if got is None:
            b = None
            if self.tok is not None:
                try:
                    b = self.tok.token_bytes(t)
                    if b is None:
                        b = self.tok.decode([t]).encode("utf-8")
                except FlashMoEError:
                    b = None
            if b is None:
                b = str(t).encode()
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            got = self._cache[t] = (text, list(b))
        return got

    def add(self, piece):
        if not self.enabled or piece.token is None:
            return
        if piece.finish_reason == "stop" and piece.token in self.eos:
            return
        lp = piece.logprob if piece.logprob is not None else 0.0
        top = [(self._token(t), max(v, _MIN_LOGPROB)) for t, v in (piece.top_logprobs or ())]
        self.pending.append((self._token(piece.token), max(lp, _MIN_LOGPROB), top))

    def take(self):
        out, self.pending = self.pending, []
        return out

    def chat(self, entries, stream=False):
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
        "refusal": None}; None when logprobs are off, or for a streamed chunk that no token came
        with."""
        if not self.enabled or (stream and not entries):
            return None
        return {"content": [{"token": tk[0], "logprob": lp, "bytes": tk[1],
                             "top_logprobs": [{"token": t[0], "logprob": v, "bytes": t[1]}
                                              for t, v in top]}
                            for tk, lp, top in entries],
                "refusal": None}

    def completion(self, entries):
        """{"tokens", "token_logprobs", "top_logprobs" (a {token: logprob} per position),
        "text_offset"} (legacy completions); None when logprobs are off."""
        if not self.enabled:
            return None
        offs = []
        for tk, _, _ in entries:
            offs.append(self.offset)
            self.offset += len(tk[0])
        return {"tokens": [tk[0] for tk, _, _ in entries],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{t[0]: v for t, v in top} for _, _, top in entries],
                "text_offset": offs}


def _guarded(gen, job):
    """gen's pieces, checking job's cancel flag and deadline before each step (so a cancelled
    request stops before its next token)."""
    try:
        while True:
            job.check()
            try:
                piece = next(gen)
            except StopIteration:
                return
            yield piece
    finally:
        gen.close()


# ------------------------------------------------------------------------------ engine thread
class _Cancelled(Exception):
    """The client went away (or the server is closing): the request ends without an answer."""


_libc_trim = None


def _trim_heap(big=False):
    """Give freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    global _libc_trim
    if big:
        gc.collect()
    if _libc_trim is None:
        try:
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _libc_trim = fn
        except (OSError, AttributeError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


_END = object()  # a choice's feed: the generation has ended


class Job:
    """One admitted request: its prepared generation (st), its asyncio queue, cancel flag and
    deadline. The request's thread puts (kind, payload) items: ("chunk", dict) when streaming,
    ("result", dict) otherwise, ("error", exception), and ("end", None) last. The engine thread
    sends each choice's GenerationPieces to that choice's feed (feed(i) yields them)."""

    def __init__(self, kind, st, stream, include_usage, loop, arrived, timeout):
        self.kind, self.st, self.stream, self.include_usage = kind, st, stream, include_usage
        self.loop = loop
        self.queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived, self.timeout = arrived, timeout
        self.deadline = arrived + timeout if timeout else None
        self.started = None
        self.done = False
        self.cancel_reason = None  # "timed_out" when the deadline passed on the event loop's side
        gens = (st or {}).get("gens") if isinstance(st, dict) else None
        self.n = len(gens) if gens else 1  # sequences (choices) the request runs
        self.feeds = [queue.SimpleQueue() for _ in range(self.n)]
        self.abandoned = False  # the request's thread has ended: its sequences are dropped

    def remaining(self):
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def timeout_error(self):
        now = time.monotonic()
        queued = (self.started if self.started is not None else now) - self.arrived
        ran = now - self.started if self.started is not None else 0.0
        return APIError(f"the request ran past the server's time limit of {self.timeout:g} s "
                        f"(--timeout): {queued:.1f} s waiting in the queue, {ran:.1f} s generating",
                        None, 504, "timeout_error", "request_timeout")

    def check(self):
        """Before each step (engine thread) and each piece (the request's thread)."""
        if self.cancelled.is_set():
            raise _Cancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self.timeout_error()

    def stopped(self):
        """None while the request should go on; else the exception that ends it."""
        if self.abandoned:
            return _Cancelled()
        try:
            self.check()
        except BaseException as e:
            return e
        return None

    def put(self, kind, payload=None):
        """To the request's event loop (from any thread; never blocks)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def send(self, i, item):
        """From the engine thread: a GenerationPiece, an exception or _END for choice i."""
        self.feeds[i].put(item)

    def feed(self, i):
        """Choice i's pieces as the engine sends them (on the request's thread)."""
        q = self.feeds[i]
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                self.check()  # cancelled or past the deadline: the engine drops it too
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """Fair FIFO admission: requests wait in arrival order, at most max_queue of them besides
    the running ones.

    take() is the one point where the engine thread chooses new work: between two decode steps
    it admits the oldest waiting requests whose sequences fit the free slots (the head waits
    when it does not fit, so nobody is overtaken). pick_next() takes one request."""

    IDLE_S = 0.25  # idle this long after work -> on_idle() (heap trim)

    def __init__(self, max_queue: int, slots: int = 1):
        self.max_queue = max_queue
        self.slots = slots  # requests that run at once (--parallel): they do not count as waiting
        self._waiting = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._active = 0  # jobs handed out by pick_next/take and not yet finished
        self._dirty = False  # work since the last on_idle
        self._big = False  # a big request since the last on_idle

    def depth(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        """max_queue requests would wait besides the `slots` that run."""
        return len(self._waiting) + self._active >= self.max_queue + self.slots

    def submit(self, job, retry_after=1):
        with self._cv:
            if self._closed:
                raise APIError("the server is shutting down", None, 503, "server_error", "shutting_down")
            if self.full():
                raise _queue_full(self.max_queue, retry_after)
            self._waiting.append(job)
            self._cv.notify()

    def remove(self, job) -> bool:
        """Drop a waiting job (its client went away); False when it is not waiting."""
        with self._cv:
            try:
                self._waiting.remove(job)
                return True
            except ValueError:
                return False

    def finished(self, job):
        """The engine is done with a job that pick_next/take returned."""
        with self._cv:
            self._active -= 1
            self._dirty = True
            self._cv.notify()

    def note_work(self, big=False):
        with self._cv:
            self._dirty = True
            self._big = self._big or big
            self._cv.notify()

    def close(self) -> list:
        with self._cv:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        return left

    def pick_next(self, on_idle=None):
        """The next job to run (the oldest waiting one), blocking until there is one; None once
        closed. While idle after some work it calls on_idle(big) once."""
        jobs = self.take(None, True, on_idle)
        return None if jobs is None else jobs[0]

    def take(self, free, block=False, on_idle=None, max_jobs=None):
        """The waiting jobs to admit now, oldest first, while their sequences (job.n, 1 for
        other objects) fit in `free` slots (None: one job), at most max_jobs of them; [] when
        none fits; None once closed. block: wait until there is one (nothing is running); while
        idle after some work it calls on_idle(big) once."""
        while True:
            with self._cv:
                if self._closed:
                    return None
                out = []
                if free is None:
                    if self._waiting:
                        out.append(self._waiting.popleft())
                else:
                    while self._waiting and getattr(self._waiting[0], "n", 1) <= free and \
                            (max_jobs is None or len(out) < max_jobs):
                        free -= getattr(self._waiting[0], "n", 1)
                        out.append(self._waiting.popleft())
                self._active += len(out)
                if out or not block:
                    return out
                if not self._dirty or on_idle is None:
                    self._cv.wait()
                    continue
                self._cv.wait(self.IDLE_S)
                if self._closed or self._waiting or not self._dirty:
                    continue
                big, self._dirty, self._big = self._big, False, False
            try:
                on_idle(big)
            except Exception:
                pass


def _queue_full(max_queue, retry_after):
    return APIError(f"the server is busy: {max_queue} requests are already waiting (--max-queue); "
                    f"retry later", None, 503, "server_error", "queue_full",
                    headers={"Retry-After": str(retry_after)})


class _Seq:
    """One running sequence: choice i of a job, its Generation and the token to evaluate."""
    __slots__ = ("job", "i", "gen")

    def __init__(self, job, i, gen):
        self.job, self.i, self.gen = job, i, gen


class EngineLoop:
    """The one thread that owns the Model. Continuous batching: it keeps up to
    server.parallel running sequences; between two decode steps it admits waiting requests
    (Scheduler.take: their prefill runs, their first token is sampled, and they join the next
    batched step) and drops the finished, cancelled and timed-out ones. One step evaluates one
    token of every running sequence together (Model._eval_batch) and sends each sequence's
    piece to its request's feed; each request's own thread turns its pieces into chunks or a
    result (Server.run_job), so a slow or gone client never holds up the others. An exception
    from a request (its prefill, its sampling, its response) ends that request, an error of a
    batched step the sequences of that step; never the thread."""

    def __init__(self, server: Server, max_queue: int):
        self.server = server
        self.parallel = getattr(server, "parallel", 1)
        self.sched = Scheduler(max_queue, slots=self.parallel)
        self.running_jobs: set = set()  # admitted and not finished (their threads run)
        self.engine_jobs: set = set()  # jobs with sequences in the engine (being admitted or running)
        self._lock = threading.Lock()
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0}
        self.steps = {"steps": 0, "batched_tokens": 0}
        self._avg_s = None
        self._thread = threading.Thread(target=self._main, name="flashmoe-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def current(self):
        """The oldest running job (None when idle)."""
        with self._lock:
            jobs = list(self.engine_jobs)
        return min(jobs, key=lambda j: j.started or 0.0) if jobs else None

    def _count(self, key):
        with self._lock:
            self.counts[key] += 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free (a running request ends): the mean request
        time, 1..60."""
        avg = self._avg_s if self._avg_s is not None else 1.0
        return int(min(60, max(1, math.ceil(avg))))

    def admission_check(self):
        """Fast refusal before a request is prepared (submit() checks again)."""
        if not self.alive:
            raise APIError("the engine thread is not running", None, 503, "server_error", "engine_down")
        if self.sched.full():
            self._count("rejected")
            raise _queue_full(self.sched.max_queue, self.retry_after())

    def submit(self, job: Job):
        if not self.alive:
            raise APIError("the engine thread is not running", None, 503, "server_error", "engine_down")
        try:
            self.sched.submit(job, self.retry_after())
        except APIError as e:
            if e.code == "queue_full":
                self._count("rejected")
            raise

    def cancel(self, job: Job, timed_out=False):
        """The client went away (or ran out of time): a waiting job is dropped now, a running one
        stops before its next token. Idempotent."""
        if job.done:
            return
        if timed_out and job.cancel_reason is None:
            job.cancel_reason = "timed_out"
        job.cancelled.set()
        if self.sched.remove(job):
            job.done = True
            job.st = None
            self._count(job.cancel_reason or "cancelled")

    def note_big_request(self):
        self.sched.note_work(big=True)

    STALL_SLACK_S = 30.0  # a request running this long past its deadline: the engine is stuck

    def health(self) -> dict:
        """status "ok"; "stalled" when a running request is STALL_SLACK_S past its deadline
        (the engine would have stopped it at its next token: it is stuck inside one step);
        "error" when the engine thread is not running."""
        with self._lock:
            jobs = list(self.engine_jobs)
            counts = dict(self.counts)
            steps = dict(self.steps)
        alive = self.alive
        now = time.monotonic()
        running_for = max((now - j.started for j in jobs if j.started is not None), default=0.0)
        stalled = any(j.deadline is not None and now > j.deadline + self.STALL_SLACK_S for j in jobs)
        return {"status": "error" if not alive else "stalled" if stalled else "ok",
                "engine_thread": "alive" if alive else "dead",
                "queue_depth": self.sched.depth(), "max_queue": self.sched.max_queue,
                "running": len(jobs), "running_for_s": round(running_for, 3),
                "parallel": self.parallel, "timeout_s": self.server.timeout, **counts, **steps}

    def close(self, wait=5.0):
        left = self.sched.close()
        with self._lock:
            jobs = list(self.running_jobs)
        for cur in jobs:
            cur.cancel_reason = "shutdown"
            cur.cancelled.set()
        for job in left:
            job.done = True
            job.put("error", APIError("the server is shutting down", None, 503, "server_error",
                                      "shutting_down"))
            job.put("end")
        if self._thread is not threading.current_thread():
            self._thread.join(wait)

    # ----- the engine thread
    def _main(self):
        running: list[_Seq] = []
        try:
            while True:
                free = self.parallel - len(running)
                # while sequences run, one request's prefill per step: a burst of arrivals
                # delays the running streams by one prefill per token, not by all of them
                jobs = self.sched.take(free, block=not running, on_idle=_trim_heap,
                                       max_jobs=1 if running else None)
                if jobs is None:
                    return
                for job in jobs:
                    with self._lock:
                        self.engine_jobs.add(job)
                    try:
                        self._admit(job, running)
                    except BaseException:  # never let a request end the thread
                        pass
                    self._note(running)
                if running:
                    self._drop_stopped(running)
                if running:
                    try:
                        self._step(running)
                    except BaseException:
                        pass
                self._note(running)
        finally:
            for seq in running:  # closing: the requests' threads end with the shutdown error
                self._end(seq, _Cancelled(), ok=True)

    def _note(self, running):
        with self._lock:
            self.engine_jobs = {s.job for s in running}

    def _end(self, seq, item, ok=True):
        try:
            seq.gen.close(ok=ok)
        except BaseException:
            pass
        seq.job.send(seq.i, item)

    def _admit(self, job: Job, running: list):
        """Start the job's thread, then prefill its sequences; they join the running batch."""
        job.started = time.monotonic()
        gens = list(job.st["gens"])  # before the thread starts: it drops job.st when it ends
        with self._lock:
            self.running_jobs.add(job)
        try:
            threading.Thread(target=self._job_thread, args=(job,), daemon=True,
                             name="flashmoe-request").start()
        except BaseException as e:  # no thread (resource limits): the request ends with a 500
            job.abandoned = job.done = True
            job.put("error", e)
            job.put("end")
            with self._lock:
                self.running_jobs.discard(job)
            self._count("failed")
            self.sched.finished(job)
            return
        stop = job.stopped()
        if stop is not None:  # cancelled or expired while queued: nothing is evaluated
            for i in range(len(gens)):
                job.send(i, stop)
            return
        for i, g in enumerate(gens):
            seq = _Seq(job, i, g)
            try:
                piece, tok = g.step(g.prefill(set_model_stats=False))
            except BaseException as e:
                # the whole request fails: its other sequences end too
                for other in [r for r in running if r.job is job]:
                    running.remove(other)
                    self._end(other, e)
                for k in range(i, len(gens)):
                    self._end(_Seq(job, k, gens[k]), e, ok=False)
                return
            job.send(i, piece)
            if tok is None:
                self._end(seq, _END)
            else:
                running.append(seq)

    def _drop_stopped(self, running: list):
        """Sequences of cancelled, expired or abandoned requests leave before the next step."""
        keep = []
        for seq in running:
            stop = seq.job.stopped()
            if stop is None:
                keep.append(seq)
            else:
                self._end(seq, stop)
        running[:] = keep

    def _step(self, running: list):
        """One batched decode step over every running sequence."""
        try:
            rows = self.server.model._eval_batch([s.gen.session for s in running],
                                                 [s.gen.next_token for s in running])
        except BaseException as e:
            # the batch's sessions were reset: every sequence of the step ends with the error
            for seq in running:
                self._end(seq, e, ok=False)
            running.clear()
            return
        with self._lock:
            self.steps["steps"] += 1
            self.steps["batched_tokens"] += len(running)
        keep = []
        for k, seq in enumerate(running):
            try:
                piece, tok = seq.gen.step(rows[k])
            except BaseException as e:
                self._end(seq, e, ok=False)
                continue
            seq.job.send(seq.i, piece)
            if tok is None:
                self._end(seq, _END)
            else:
                keep.append(seq)
        running[:] = keep

    # ----- a request's own thread
    def _job_thread(self, job: Job):
        outcome = "completed"
        try:
            self.server.run_job(job)
        except _Cancelled:
            outcome = "timed_out" if job.cancel_reason == "timed_out" else "cancelled"
            if job.cancel_reason == "shutdown":
                job.put("error", APIError("the server is shutting down", None, 503, "server_error",
                                          "shutting_down"))
        except BaseException as e:
            outcome = "timed_out" if getattr(e, "code", None) == "request_timeout" else "failed"
            job.put("error", e)
        finally:
            job.abandoned = True  # any sequence still running is dropped at the next step
            job.done = True
            job.st = None
            job.put("end")
            with self._lock:
                self.running_jobs.discard(job)
            dt = time.monotonic() - job.started
            self._avg_s = dt if self._avg_s is None else 0.8 * self._avg_s + 0.2 * dt
            self._count(outcome)
            self.sched.finished(job)


def _error_body(e: Exception):
    if isinstance(e, APIError):
        return e.status, e.body()
    if isinstance(e, ContextFullError):
        return 400, APIError(str(e), "messages", code="context_length_exceeded").body()
    if isinstance(e, ArgumentError):
        return 400, APIError(str(e), _param_from_message(str(e))).body()
    if isinstance(e, FlashMoEError):
        numerical = getattr(_errors, "NumericalError", None)
        code = "numerical_error" if numerical is not None and isinstance(e, numerical) else None
        return 500, APIError(str(e), None, 500, "server_error", code).body()
    return 500, APIError(f"internal error: {type(e).__name__}: {e}", None, 500, "server_error").body()


# ------------------------------------------------------------------------------ HTTP
def _host_name(value: str):
    """The host name of a Host header value (lower case, port and IPv6 brackets removed), or None
    when malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        rest = v[end + 1:] if end > 0 else None
        if rest is None or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return v[1:end]
    if v.count(":") == 1:
        h, port = v.split(":")
        return h if port.isdigit() and h else None
    if ":" in v or not v:
        return None
    return v


def is_loopback(host: str) -> bool:
    """Whether a bind address is loopback-only (127.0.0.0/8, ::1, localhost)."""
    h = (_host_name(host) or host).strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str):
    """The Host names a server bound to bind_host accepts by default: loopback names when it is
    bound to a loopback address, else any (None)."""
    if not is_loopback(bind_host):
        return None
    return sorted(set(LOOPBACK_HOSTS) | {(_host_name(bind_host) or bind_host).strip("[]").lower()})


def _split_list(v):
    if v is None:
        return None
    if isinstance(v, str):
        v = v.split(",")
    return [s.strip() for s in v if s and s.strip()]


def _is_anthropic_path(path: str) -> bool:
    return path.rstrip("/") in ("/v1/messages", "/v1/messages/count_tokens")


def _anthropic_error(status, body):
    from pyflashmoe.server_anthropic import error_body
    return error_body(status, body)


class RequestGuard:
    """ASGI middleware, before any route: the Host header against the allowed names (DNS
    rebinding), an Origin header against the allowed CORS origins (403), POST bodies must be
    application/json (415), so a browser cannot send a cross-origin "simple" request, and with an
    API key every /v1/ request (CORS preflights aside) must carry it as `Authorization: Bearer KEY`
    (OpenAI clients) or `x-api-key: KEY` (Anthropic clients), else 401. With max_body, a POST
    body is read here, before the route parses it, and refused with 413 as soon as it passes
    max_body bytes (the declared Content-Length, or the bytes received so far when chunked); its
    size is left in scope[BODY_SIZE_KEY]."""

    def __init__(self, app, allowed_hosts=None, cors_origins=None, api_key=None, max_body=None):
        self.app = app
        self.max_body = max_body
        self.api_key = api_key.encode() if api_key else None
        hosts = _split_list(allowed_hosts)
        self.hosts = None if hosts is None or "*" in hosts else \
            {(_host_name(h) or h).strip("[]").lower() for h in hosts}
        origins = _split_list(cors_origins) or []
        self.any_origin = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}

    def check(self, scope):
        host = origin = ctype = None
        keys = []
        for k, v in scope.get("headers") or ():
            k = k.lower()
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    keys.append(token.strip())
            elif k == b"x-api-key":
                keys.append(v.strip())
            elif k == b"host" and host is None:
                host = v.decode("latin-1")
            elif k == b"origin" and origin is None:
                origin = v.decode("latin-1")
            elif k == b"content-type" and ctype is None:
                ctype = v.decode("latin-1")
        if self.hosts is not None and (host is None or _host_name(host) not in self.hosts):
            return APIError(f"Host header {_short(host)} is not allowed: this server accepts "
                            f"{', '.join(sorted(self.hosts))} (flashmoe serve --allowed-hosts)",
                            "Host", 400, code="invalid_host")
        if origin is not None and not self.any_origin and origin.rstrip("/").lower() not in self.origins \
                and not self.same_origin(origin, host):
            cors = "limited to " + ", ".join(sorted(self.origins)) if self.origins else "off"
            return APIError(f"cross-origin request from Origin {_short(origin)} refused (CORS is {cors}; "
                            f"flashmoe serve --cors-origins)", "Origin", 403, code="origin_not_allowed")
        if scope.get("method") == "POST":
            media = (ctype or "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(f"Content-Type must be application/json, got {_short(ctype)} "
                                f"(curl: -H 'Content-Type: application/json')", "Content-Type", 415,
                                code="unsupported_media_type")
        if self.api_key is not None and scope.get("path", "").startswith("/v1/") \
                and scope.get("method") != "OPTIONS" \
                and not any(hmac.compare_digest(k, self.api_key) for k in keys):
            what = "a wrong API key" if keys else "no API key"
            return APIError(f"this server needs an API key (flashmoe serve --api-key); the request has "
                            f"{what} (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                            "Authorization", 401, code="invalid_api_key")
        return None

    def same_origin(self, origin, host):
        """Whether Origin is this server as the browser reached it (http(s)://Host): the web chat
        page that this server serves at / calling its API (browsers send Origin on every POST, also
        same-origin ones). Trusted only when the Host name cannot come from DNS rebinding: it passed
        the --allowed-hosts list, or it is an IP address or localhost."""
        name = _host_name(host) if host else None
        if name is None:
            return False
        h = host.strip().lower()
        if origin.strip().rstrip("/").lower() not in ("http://" + h, "https://" + h):
            return False
        if self.hosts is not None or name in LOOPBACK_HOSTS:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def too_big(self, n=None):
        got = f" ({n} bytes)" if n is not None else ""
        return APIError(f"the request body{got} is larger than this server's limit of {self.max_body} "
                        f"bytes (flashmoe serve --max-body)", None, 413, code="request_too_large")

    async def read_body(self, scope, receive):
        """(error or None, the receive callable the app gets: the buffered body, then the
        client's own messages, e.g. a disconnect)."""
        cl = None
        for k, v in scope.get("headers") or ():
            if k.lower() == b"content-length":
                cl = v.decode("latin-1")
                break
        if cl is not None:
            if not cl.strip().isdigit():
                return APIError(f"invalid Content-Length header {_short(cl)}", "Content-Length"), receive
            if int(cl) > self.max_body:
                return self.too_big(int(cl)), receive
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                async def gone():
                    return {"type": "http.disconnect"}
                return None, gone
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return self.too_big(), receive
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        scope[BODY_SIZE_KEY] = size
        body = [b"".join(parts)]
        del parts

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()
        return None, replay

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            e = self.check(scope)
            if e is None and self.max_body is not None and scope.get("method") == "POST":
                e, receive = await self.read_body(scope, receive)
            if e is not None:
                err = _anthropic_error(e.status, e.body()) if _is_anthropic_path(scope.get("path", "")) \
                    else e.body()
                body = json.dumps(err).encode()
                await send({"type": "http.response.start", "status": e.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def _wait_disconnect(receive):
    """Returns when the client has gone away (after the body was read)."""
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            return


WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
# the page may load its own files and call this server, nothing else (no inline script or style)
WEB_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_web_routes(app, web_dir: str = WEB_DIR):
    """GET / (the web chat page, pyflashmoe/web/index.html) and GET /web/<file> (its script, style
    and icon; a fixed list, no paths): static files read once, served without the API key (the key
    guards /v1/; the page asks for it), behind RequestGuard's Host check, with a
    Content-Security-Policy that lets the page load only its own files and talk only to this
    server. A missing file (a broken install) is a 404 naming it."""
    from fastapi.responses import JSONResponse, Response

    files = {}
    for name, ctype in WEB_FILES.items():
        path = os.path.join(web_dir, name)
        try:
            with open(path, "rb") as f:
                files[name] = (f.read(), ctype)
        except OSError as e:
            files[name] = (None, f"the web chat file {path} cannot be read ({e.strerror}); "
                                 f"reinstall pyflashmoe")
    headers = {"Content-Security-Policy": WEB_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    def serve(name):
        data, ctype = files[name]
        if data is None:
            return JSONResponse(APIError(ctype, None, 404, "not_found_error").body(), status_code=404)
        return Response(data, media_type=ctype, headers=headers)


    @app.get("/", include_in_schema=False)
    async def web_page():
        return serve("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def web_file(name: str):
        if name not in files or name == "index.html":
            return JSONResponse(APIError(f"no web file {_short(name)} (there are "
                                         f"{', '.join(n for n in files if n != 'index.html')})",
                                         None, 404, "not_found_error").body(), status_code=404)
        return serve(name)


def build_app(server: Server, max_body: int = DEFAULT_MAX_BODY, allowed_hosts=None,
              cors_origins=None, api_key=None):
    """The FastAPI application around a Server.

    max_body: bytes a request body may have (413 beyond). allowed_hosts: Host names accepted
    (list or comma string; None or "*" = any; serve_cli passes default_allowed_hosts). cors_origins:
    Origins allowed (None = CORS off: any request with an Origin header is refused). api_key: when
    set, /v1/ requests must carry it (401 otherwise); /health stays open."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise ArgumentError(f"max_body must be a positive number of bytes, got {max_body!r}")
    app = FastAPI(title="pyflashmoe", docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                       api_key=api_key, max_body=max_body)
    origins = _split_list(cors_origins)
    if origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    engine = server.engine

    def err(e, anthropic=False):
        status, body = _error_body(e)
        if anthropic:
            body = _anthropic_error(status, body)
        return JSONResponse(body, status_code=status, headers=getattr(e, "headers", None))

    def is_anthropic(request):
        return _is_anthropic_path(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request, exc):
        body = APIError(str(exc.detail), None, exc.status_code,
                        "not_found_error" if exc.status_code == 404 else "invalid_request_error").body()
        if is_anthropic(request):
            body = _anthropic_error(exc.status_code, body)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(request, exc):  # a body that does not fit its api_models model
        return err(invalid_request(exc.errors(), body_loc=True), is_anthropic(request))

    @app.exception_handler(Exception)
    async def _any_exc(request, exc):
        return err(exc, is_anthropic(request))

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_event(obj):  # Anthropic's framing: the event's type, then its data
        return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(job: Job):
        anthropic = job.kind == "messages"

        def error_event(e):
            status, body = _error_body(e)
            return sse_event(_anthropic_error(status, body)) if anthropic else sse(body)

        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.queue.get(), job.remaining())
                except asyncio.TimeoutError:
                    engine.cancel(job, timed_out=True)
                    yield error_event(job.timeout_error())
                    break
                if kind == "chunk":
                    yield sse_event(payload) if anthropic else sse(payload)
                elif kind == "error":
                    yield error_event(payload)
                    break
                elif kind == "end":
                    break
            if not anthropic:
                yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (this generator is cancelled)
            engine.cancel(job)

    async def await_result(job: Job, receive):
        anthropic = job.kind == "messages"
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            while True:
                get = asyncio.ensure_future(job.queue.get())
                done, _ = await asyncio.wait({get, gone}, timeout=job.remaining(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    kind, payload = get.result()
                    if kind == "result":
                        return JSONResponse(payload)
                    if kind == "error":
                        return err(payload, anthropic)
                    if kind == "end":
                        return err(APIError("the request ended without a result", None, 500,
                                            "server_error"), anthropic)
                    continue
                get.cancel()
                if gone in done:  # nobody will read this
                    engine.cancel(job)
                    return JSONResponse({}, status_code=499)
                engine.cancel(job, timed_out=True)
                return err(job.timeout_error(), anthropic)
        finally:
            gone.cancel()
            engine.cancel(job)

    async def handle(request: Request, kind: str, req):
        """req: the request's api_models model (FastAPI validated it)."""
        size = request.scope.get(BODY_SIZE_KEY, 0)
        anthropic = kind == "messages"
        try:
            stream = bool(req.stream)
            include_usage = bool(not anthropic and req.stream_options is not None
                                 and req.stream_options.include_usage)
            if anthropic:
                from pyflashmoe import server_anthropic
                prepare = functools.partial(server_anthropic.prepare, server)
            else:
                prepare = server.prepare_chat if kind == "chat" else server.prepare_completion
            engine.admission_check()
            arrived = time.monotonic()
            st = await run_in_threadpool(prepare, req)
        except Exception as e:
            return err(e, anthropic)
        finally:
            req = None  # drop a big body before the generation
            if size >= BIG_BODY:
                engine.note_big_request()
        job = Job(kind, st, stream, include_usage, asyncio.get_running_loop(), arrived, server.timeout)
        del st
        try:
            engine.submit(job)
        except APIError as e:
            return err(e, anthropic)
        if stream:
            return StreamingResponse(stream_events(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await await_result(job, request.receive)

    add_web_routes(app)  # GET /: the web chat page

    @app.get("/health")
    async def health():
        h = engine.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            return err(APIError(f"model {_short(model_id)} not found (this server has "
                                f"{server.model_name!r})", "model", 404, "not_found_error",
                                "model_not_found"))
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: _models.ChatCompletionRequest):
        return await handle(request, "chat", body)

    @app.post("/v1/completions")
    async def completions(request: Request, body: _models.CompletionRequest):
        return await handle(request, "completion", body)

    @app.post("/v1/messages")
    async def messages(request: Request, body: _models.MessagesRequest):  # server_anthropic
        return await handle(request, "messages", body)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request, body: _models.CountTokensRequest):
        from pyflashmoe import server_anthropic
        try:
            return JSONResponse(await run_in_threadpool(server_anthropic.count_tokens, server, body))
        except Exception as e:
            return err(e, True)

    return app


def serve_cli(a) -> int:
    """`flashmoe serve DIR ...`: load the model once and serve it with uvicorn."""
    import os
    try:
        import uvicorn
    except ImportError:
        raise FlashMoEError("flashmoe serve needs fastapi and uvicorn: pip install 'pyflashmoe[serve]'") from None
    from pyflashmoe.generate import load_from_args, parse_size
    max_queue = getattr(a, "max_queue", DEFAULT_MAX_QUEUE)
    parallel = getattr(a, "parallel", None)
    if parallel is None:
        parallel = DEFAULT_PARALLEL
    if not 1 <= parallel <= MAX_PARALLEL:
        raise ArgumentError(f"--parallel must be in [1, {MAX_PARALLEL}], got {parallel}")
    a.parallel = parallel  # load_from_args gives the Model that many sessions
    timeout = getattr(a, "timeout", DEFAULT_TIMEOUT)
    if max_queue is None or max_queue < 0:
        raise ArgumentError(f"--max-queue must be >= 0, got {max_queue}")
    if timeout is None or not math.isfinite(timeout) or timeout < 0:
        raise ArgumentError(f"--timeout must be a number of seconds >= 0 (0 = none), got {timeout}")
    max_body = parse_size(getattr(a, "max_body", None) or DEFAULT_MAX_BODY, "--max-body")
    if max_body < 1024:
        raise ArgumentError(f"--max-body must be at least 1KiB, got {max_body} bytes")
    allowed = _split_list(getattr(a, "allowed_hosts", None))
    if allowed is None:
        allowed = default_allowed_hosts(a.host)
    elif not allowed:
        raise ArgumentError("--allowed-hosts: give host names separated by commas, or '*' for any")
    cors = _split_list(getattr(a, "cors_origins", None))
    api_key = getattr(a, "api_key", None) or os.environ.get("FLASHMOE_API_KEY") or None
    from pyflashmoe.prefix import state_settings
    states = state_settings(a)  # --state-ram / --state-dir / --state-disk, checked before the load
    model = load_from_args(a)
    model.pool.configure(**states)
    from pyflashmoe.generate import DEMO_MODEL_DIR
    name = a.model_name or ("pyflashmoe-demo" if os.path.abspath(a.dir) == DEMO_MODEL_DIR
                            else os.path.basename(os.path.normpath(a.dir)))
    server = Server(model, name, max_queue=max_queue, timeout=timeout, parallel=parallel)
    app = build_app(server, max_body=max_body, allowed_hosts=allowed, cors_origins=cors or None,
                    api_key=api_key)
    if model.tokenizer is not None and model.eos_token_ids:
        def warm():  # build llguidance's tokenizer now, not on the first JSON request
            try:
                from pyflashmoe.constrain import llg_tokenizer
                llg_tokenizer(model.tokenizer.path, model.n_vocab, model.eos_token_ids)
            except Exception:
                pass  # reported when a JSON request needs it
        threading.Thread(target=warm, daemon=True).start()
    print(f"flashmoe serve: {name} on http://{a.host}:{a.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        server.close()
    return 0
