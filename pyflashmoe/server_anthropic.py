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
  path's ranges and limits (parse_sampling / parse_stop). `metadata` and other fields are ignored.

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

from pyflashmoe.server import (
    APIError,
    _check_len,
    _integer,
    _short,
    check_tool_list,
    message_list,
    parse_sampling,
    parse_stop,
)
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
def _block_type(b, where):
    if not isinstance(b, dict):
        raise APIError(f"{where} must be an object", where)
    t = b.get("type")
    if not isinstance(t, str):
        raise APIError(f"{where}.type is required", f"{where}.type")
    return t


def _text(b, where, max_chars):
    v = b.get("text")
    if not isinstance(v, str):
        raise APIError(f"{where}.text must be a string", f"{where}.text")
    _check_len(v, f"{where}.text", max_chars)
    return v


def _texts(content, where, max_chars, what="text blocks"):
    """A string or a list of text blocks -> str."""
    if isinstance(content, str):
        _check_len(content, where, max_chars)
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of {what}", where)
    parts = []
    for j, b in enumerate(content):
        w = f"{where}[{j}]"
        t = _block_type(b, w)
        if t != "text":
            raise APIError(f"{w}.type: only text blocks are supported here, got {_short(t)}",
                           f"{w}.type")
        parts.append(_text(b, w, max_chars))
    text = "".join(parts)
    _check_len(text, where, max_chars)
    return text


def parse_messages(body: dict, max_chars=None) -> list[dict]:
    """Anthropic system + messages -> the OpenAI-style message list server.parse_messages makes."""
    out = []
    system = body.get("system")
    if system is not None:
        text = _texts(system, "system", max_chars)
        if text:
            out.append({"role": "system", "content": text})
    msgs = message_list(body)
    names = {}  # tool_use id -> tool name (a tool message's name)
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise APIError(f"{where}.role must be 'user' or 'assistant', got {_short(role)}",
                           f"{where}.role")
        content = m.get("content")
        w = f"{where}.content"
        if content is None:
            raise APIError(f"{w} is required", w)
        if isinstance(content, str):
            _check_len(content, w, max_chars)
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(f"{w} must be a string or a list of content blocks", w)
        if role == "user":
            out.extend(_user_blocks(content, w, max_chars, names))
        else:
            out.append(_assistant_blocks(content, w, max_chars, names))
    return out


def _user_blocks(content, w, max_chars, names):
    tools, texts = [], []
    for j, b in enumerate(content):
        wb = f"{w}[{j}]"
        t = _block_type(b, wb)
        if t == "text":
            texts.append(_text(b, wb, max_chars))
        elif t == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or not tid:
                raise APIError(f"{wb}.tool_use_id must be a non-empty string", f"{wb}.tool_use_id")
            c = b.get("content", "")
            text = _texts(c if c is not None else "", f"{wb}.content", max_chars)
            err = b.get("is_error", False)
            if err is not None and not isinstance(err, bool):
                raise APIError(f"{wb}.is_error must be a boolean", f"{wb}.is_error")
            if err:
                text = "Error: " + text
            msg = {"role": "tool", "content": text, "tool_call_id": tid}
            if tid in names:
                msg["name"] = names[tid]
            tools.append(msg)
        else:
            raise APIError(f"{wb}.type: unsupported user content block {_short(t)} (this server "
                           f"takes text and tool_result)", f"{wb}.type")
    out = list(tools)
    if texts or not tools:
        text = "".join(texts)
        _check_len(text, w, max_chars)
        out.append({"role": "user", "content": text})
    return out


