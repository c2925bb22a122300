"""The Anthropic Messages API (`POST /v1/messages`) on top of the OpenAI-compatible server.

This is a conversion layer, not a second server: a Messages request is validated and turned into
the parts `Server.prepare_chat_messages` takes (OpenAI-style messages for the chat template,
sampling keyword arguments, tools, tool choice, enable_thinking), runs as a Job on the same
engine thread, queue and limits, and its output (pyflashmoe.toolcalls.OutputParser's reasoning,
content and tool calls) is written back as Anthropic content blocks or SSE events.

Request -> template messages:
* `system` (a string or text blocks) -> a leading system message.
* user `text` blocks -> the user message; `tool_result` blocks (content a string or text blocks;
  is_error prefixes "Error: ") -> role "tool" messages, before the user's text.
* assistant `text` -> content, `tool_use` -> tool_calls (the input object as arguments),
  `thinking` -> reasoning_content (`redacted_thinking` is dropped: it cannot be read).
* `thinking` {"type": "enabled", "budget_tokens": N} / {"type": "disabled"} -> the template's
  enable_thinking True / False; when absent, thinking is off (Anthropic's default). budget_tokens
  is checked (an integer >= 1) but not enforced: max_tokens bounds thinking + answer together.
* `tools` [{name, description, input_schema}] -> functions; `tool_choice` {"type": "auto"} |
  {"type": "any"} | {"type": "tool", "name"} | {"type": "none"}; "any" and a named tool are
  enforced by the tool-call grammar as tool_choice "required" is on the OpenAI path;
  disable_parallel_tool_use -> parallel_tool_calls false.
* A final assistant message is a prefilled answer: its text follows the generation prompt and
  the model continues it (the response holds only the continuation).
* `max_tokens` (required, >= 1), `stop_sequences`, `temperature`, `top_p`, `top_k`: the OpenAI
  path's ranges and limits (api_models.MessagesRequest, server.sampling_kw). `metadata` and other
  fields are ignored.

Response: {"id": "msg_...", "type": "message", "role": "assistant", "content": [thinking, text,
tool_use blocks], "model", "stop_reason": "end_turn" | "max_tokens" | "stop_sequence" |
"tool_use", "stop_sequence", "usage": {"input_tokens" (prompt tokens evaluated), "output_tokens",
"cache_read_input_tokens" (prompt tokens reused from the session)}}.
`POST /v1/messages/count_tokens` answers {"input_tokens": N} for the same body (max_tokens not
needed). Streaming sends the official
event sequence: message_start, content_block_start / content_block_delta (thinking_delta,
text_delta, input_json_delta) / content_block_stop per block, message_delta (stop_reason,
stop_sequence, usage), message_stop; errors as `event: error`. Errors are Anthropic-shaped:
{"type": "error", "error": {"type": "invalid_request_error", "message": "...names the field..."}}.
"""
import json
import uuid

from pyflashmoe import api_models as _models
from pyflashmoe.server import APIError, _check_len, _short, sampling_kw, validate_request
from pyflashmoe.toolcalls import OutputParser

# HTTP status -> Anthropic error type
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_body(status: int, openai_body: dict) -> dict:
    """An OpenAI-shaped error body (server._error_body's) -> Anthropic's shape."""
    e = openai_body.get("error") or {}
    msg = str(e.get("message", ""))
    param = e.get("param")
    if param and param not in msg:
        msg = f"{param}: {msg}"
    typ = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": typ, "message": msg}}


# ------------------------------------------------------------------------------ request
# The body is an api_models.MessagesRequest / CountTokensRequest (types, ranges and block
# shapes are checked there); what follows converts it, with the checks that need the model.
def _texts(content, where, max_chars):
    """A string or a list of text blocks -> str."""
    if isinstance(content, str):
        text = content
    else:
        text = ""
        for j, b in enumerate(content):
            _check_len(b.text, f"{where}.{j}.text", max_chars)
            text += b.text
    _check_len(text, where, max_chars)
    return text


def parse_messages(req, max_chars=None) -> list[dict]:
    """Anthropic system + messages (a validated request, or its dict) -> the OpenAI-style
    message list server.template_messages makes."""
    req = validate_request(_models.CountTokensRequest, req) if isinstance(req, dict) else req
    out = []
    if req.system is not None:
        text = _texts(req.system, "system", max_chars)
        if text:
            out.append({"role": "system", "content": text})
    names = {}  # tool_use id -> tool name (a tool message's name)
    for i, m in enumerate(req.messages):
        w = f"messages.{i}.content"
        if isinstance(m.content, str):
            _check_len(m.content, w, max_chars)
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            out.extend(_user_blocks(m.content, w, max_chars, names))
        else:
            out.append(_assistant_blocks(m.content, w, max_chars, names))
    return out


