"""Tokenizer: the checkpoint's `tokenizer.json` (via the `tokenizers` library) plus its chat template.

* `Tokenizer.from_dir(path)` reads `tokenizer.json`, `tokenizer_config.json` (special tokens,
  chat template) and `chat_template.jinja` (which wins over the config's template, as in
  Hugging Face transformers).
* `apply_chat_template` renders with jinja2 the way transformers does: an
  `ImmutableSandboxedEnvironment` with `trim_blocks`/`lstrip_blocks`, the `loopcontrols`
  extension, `raise_exception`, `strftime_now`, a `tojson` filter with `ensure_ascii=False` and
  `indent` support, and the named special tokens (`bos_token`, `eos_token`, ...) as variables.
  Messages' `None` values are dropped first (as transformers does). Tool-call `arguments` given as
  a JSON string (the OpenAI wire format) are parsed into a dict unless the template itself tests
  `arguments is string` (Qwen3's template prints strings verbatim; Qwen3.5's iterates the mapping).
* `StreamDecoder` turns a token stream into text pieces that never split a UTF-8 character.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from datetime import datetime
from typing import Iterable, Sequence

from pyflashmoe.errors import ArgumentError, FormatError

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def _token_content(v):
    """tokenizer_config special tokens are strings or serialized AddedToken dicts."""
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    if isinstance(v, str):
        return v
    return None


def _bytes_to_unicode():
    """GPT-2's byte <-> printable-unicode table used by ByteLevel BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}

_env_cache: dict = {}