def _assistant_blocks(content, w, max_chars, names):
    texts, reasoning, calls = [], [], []
    for j, b in enumerate(content):
        wb = f"{w}[{j}]"
        t = _block_type(b, wb)
        if t == "text":
            texts.append(_text(b, wb, max_chars))
        elif t == "thinking":
            v = b.get("thinking")
            if not isinstance(v, str):
                raise APIError(f"{wb}.thinking must be a string", f"{wb}.thinking")
            _check_len(v, f"{wb}.thinking", max_chars)
            reasoning.append(v)
        elif t == "redacted_thinking":
            continue
        elif t == "tool_use":
            tid, name, inp = b.get("id"), b.get("name"), b.get("input", {})
            if not isinstance(tid, str) or not tid:
                raise APIError(f"{wb}.id must be a non-empty string", f"{wb}.id")
            if not isinstance(name, str) or not name:
                raise APIError(f"{wb}.name must be a non-empty string", f"{wb}.name")
            if not isinstance(inp, dict):
                raise APIError(f"{wb}.input must be an object", f"{wb}.input")
            _check_len(json.dumps(inp), f"{wb}.input", max_chars)
            names[tid] = name
            calls.append({"id": tid, "type": "function", "function": {"name": name, "arguments": inp}})
        else:
            raise APIError(f"{wb}.type: unsupported assistant content block {_short(t)} (this "
                           f"server takes text, thinking and tool_use)", f"{wb}.type")
    msg = {"role": "assistant", "content": "".join(texts)}
    _check_len(msg["content"], w, max_chars)
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def parse_tools(body: dict):
    """Anthropic tools + tool_choice -> (OpenAI-style tools or None, choice, parallel) with choice
    "none" | "auto" | "required" (a named tool narrows the list, as server.parse_tools does)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict):
            raise APIError("'tool_choice' must be an object {\"type\": \"auto\" | \"any\" | \"tool\" "
                           "| \"none\"}", "tool_choice")
        ctype = choice.get("type")
        if ctype not in ("auto", "any", "tool", "none"):
            raise APIError(f"'tool_choice.type' must be 'auto', 'any', 'tool' or 'none', got "
                           f"{_short(ctype)}", "tool_choice.type")
        dp = choice.get("disable_parallel_tool_use", False)
        if dp is not None and not isinstance(dp, bool):
            raise APIError("'tool_choice.disable_parallel_tool_use' must be a boolean",
                           "tool_choice.disable_parallel_tool_use")
        parallel = not dp
    else:
        ctype, parallel = "auto", True
    if tools is None or tools == []:
        if ctype in ("any", "tool"):
            raise APIError(f"'tool_choice' {ctype!r} needs 'tools'", "tool_choice")
        return None, "none", parallel
    check_tool_list(tools)
    out = []
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        if not isinstance(t, dict):
            raise APIError(f"{w} must be an object", w)
        if t.get("type", "custom") not in ("custom", None):
            raise APIError(f"{w}.type: only client tools (name, description, input_schema) are "
                           f"supported, got {_short(t.get('type'))}", f"{w}.type")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(f"{w}.name must be a non-empty string", f"{w}.name")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise APIError(f"{w}.input_schema must be a JSON schema object", f"{w}.input_schema")
        desc = t.get("description")
        if desc is not None and not isinstance(desc, str):
            raise APIError(f"{w}.description must be a string", f"{w}.description")
        fn = {"name": name, "parameters": schema}
        if desc:
            fn["description"] = desc
        out.append({"type": "function", "function": fn})
    if ctype == "none":
        return None, "none", parallel
    if ctype == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise APIError("'tool_choice.name' is required for type 'tool'", "tool_choice.name")
        out = [t for t in out if t["function"]["name"] == name]
        if not out:
            raise APIError(f"'tool_choice.name' {_short(name)} is not in 'tools'", "tool_choice.name")
        return out, "required", parallel
    return out, ("required" if ctype == "any" else "auto"), parallel


def parse_thinking(body: dict):
    th = body.get("thinking")
    if th is None:
        return False
    if not isinstance(th, dict):
        raise APIError("'thinking' must be an object {\"type\": \"enabled\", \"budget_tokens\": N} or "
                       "{\"type\": \"disabled\"}", "thinking")
    typ = th.get("type")
    if typ == "disabled":
        return False
    if typ in ("enabled", "adaptive"):
        if typ == "enabled":
            if th.get("budget_tokens") is None:
                raise APIError("'thinking.budget_tokens' is required when thinking is enabled",
                               "thinking.budget_tokens")
            b = th.get("budget_tokens")
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise APIError(f"'thinking.budget_tokens' must be an integer >= 1, got {_short(b)}",
                               "thinking.budget_tokens")
        return True
    raise APIError(f"'thinking.type' must be 'enabled', 'adaptive' or 'disabled', got {_short(typ)}",
                   "thinking.type")


def convert(server, body: dict, generation: bool = True):
    """Validate a Messages request and convert it: (msgs, kw, tools, choice, parallel, ctk,
    prefill), the arguments of Server.prepare_chat_messages. generation=False (count_tokens):
    max_tokens and the sampling fields are not needed."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", None)
    server.check_model(body)
    m = server.model
    kw = {}
    if generation:
        if body.get("max_tokens") is None:
            raise APIError("'max_tokens' is required", "max_tokens")
        _integer(body, "max_tokens", lo=1, hi=m.context_length,
                 hi_what=" (the model's context length)")
        kw = parse_sampling({k: body[k] for k in ("temperature", "top_p", "top_k", "max_tokens")
                             if k in body}, m.context_length, m.n_vocab)
        stop = parse_stop(body.get("stop_sequences"), "stop_sequences")
        if stop:
            kw["stop"] = stop
    msgs = parse_messages(body, server.max_prompt_chars)
    tools, choice, parallel = parse_tools(body)
    ctk = {}
    tok = m.tokenizer
    thinking = parse_thinking(body)
    if tok is not None and "enable_thinking" in (tok.chat_template or ""):
        ctk["enable_thinking"] = thinking
    prefill = ""
    if msgs[-1]["role"] == "assistant":  # a prefilled answer: the model continues it
        last = msgs.pop()
        w = f"messages[{len(body['messages']) - 1}]"
        if last.get("tool_calls") or last.get("reasoning_content"):
            raise APIError(f"{w}: a final assistant message (a prefilled answer) may only hold text", w)
        prefill = last["content"]
        if not any(x["role"] == "user" for x in msgs):
            raise APIError("'messages' needs a user message before a final assistant message",
                           "messages")
    return msgs, kw, tools, choice, parallel, ctk, prefill


def prepare(server, body: dict) -> dict:
    """A validated, converted Messages request, prepared as a chat generation."""
    msgs, kw, tools, choice, parallel, ctk, prefill = convert(server, body)
    st = server.prepare_chat_messages(msgs, kw, tools, choice, parallel, None, ctk, prefill)
    st["stops"] = kw.get("stop") or []
    return st


def count_tokens(server, body: dict) -> dict:
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
        s = self.server.model.stats or {}
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