def _user_blocks(content, w, max_chars, names):
    tools, texts = [], []
    for j, b in enumerate(content):
        wb = f"{w}.{j}"
        if b.type == "text":
            _check_len(b.text, f"{wb}.text", max_chars)
            texts.append(b.text)
        elif b.type == "tool_result":
            text = _texts(b.content if b.content is not None else "", f"{wb}.content", max_chars)
            if b.is_error:
                text = "Error: " + text
            msg = {"role": "tool", "content": text, "tool_call_id": b.tool_use_id}
            if b.tool_use_id in names:
                msg["name"] = names[b.tool_use_id]
            tools.append(msg)
        else:
            raise APIError(f"'{wb}.type': unsupported user content block {_short(b.type)} (this "
                           f"server takes text and tool_result)", f"{wb}.type")
    out = list(tools)
    if texts or not tools:
        text = "".join(texts)
        _check_len(text, w, max_chars)
        out.append({"role": "user", "content": text})
    return out


def _assistant_blocks(content, w, max_chars, names):
    texts, reasoning, calls = [], [], []
    for j, b in enumerate(content):
        wb = f"{w}.{j}"
        if b.type == "text":
            _check_len(b.text, f"{wb}.text", max_chars)
            texts.append(b.text)
        elif b.type == "thinking":
            _check_len(b.thinking, f"{wb}.thinking", max_chars)
            reasoning.append(b.thinking)
        elif b.type == "redacted_thinking":
            continue
        elif b.type == "tool_use":
            _check_len(json.dumps(b.input), f"{wb}.input", max_chars)
            names[b.id] = b.name
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": b.input}})
        else:
            raise APIError(f"'{wb}.type': unsupported assistant content block {_short(b.type)} "
                           f"(this server takes text, thinking and tool_use)", f"{wb}.type")
    msg = {"role": "assistant", "content": "".join(texts)}
    _check_len(msg["content"], w, max_chars)
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def parse_tools(req):
    """Anthropic tools + tool_choice (a validated request, or its dict) -> (OpenAI-style tools or
    None, choice, parallel) with choice "none" | "auto" | "required" (a named tool narrows the
    list, as server.tool_spec does)."""
    req = validate_request(_models.CountTokensRequest, req) if isinstance(req, dict) else req
    choice = req.tool_choice
    ctype = choice.type if choice is not None else "auto"
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if not req.tools:
        if ctype in ("any", "tool"):
            raise APIError(f"'tool_choice' {ctype!r} needs 'tools'", "tool_choice")
        return None, "none", parallel
    out = []
    for t in req.tools:
        fn = {"name": t.name, "parameters": t.input_schema}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    if ctype == "none":
        return None, "none", parallel
    if ctype == "tool":
        out = [t for t in out if t["function"]["name"] == choice.name]
        if not out:
            raise APIError(f"'tool_choice.name' {_short(choice.name)} is not in 'tools'",
                           "tool_choice.name")
        return out, "required", parallel
    return out, ("required" if ctype == "any" else "auto"), parallel


def convert(server, req, generation: bool = True):
    """Convert a validated Messages request (api_models.MessagesRequest; CountTokensRequest when
    generation is False; a dict is validated first): (msgs, kw, tools, choice, parallel, ctk,
    prefill), the arguments of Server.prepare_chat_messages. generation=False (count_tokens):
    max_tokens and the sampling fields are not needed."""
    req = validate_request(_models.MessagesRequest if generation else _models.CountTokensRequest, req)
    server.check_model(req.model)
    m = server.model
    kw = {}
    if generation:
        kw = sampling_kw(req, m.context_length, m.n_vocab)
        if req.stop_sequences:
            ss = req.stop_sequences
            kw["stop"] = [ss] if isinstance(ss, str) else list(ss)
    msgs = parse_messages(req, server.max_prompt_chars)
    tools, choice, parallel = parse_tools(req)
    ctk = {}
    tok = m.tokenizer
    thinking = req.thinking is not None and req.thinking.type != "disabled"
    if tok is not None and "enable_thinking" in (tok.chat_template or ""):
        ctk["enable_thinking"] = thinking
    prefill = ""
    if msgs[-1]["role"] == "assistant":  # a prefilled answer: the model continues it
        last = msgs.pop()
        w = f"messages.{len(req.messages) - 1}"
        if last.get("tool_calls") or last.get("reasoning_content"):
            raise APIError(f"'{w}': a final assistant message (a prefilled answer) may only hold "
                           f"text", w)
        prefill = last["content"]
        if not any(x["role"] == "user" for x in msgs):
            raise APIError("'messages' needs a user message before a final assistant message",
                           "messages")
    return msgs, kw, tools, choice, parallel, ctk, prefill


def prepare(server, body) -> dict:
    """A validated, converted Messages request (api_models.MessagesRequest or its dict),
    prepared as a chat generation."""
    msgs, kw, tools, choice, parallel, ctk, prefill = convert(server, body)
    st = server.prepare_chat_messages(msgs, kw, tools, choice, parallel, None, ctk, prefill)
    st["stops"] = kw.get("stop") or []
    return st