def _compile_template(source: str):
    tpl = _env_cache.get(source)
    if tpl is not None:
        return tpl
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _GenerationExt(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` (assistant-mask marker in some templates): render body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationExt, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        tpl = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise FormatError(f"chat template: jinja syntax error at line {e.lineno}: {e.message}") from e
    if len(_env_cache) > 16:
        _env_cache.clear()
    _env_cache[source] = tpl
    return tpl


class Tokenizer:
    """A Hugging Face `tokenizer.json` tokenizer with the checkpoint's special tokens and chat template."""

    def __init__(self, tokenizer_file: str | os.PathLike, config: dict | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer
        tokenizer_file = os.fspath(tokenizer_file)
        if not os.path.isfile(tokenizer_file):
            raise FormatError(f"{tokenizer_file}: tokenizer file not found")
        try:
            self._tok = _HFTokenizer.from_file(tokenizer_file)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise FormatError(f"{tokenizer_file}: cannot load tokenizer: {e}") from e
        self.path = tokenizer_file
        self.config = dict(config or {})
        self.special_tokens: dict[str, str] = {}
        for k in _NAMED_SPECIAL:
            c = _token_content(self.config.get(k))
            if c is not None:
                self.special_tokens[k] = c
        if chat_template is None:
            chat_template = self.config.get("chat_template")
        self._templates: dict[str, str] = {}
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}] (older HF configs)
            for item in chat_template:
                if isinstance(item, dict) and "name" in item and "template" in item:
                    self._templates[item["name"]] = item["template"]
            chat_template = self._templates.get("default")
        self.chat_template: str | None = chat_template
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.added_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._byte_table = None
        try:
            with open(tokenizer_file, "rb") as f:
                dec = json.loads(f.read()).get("decoder") or {}
            self._byte_level = dec.get("type") == "ByteLevel"
        except (OSError, ValueError):
            self._byte_level = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from a directory."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FormatError(f"{tj}: not found (a model dir needs the checkpoint's tokenizer.json)")
        config = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            try:
                with open(tc, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as e:
                raise FormatError(f"{tc}: invalid JSON: {e}") from e
            if not isinstance(config, dict):
                raise FormatError(f"{tc}: top level must be a JSON object")
        template = None
        cj = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(cj):
            with open(cj, encoding="utf-8") as f:
                template = f.read()
        else:
            cjs = os.path.join(path, "chat_template.json")  # processor-style file
            if os.path.isfile(cjs):
                try:
                    with open(cjs, encoding="utf-8") as f:
                        template = json.load(f).get("chat_template")
                except (ValueError, AttributeError) as e:
                    raise FormatError(f"{cjs}: invalid chat template file: {e}") from e
        return cls(tj, config, template)

    # ----------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        t = self.eos_token
        return None if t is None else self._tok.token_to_id(t)

    @property
    def bos_token_id(self) -> int | None:
        t = self.bos_token
        return None if t is None else self._tok.token_to_id(t)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added/special tokens written literally in the text are matched (as HF
        does). With add_special_tokens, the tokenizer's post-processor runs and a BOS is prepended
        when tokenizer_config says add_bos_token."""
        if not isinstance(text, str):
            raise ArgumentError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token:
            b = self.bos_token_id
            if b is not None and (not ids or ids[0] != b):
                ids = [b] + ids
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes one token stands for (ByteLevel tokenizers only, else None)."""
        if not self._byte_level:
            return None
        if self._byte_table is None:
            self._byte_table = {}
        b = self._byte_table.get(token_id)
        if b is None:
            tok = self._tok.id_to_token(int(token_id))
            if tok is None:
                raise ArgumentError(f"token id {token_id} is not in the vocabulary "
                                    f"(size {self.vocab_size})")
            if tok in self.added_tokens:
                b = tok.encode("utf-8")
            else:
                try:
                    b = bytes(_BYTE_DECODER[c] for c in tok)
                except KeyError:
                    b = tok.encode("utf-8")
            self._byte_table[token_id] = b
        return b

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- chat template
    def apply_chat_template(self, messages: Sequence[dict], tools: list | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                            tokenize: bool = False, chat_template: str | None = None,
                            documents: list | None = None, **kwargs) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template (transformers semantics).

        enable_thinking is passed to the template only when not None (templates test
        `enable_thinking is defined`). Extra kwargs become template variables. With tokenize=True
        the rendered text is encoded without adding special tokens (the template writes them)."""
        import jinja2
        template = chat_template
        if template is None:
            if tools and "tool_use" in self._templates:
                template = self._templates["tool_use"]
            else:
                template = self.chat_template
        if not template:
            raise FormatError("this tokenizer has no chat template (no chat_template.jinja and no "
                              "chat_template in tokenizer_config.json)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        parse_args = not re.search(r"arguments\s+is\s+string", template)
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ArgumentError(f"messages[{i}] must be a dict, got {type(m).__name__}")
            m = {k: v for k, v in m.items() if v is not None}
            if parse_args and isinstance(m.get("tool_calls"), list):
                calls = []
                for tc in m["tool_calls"]:
                    if isinstance(tc, dict):
                        tc = dict(tc)
                        fn = tc.get("function")
                        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                            fn = dict(fn)
                            try:
                                parsed = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                            except ValueError as e:
                                raise ArgumentError(
                                    f"messages[{i}].tool_calls: function.arguments is not valid JSON: {e}"
                                ) from e
                            fn["arguments"] = parsed
                            tc["function"] = fn
                    calls.append(tc)
                m["tool_calls"] = calls
            msgs.append(m)
        if tools is not None:
            for t in tools:
                if not isinstance(t, dict):
                    raise ArgumentError("tools must be a list of JSON-schema dicts")
        variables = dict(self.special_tokens)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        variables.update(kwargs)
        tpl = _compile_template(template)
        try:
            text = tpl.render(messages=msgs, tools=tools, documents=documents,
                              add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ArgumentError(f"chat template: {e}") from e
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


class StreamDecoder:
    """Incremental detokenizer: `add(token_id)` returns the newly completed text (possibly "").

    Never emits part of a UTF-8 character: bytes are held back until they form whole characters.
    `flush()` returns whatever is held back (invalid bytes become U+FFFD, as decode() does).
    For ByteLevel tokenizers this works on raw token bytes with an incremental UTF-8 decoder, so
    the concatenated pieces equal `decode(ids)`; other tokenizers use a re-decode window.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._bytes_mode = tokenizer._byte_level
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and self.tok.is_special(token_id):
            return ""
        if self._bytes_mode:
            out = self._utf8.decode(self.tok.token_bytes(token_id), final=False)
        else:
            self._ids.append(token_id)
            prev = self.tok.decode(self._ids[self._prefix:self._read])
            cur = self.tok.decode(self._ids[self._prefix:])
            if len(cur) > len(prev) and not cur.endswith("\ufffd") and cur.startswith(prev):
                out = cur[len(prev):]
                self._prefix = self._read
                self._read = len(self._ids)
            else:
                out = ""
        self.text += out
        return out

    def flush(self) -> str:
        if self._bytes_mode:
            out = self._utf8.decode(b"", final=True)
        else:
            prev = self.tok.decode(self._ids[self._prefix:self._read])
            cur = self.tok.decode(self._ids[self._prefix:])
            out = cur[len(prev):] if cur.startswith(prev) else ""
            self._prefix = self._read = len(self._ids)
        self.text += out
        return out
