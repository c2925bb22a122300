"""Request bodies of the HTTP server as pydantic v2 models (one definition per request type).

FastAPI validates every POST body against these (pyflashmoe.server.build_app), and
`error_of(errors)` turns pydantic's error list into the (message, param) of the one error the
server reports: `param` is the dotted path of the field (`messages.0.content.0.type`), the message
says what was wrong and what was given. What needs the served model (max_tokens against the
context length, top_k and logit_bias ids against the vocabulary, the prompt's length, a named tool
being in `tools`, the model name) is checked after this, where the request is prepared.

Types are strict where a JSON client could otherwise be misread: booleans must be true/false
(not "yes"), numbers must be JSON numbers (not strings) and finite, integers may be written 3 or
3.0. Unknown fields are ignored (as OpenAI's and Anthropic's SDKs send fields a server may not
know). Unions are dispatched on the JSON type or on a `type` field, so an error names the one
branch the value was meant for.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field,
                      Strict, StrictBool, Tag, ValidationError)
from pydantic_core import PydanticCustomError

MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_STOP = 16
MAX_STOP_CHARS = 512
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 300        # entries (OpenAI's limit)
MAX_TOP_LOGPROBS = 20       # chat completions (OpenAI: 0..20)
MAX_COMPLETION_LOGPROBS = 5  # legacy completions (OpenAI: 0..5)
INT64 = 1 << 63
# the chat_template_kwargs a client may set (anything else could replace the template's own
# variables: the template, the messages, add_generation_prompt)
CLIENT_TEMPLATE_KWARGS = ("enable_thinking",)


# ------------------------------------------------------------------------------ scalar types
def _int(v):
    """JSON integers (3 or 3.0); never a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("int_type", "must be an integer")
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise PydanticCustomError("int_type", "must be an integer")
        return int(v)
    return v


Float = Annotated[float, Strict(), AllowInfNan(False)]  # a JSON number (ints too), finite
Int = Annotated[int, BeforeValidator(_int)]
Bool = StrictBool


def _tag_fn(key: str):
    """A callable discriminator on the `key` field of an object (tags are '~' + its value)."""
    def fn(v):
        if isinstance(v, dict):
            t = v.get(key)
        elif isinstance(v, BaseModel):
            t = getattr(v, key, None)
        else:
            return None
        return None if t is None else "~" + str(t)
    fn.__name__ = key
    return fn


def by_type(*variants, key="type", default=None):
    """A union of models dispatched on their `key` field (a Literal); `default` is the tag used
    when the field is absent."""
    if len(variants) == 1 and default is None:
        return variants[0]
    tags = []
    for cls in variants:
        lit = cls.model_fields[key].annotation.__args__[0]
        tags.append(Annotated[cls, Tag("~" + lit)])
    fn = _tag_fn(key)
    if default is not None:
        inner = fn

        def fn(v):  # noqa: F811
            if isinstance(v, dict) and key not in v:
                return "~" + default
            return inner(v)
        fn.__name__ = key
    return Annotated[Union[tuple(tags)], Discriminator(fn)]


def _json_kind(v):
    if isinstance(v, str):
        return "~str"
    if isinstance(v, list):
        return "~list"
    if isinstance(v, dict):
        return "~object"
    return None