def count_tokens(server, body) -> dict:
    """POST /v1/messages/count_tokens: the prompt's token count, nothing generated."""
    msgs, _, tools, _, _, ctk, prefill = convert(server, body, generation=False)
    _, ids = server.chat_prompt(msgs, tools, None, ctk, prefill)
    return {"input_tokens": len(ids)}


# ------------------------------------------------------------------------------ response
class _Output:
    """Feeds the generation's pieces to an OutputParser and works out the stop reason."""

    def __init__(self, server, st):
        self.server, self.st = server, st
        self.parser = OutputParser(**st["parser_args"])
        self.tokens, self.parts = [], []
        self.finish = None
        self.last_token = None

    def pieces(self):
        """Yields the parser's [(kind, text)] events as the generation goes."""
        for piece in self.st["gen"]:
            if piece.token is not None:
                self.tokens.append(piece.token)
                self.last_token = piece.token
            if piece.text:
                self.parts.append(piece.text)
                yield self.parser.feed(piece.text)
            self.finish = piece.finish_reason or self.finish

    def stop(self, calls):
        """(stop_reason, stop_sequence)."""
        if calls:
            return "tool_use", None
        if self.finish == "length":
            return "max_tokens", None
        stops = self.st.get("stops") or []
        if self.finish == "stop" and stops:
            seq = self._which_stop(stops)
            if seq is not None:
                return "stop_sequence", seq
        return "end_turn", None

    def _which_stop(self, stops):
        """The stop string that ended the generation: what the generated tokens decode to right
        after the returned text (None when it ended on EOS without one)."""
        model = self.server.model
        eos = model.eos_token_ids or ()
        tok = model.tokenizer
        if tok is None:
            return None
        done = "".join(self.parts)
        ids = [t for t in self.tokens if t not in eos]
        full = tok.decode(ids)
        for s in stops:
            if full.startswith(s, len(done)):
                return s
        if self.last_token in eos:
            return None
        hits = [(full.find(s, max(0, len(done) - len(s))), s) for s in stops]
        hits = [h for h in hits if h[0] >= 0]
        return min(hits)[1] if hits else stops[0]

    def usage(self):
        s = self.st.get("stats") or self.server.model.stats or {}  # this request's generation
        cached = int(s.get("cached_tokens", 0))
        return {"input_tokens": self.st["n_prompt"] - cached,
                "output_tokens": int(s.get("generated_tokens", 0)),
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _tool_use(call):
    try:
        inp = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        inp = {}
    if not isinstance(inp, dict):
        inp = {}
    return {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24],
            "name": call["function"]["name"], "input": inp}


def _message(server, content, stop_reason, stop_sequence, usage):
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "content": content, "model": server.model_name, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence, "usage": usage}


def run(server, st) -> dict:
    """The non-streaming response (on the engine thread)."""
    out = _Output(server, st)
    for _ in out.pieces():
        pass
    out.parser.finish()
    res = out.parser.result()
    content = []
    if res.reasoning:
        content.append({"type": "thinking", "thinking": res.reasoning, "signature": ""})
    if res.content:
        content.append({"type": "text", "text": res.content})
    content.extend(_tool_use(c) for c in res.tool_calls or ())
    reason, seq = out.stop(res.tool_calls)
    return _message(server, content, reason, seq, out.usage())


def stream(server, st):
    """The streaming events (dicts with a "type"; the caller frames them as SSE)."""
    out = _Output(server, st)
    msg = _message(server, [], None, None,
                   {"input_tokens": st["n_prompt"], "output_tokens": 0,
                    "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0})
    yield {"type": "message_start", "message": msg}
    state = {"index": -1, "kind": None}

    def close():
        if state["kind"] is not None:
            yield {"type": "content_block_stop", "index": state["index"]}
            state["kind"] = None

    def blocks(events):
        for kind, text in events:
            if not text:
                continue
            if kind != state["kind"]:
                yield from close()
                state["index"] += 1
                state["kind"] = kind
                block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" \
                    else {"type": "text", "text": ""}
                yield {"type": "content_block_start", "index": state["index"], "content_block": block}
            delta = {"type": "thinking_delta", "thinking": text} if kind == "reasoning" \
                else {"type": "text_delta", "text": text}
            yield {"type": "content_block_delta", "index": state["index"], "delta": delta}

    for events in out.pieces():
        yield from blocks(events)
    events, calls = out.parser.finish()
    yield from blocks(events)
    yield from close()
    for c in calls or ():
        state["index"] += 1
        block = _tool_use(c)
        inp = block["input"]
        block["input"] = {}
        yield {"type": "content_block_start", "index": state["index"], "content_block": block}
        yield {"type": "content_block_delta", "index": state["index"],
               "delta": {"type": "input_json_delta", "partial_json": json.dumps(inp, ensure_ascii=False)}}
        yield {"type": "content_block_stop", "index": state["index"]}
    reason, seq = out.stop(calls)
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
           "usage": out.usage()}
    yield {"type": "message_stop"}
