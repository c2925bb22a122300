"""Splitting model output into reasoning, content and OpenAI tool calls.

Formats understood (both inside `<tool_call>...</tool_call>`):

* Qwen3.5 / Qwen3-Coder XML::

      <tool_call>
      <function=NAME>
      <parameter=P>
      VALUE
      </parameter>
      </function>
      </tool_call>

  A value is parsed as JSON when it parses (numbers, booleans, objects, arrays, null), else kept
  as a string; when the request's tool schema declares the parameter as a string, it stays a
  string ("123" is not turned into 123).
* Qwen3 / Hermes JSON: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Reasoning: text before `</think>` is reasoning when the prompt ended inside an open `<think>`
block (Qwen3.5's template writes `<think>\\n` itself), or when the output starts with `<think>`
(Qwen3). It is returned separately (`reasoning_content`) and never part of `content`.

`OutputParser` works incrementally (for streaming): feed() returns the reasoning / content text
that is certain so far, holding back text that might be the start of a tag; finish() returns the
rest and the parsed tool calls. The non-streaming path feeds everything at once, so both paths
give the same result.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_FUNC_RE = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAM_RE = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _param_types(tools) -> dict:
    """{function name: {parameter name: declared JSON-schema type}} from OpenAI `tools`."""
    out: dict = {}
    for t in tools or []:
        if not isinstance(t, dict):
            continue
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        name = fn.get("name") if isinstance(fn, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(name, str) and isinstance(props, dict):
            out[name] = {k: (v.get("type") if isinstance(v, dict) else None) for k, v in props.items()}
    return out


def declared_string(declared) -> bool:
    """True when a parameter's declared JSON-schema `type` makes its XML value raw text (a
    string only): such a value is never parsed as JSON."""
    types = declared if isinstance(declared, list) else [declared]
    return "string" in types and not any(t in types for t in ("object", "array", "number", "integer",
                                                              "boolean", "null"))


def _convert_value(raw: str, declared):
    # the template writes "\n" + value + "\n"; strip exactly that framing
    v = raw[1:] if raw.startswith("\n") else raw
    v = v[:-1] if v.endswith("\n") else v
    types = declared if isinstance(declared, list) else [declared]
    if declared_string(declared):
        return v
    if "boolean" in types and v.strip() in ("True", "False", "true", "false"):
        return v.strip() in ("True", "true")  # the template writes Python's True/False
    if "null" in types and v.strip() in ("None", "null"):
        return None
    try:
        return json.loads(v)
    except ValueError:
        return v


def parse_tool_call_block(block: str, tools=None) -> dict | None:
    """One `<tool_call>` body (without the tags) -> {"name", "arguments" (JSON string)} or None."""
    body = block.strip()
    if not body:
        return None
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
                arg_s = args
            except ValueError:
                arg_s = json.dumps(args, ensure_ascii=False)
        else:
            arg_s = json.dumps(args if args is not None else {}, ensure_ascii=False)
        return {"name": obj["name"], "arguments": arg_s}
    m = _FUNC_RE.search(body)
    if not m:
        return None
    name = m.group(1).strip()
    types = _param_types(tools).get(name, {})
    args = {}
    for pm in _PARAM_RE.finditer(m.group(2)):
        pname = pm.group(1).strip()
        args[pname] = _convert_value(pm.group(2), types.get(pname))
    return {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}


def parse_tool_calls(text: str, tools=None) -> tuple[str, list[dict]]:
    """Split text (no reasoning) into (content, tool calls). Each call is an OpenAI tool call
    {"id", "type": "function", "function": {"name", "arguments"}}. A block that does not parse
    stays in the content verbatim. An unterminated last block (output cut by max_tokens) is
    parsed when it can be."""
    content_parts = []
    calls = []
    pos = 0
    while True:
        i = text.find(TOOL_OPEN, pos)
        if i < 0:
            content_parts.append(text[pos:])
            break
        content_parts.append(text[pos:i])
        j = text.find(TOOL_CLOSE, i + len(TOOL_OPEN))
        end = len(text) if j < 0 else j + len(TOOL_CLOSE)
        body = text[i + len(TOOL_OPEN):(len(text) if j < 0 else j)]
        call = parse_tool_call_block(body, tools)
        if call is None:
            content_parts.append(text[i:end])
        else:
            calls.append({"id": new_call_id(), "type": "function", "function": call})
        pos = end
    content = "".join(content_parts)
    if calls:
        content = content.strip()
    return content, calls


@dataclass
class ParsedOutput:
    content: str
    reasoning: str
    tool_calls: list = field(default_factory=list)


class OutputParser:
    """Incremental split of generated text into reasoning / content / tool-call text.

    in_reasoning: the prompt ended inside an open <think> block. tools: parse tool calls (the
    request had tools and tool_choice != "none"); the tool schemas keep string parameters strings.
    """

    def __init__(self, in_reasoning: bool = False, tools=None, parse_tools: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.tools = tools
        self.parse_tools = parse_tools
        self.buf = ""  # undecided text
        self.tool_text = ""  # everything from the first <tool_call> on
        self.reasoning = ""
        self.content = ""
        self._strip_lead = False  # drop whitespace right after </think>
        self._ws_before_tool = ""
        self.tool_calls: list = []

    def _emit(self, kind, text, out):
        if not text:
            return
        if kind == "reasoning" and not self.reasoning:
            text = text.lstrip("\n")  # "<think>\n" opens the block
            if not text:
                return
        if kind == "content" and self._strip_lead:
            text = text.lstrip()
            if not text:
                return
            self._strip_lead = False
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        out.append((kind, text))

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """Add generated text; returns [(kind, text)] with kind "reasoning" or "content"."""
        out: list = []
        self.buf += text
        while True:
            if self.state == "tool":
                self.tool_text += self.buf
                self.buf = ""
                return out
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf = s[len(THINK_OPEN):]
                    self.state = "reasoning"
                    continue
                if not final and (not s or THINK_OPEN.startswith(s)):
                    return out  # might still become <think>
                self.state = "content"
                continue
            if self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    self._emit("reasoning", self.buf[:i].rstrip("\n"), out)
                    self.buf = self.buf[i + len(THINK_CLOSE):]
                    self.state = "content"
                    self._strip_lead = True
                    continue
                keep = 0 if final else _partial_suffix(self.buf, THINK_CLOSE)
                # hold back trailing newlines too (they are dropped before </think>)
                cut = len(self.buf) - keep
                if not final:
                    while cut > 0 and self.buf[cut - 1] == "\n":
                        cut -= 1
                self._emit("reasoning", self.buf[:cut], out)
                self.buf = self.buf[cut:]
                return out
            # content
            if self.parse_tools:
                i = self.buf.find(TOOL_OPEN)
                if i >= 0:
                    before = self.buf[:i]
                    self._emit("content", before.rstrip(), out)
                    self._ws_before_tool = before[len(before.rstrip()):]
                    self.tool_text = ""
                    self.buf = self.buf[i:]
                    self.state = "tool"
                    continue
                keep = 0 if final else _partial_suffix(self.buf, TOOL_OPEN)
                cut = len(self.buf) - keep
                if not final:  # whitespace before a tool call is dropped: hold it back
                    while cut > 0 and self.buf[cut - 1].isspace():
                        cut -= 1
            else:
                cut = len(self.buf)
            self._emit("content", self.buf[:cut], out)
            self.buf = self.buf[cut:]
            return out

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        """Flush everything; returns (remaining [(kind, text)], tool calls)."""
        out = self.feed("", final=True)
        calls: list = []
        if self.state == "tool" and self.tool_text:
            rest, calls = parse_tool_calls(self.tool_text, self.tools)
            if not calls:  # nothing parsed: the text is content, verbatim
                rest = self._ws_before_tool + self.tool_text if self.content else self.tool_text
            elif rest and self.content:
                rest = "\n\n" + rest
            self._emit("content", rest, out)
        self.tool_calls = calls
        return out, calls

    def result(self) -> ParsedOutput:
        return ParsedOutput(self.content, self.reasoning, self.tool_calls)


def parse_output(text: str, in_reasoning: bool = False, tools=None, parse_tools: bool = True) -> ParsedOutput:
    """Whole-output convenience: (content, reasoning, tool_calls)."""
    p = OutputParser(in_reasoning=in_reasoning, tools=tools, parse_tools=parse_tools)
    p.feed(text)
    p.finish()
    return p.result()


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an unclosed <think> block."""
    i = prompt_text.rfind(THINK_OPEN)
    return i >= 0 and prompt_text.find(THINK_CLOSE, i) < 0


def tool_call_errors(calls, tools, name: str | None = None) -> list[str]:
    """Why parsed tool calls (parse_output(...).tool_calls) are not valid calls to `tools`
    (OpenAI tools; only `name` when given): no call, an unknown function, arguments that are
    not a JSON object, or arguments that fail the function's JSON schema (jsonschema). [] when
    every call is valid."""
    import jsonschema
    schemas = {}
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}
    if not calls:
        return ["no tool call"]
    errs = []
    for c in calls:
        fn = c.get("function", c)
        fname = fn.get("name")
        if fname not in schemas or (name is not None and fname != name):
            errs.append(f"function {fname!r} is not " + (repr(name) if name else "in tools"))
            continue
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                errs.append(f"{fname}: arguments are not JSON: {e}")
                continue
        if not isinstance(args, dict):
            errs.append(f"{fname}: arguments are not a JSON object")
            continue
        try:
            jsonschema.validate(args, schemas[fname])
        except jsonschema.ValidationError as e:
            errs.append(f"{fname}: {e.message}")
    return errs