def str_or_list(item, what: str):
    """A string or a list of `item`, dispatched on the JSON type; anything else is one error."""
    return Annotated[Union[Annotated[str, Tag("~str")], Annotated[list[item], Tag("~list")]],
                     Discriminator(_json_kind, custom_error_type="str_or_list_type",
                                   custom_error_message=f"must be a string or a list of {what}")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[Union[Annotated[StopString, Tag("~str")],
                       Annotated[list[StopString], Tag("~list"), Field(max_length=MAX_STOP)]],
                 Discriminator(_json_kind, custom_error_type="stop_type",
                               custom_error_message="must be a string or a list of strings")]


def _logit_bias(v):
    """{"token id": bias} -> {int id: float}: keys integer strings >= 0, values finite in
    [-100, 100], at most MAX_LOGIT_BIAS entries (ids against the vocabulary: server)."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise PydanticCustomError("logit_bias_type", "must be an object mapping token ids to numbers")
    if len(v) > MAX_LOGIT_BIAS:
        raise PydanticCustomError("logit_bias_size", "has {n} entries; at most {m} are allowed",
                                  {"n": len(v), "m": MAX_LOGIT_BIAS})
    out = {}
    for k, x in v.items():
        ks = str(k).strip()
        if not ks.isascii() or not (ks.isdigit() or (ks.startswith("-") and ks[1:].isdigit())):
            raise PydanticCustomError("logit_bias_key", "key {k} is not a token id (an integer string)",
                                      {"k": _short(k)})
        if int(ks) < 0:
            raise PydanticCustomError("logit_bias_key", "key {k} is outside the vocabulary",
                                      {"k": _short(k)})
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                or not -100 <= x <= 100:
            raise PydanticCustomError("logit_bias_value", "value for key {k} must be a finite number "
                                      "in [-100, 100], got {x}", {"k": _short(k), "x": _short(x)})
        out[int(ks)] = out.get(int(ks), 0.0) + float(x)
    return out


LogitBias = Annotated[Any, BeforeValidator(_logit_bias)]


# ------------------------------------------------------------------------------ OpenAI chat
class TextPart(_Model):
    type: Literal["text"]
    text: str


ContentPart = Annotated[Union[Annotated[str, Tag("~str")], Annotated[TextPart, Tag("~object")]],
                        Discriminator(_json_kind, custom_error_type="content_part_type",
                                      custom_error_message="must be a string or a content part object")]
Content = Annotated[Union[Annotated[str, Tag("~str")], Annotated[list[ContentPart], Tag("~list")]],
                    Discriminator(_json_kind, custom_error_type="content_type",
                                  custom_error_message="must be a string, a list of content parts or null")]


def _arguments(v):
    if v is None or isinstance(v, (str, dict)):
        return v
    raise PydanticCustomError("arguments_type", "must be a JSON string or an object")


class FunctionCall(_Model):
    name: str
    arguments: Annotated[Any, BeforeValidator(_arguments)] = "{}"


class ToolCall(_Model):
    id: Any = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: Any = None
    tool_call_id: Any = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_Model):
    name: Annotated[str, Field(min_length=1)]
    description: Any = None
    parameters: dict[str, Any] | None = None
    strict: Any = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class ToolChoiceFunction(_Model):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[Union[Annotated[Literal["none", "auto", "required"], Tag("~str")],
                             Annotated[ToolChoiceFunction, Tag("~object")]],
                       Discriminator(_json_kind, custom_error_type="tool_choice_type",
                                     custom_error_message="must be 'none', 'auto', 'required' or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")]


def _schema(v):
    if v is None or isinstance(v, (dict, bool)):
        return v
    raise PydanticCustomError("schema_type", "must be a JSON schema object")


class JsonSchemaSpec(_Model):
    name: Any = None
    description: Any = None
    strict: Any = None
    schema_: Annotated[Any, BeforeValidator(_schema)] = Field(default=None, alias="schema")


class FormatText(_Model):
    type: Literal["text"]


class FormatJsonObject(_Model):
    type: Literal["json_object"]


class FormatJsonSchema(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class StreamOptions(_Model):
    include_usage: Bool | None = None


class TemplateKwargs(BaseModel):
    """chat_template_kwargs: only CLIENT_TEMPLATE_KWARGS may be set."""
    model_config = ConfigDict(extra="forbid")
    enable_thinking: Bool | None = None


class _Sampling(_Model):
    """Fields the OpenAI endpoints share."""
    model: Any = None
    temperature: Annotated[Float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=MAX_REPETITION_PENALTY)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[Int, Field(ge=-INT64, le=INT64 - 1)] | None = None
    max_tokens: Annotated[Int, Field(ge=0)] | None = None
    n: Annotated[Int, Field(ge=1)] | None = None
    stop: Stop | None = None
    logit_bias: LogitBias = None
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    user: Any = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[Int, Field(ge=0)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    response_format: by_type(FormatText, FormatJsonObject, FormatJsonSchema) | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    logprobs: Bool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


def _prompt(v):
    """A string, a list of token ids, or a one-element list of either (one prompt per request)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise PydanticCustomError("prompt_empty", "must not be empty")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return v
    raise PydanticCustomError("prompt_type", "must be a non-empty string or a list of token ids "
                              "(one prompt per request)")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""
    prompt: Annotated[Any, BeforeValidator(_prompt)]
    suffix: str | None = None
    best_of: Annotated[Int, Field(ge=1)] | None = None
    echo: Bool | None = None
    logprobs: Annotated[Int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    response_format: by_type(FormatText, FormatJsonObject, FormatJsonSchema) | None = None


# ------------------------------------------------------------------------------ Anthropic
class ATextBlock(_Model):
    type: Literal["text"]
    text: str


TextBlocks = str_or_list(by_type(ATextBlock), "text blocks")


class AToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1)]
    content: TextBlocks | None = ""
    is_error: Bool | None = None


class AThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: Any = None


class ARedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: Any = None


class AToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    input: dict[str, Any] = Field(default_factory=dict)


ABlock = by_type(ATextBlock, AToolResultBlock, AThinkingBlock, ARedactedThinkingBlock, AToolUseBlock)


class AMessage(_Model):
    role: Literal["user", "assistant"]
    content: str_or_list(ABlock, "content blocks")


class ATool(_Model):
    type: Literal["custom"] | None = None
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    input_schema: dict[str, Any]


class _AChoice(_Model):
    disable_parallel_tool_use: Bool | None = None


class AChoiceAuto(_AChoice):
    type: Literal["auto"]


class AChoiceAny(_AChoice):
    type: Literal["any"]


class AChoiceNone(_AChoice):
    type: Literal["none"]


class AChoiceTool(_AChoice):
    type: Literal["tool"]
    name: str


class AThinkingEnabled(_Model):
    type: Literal["enabled"]
    budget_tokens: Annotated[Int, Field(ge=1)]


class AThinkingAdaptive(_Model):
    type: Literal["adaptive"]


class AThinkingDisabled(_Model):
    type: Literal["disabled"]


class CountTokensRequest(_Model):
    """POST /v1/messages/count_tokens (and the prompt part of /v1/messages)."""
    model: Any = None
    system: TextBlocks | None = None
    messages: Annotated[list[AMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    tools: Annotated[list[ATool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: by_type(AChoiceAuto, AChoiceAny, AChoiceNone, AChoiceTool) | None = None
    thinking: by_type(AThinkingEnabled, AThinkingAdaptive, AThinkingDisabled) | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages (Anthropic): the sampling fields take the OpenAI path's ranges."""
    max_tokens: Annotated[Int, Field(ge=1)]
    stop_sequences: Stop | None = None
    temperature: Annotated[Float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None
    stream: Bool | None = None
    metadata: Any = None


# ------------------------------------------------------------------------------ errors
def _short(v, n=60):
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _loc_name(loc) -> str | None:
    parts = []
    for p in loc:
        if isinstance(p, str) and p.startswith("~"):
            continue  # a union tag (by_type / the JSON-type dispatch), not a field
        s = str(p)
        parts.append(s if len(s) <= 64 else s[:64] + "...")
    return ".".join(parts) or None


def _strip_tags(s: str) -> str:
    return s.replace("'~", "'")


def error_of(errors, body_loc: bool = False) -> tuple[str, str | None]:
    """(message, param) of the first of pydantic's errors (ValidationError.errors() or FastAPI's
    RequestValidationError.errors(), whose locations start with "body" when body_loc)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = tuple(e.get("loc") or ())
    if body_loc and loc and loc[0] == "body":
        loc = loc[1:]
    typ = e.get("type", "")
    ctx = e.get("ctx") or {}
    if typ == "json_invalid":
        return f"the request body is not valid JSON: {_short(ctx.get('error', e.get('msg')), 200)}", None
    if typ in ("union_tag_not_found", "union_tag_invalid") and isinstance(e.get("input"), dict):
        key = str(ctx.get("discriminator", "type")).strip("'").rstrip("()")
        loc = loc + (key,)
    param = _loc_name(loc)
    if param is None:
        if typ in ("model_attributes_type", "dict_type", "model_type", "missing"):
            return "the request body must be a JSON object", None
        return f"invalid request body: {e.get('msg')}", None
    got = _short(e.get("input"))
    if typ == "missing":
        return f"'{param}' is required", param
    if typ == "extra_forbidden" and loc and loc[0] == "chat_template_kwargs":
        return (f"'{param}' cannot be set by a client (allowed keys: "
                f"{', '.join(CLIENT_TEMPLATE_KWARGS)})", param)
    if typ == "literal_error":
        return f"'{param}' must be {_strip_tags(str(ctx.get('expected')))}, got {got}", param
    if typ == "union_tag_invalid":
        return (f"'{param}' must be one of {_strip_tags(str(ctx.get('expected_tags')))}, got "
                f"{_short(str(ctx.get('tag', '')).lstrip('~'))}", param)
    if typ == "union_tag_not_found":
        if isinstance(e.get("input"), dict):
            return f"'{param}' is required", param
        return f"'{param}' must be an object, got {got}", param
    if typ in ("model_attributes_type", "model_type", "dict_type"):
        return f"'{param}' must be an object, got {got}", param
    if typ in ("list_type",):
        return f"'{param}' must be a list, got {got}", param
    if typ in ("string_type",):
        return f"'{param}' must be a string, got {got}", param
    if typ in ("bool_type",):
        return f"'{param}' must be a boolean, got {got}", param
    if typ in ("float_type", "finite_number"):
        return f"'{param}' must be a finite number, got {got}", param
    if typ in ("too_long", "too_short") and ctx.get("field_type") == "List":
        lim = ctx.get("max_length") if typ == "too_long" else ctx.get("min_length")
        n = len(e["input"]) if isinstance(e.get("input"), list) else ctx.get("actual_length")
        if typ == "too_short" and lim == 1:
            return f"'{param}' must be a non-empty list", param
        return (f"'{param}' has {n} entries; at most {lim} are allowed" if typ == "too_long"
                else f"'{param}' has {n} entries; at least {lim} are needed"), param
    if typ in ("string_too_long", "string_too_short"):
        n = len(e["input"]) if isinstance(e.get("input"), str) else "?"
        if typ == "string_too_short" and ctx.get("min_length") == 1:
            return f"'{param}' must not be empty", param
        lim = ctx.get("max_length") if typ == "string_too_long" else ctx.get("min_length")
        return (f"'{param}' has {n} characters; at {'most' if typ == 'string_too_long' else 'least'} "
                f"{lim} are allowed"), param
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if typ in bounds:
        lim = next(iter(ctx.values()), None) if ctx else None
        if isinstance(lim, float) and lim.is_integer():
            lim = int(lim)
        return f"'{param}' must be {bounds[typ]} {lim}, got {got}", param
    if typ.startswith(("int_", "int")) and typ != "int_type":
        return f"'{param}' must be an integer, got {got}", param
    msg = str(e.get("msg", "invalid"))
    if typ == "int_type" or not typ or typ not in _PYDANTIC_TYPES:
        return f"'{param}' {msg}" + ("" if "got" in msg else f", got {got}"), param
    return f"'{param}' is invalid: {msg[:1].lower() + msg[1:]}, got {got}", param


# pydantic's own error types (anything else came from a PydanticCustomError written here)
_PYDANTIC_TYPES = {"missing", "extra_forbidden", "literal_error", "union_tag_invalid",
                   "union_tag_not_found", "model_attributes_type", "model_type", "dict_type",
                   "list_type", "string_type", "bool_type", "float_type", "finite_number",
                   "too_long", "too_short", "string_too_long", "string_too_short",
                   "greater_than_equal", "greater_than", "less_than_equal", "less_than",
                   "int_parsing", "int_from_float", "int_parsing_size", "value_error",
                   "assertion_error", "is_instance_of", "bytes_type", "none_required"}


__all__ = ["ChatCompletionRequest", "CompletionRequest", "MessagesRequest", "CountTokensRequest",
           "error_of", "ValidationError"]
