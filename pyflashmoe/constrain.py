"""Constrained decoding: token masks from llguidance so the output is valid JSON (or matches a
JSON schema).

    from pyflashmoe.constrain import json_constraint
    c = json_constraint(model, schema={"type": "object", ...})   # schema=None: any JSON object
    text = model.generate_text(prompt, logits_processor=c)

Each step the processor consumes the tokens generated since its last call, asks llguidance for
the bitmask of allowed next tokens (computed from the model's tokenizer.json) and sets the logits
of every other token to -inf. Once the JSON value is complete only the model's EOS tokens are
allowed, so generation ends with finish_reason "stop". A completion cut by max_tokens can still be
an unfinished prefix (as with OpenAI's API: check finish_reason) unless the processor knows the
budget (max_tokens=): then it forces the shortest closing of the JSON text in time.

Whitespace between JSON tokens is allowed but bounded (at most 20 spaces, tabs or newlines per
gap), so a weak model cannot wander in whitespace forever.

Building the llguidance tokenizer costs about a second for a 150k vocabulary; it is cached per
(tokenizer file, vocabulary size, EOS ids).
"""
from __future__ import annotations

import json
import math
import os
import threading

import numpy as np

from pyflashmoe.errors import ArgumentError, BackendError, FlashMoEError

_WS = r"[\x20\x0A\x09]{0,20}"
_cache: dict = {}
_cache_lock = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - optional dependency
        raise BackendError("JSON-constrained output needs llguidance: pip install 'pyflashmoe[serve]'") from e
    return llguidance


def llg_tokenizer(tokenizer_file: str, n_vocab: int, eos_ids):
    """The (cached) llguidance tokenizer for a tokenizer.json."""
    llg = _llg()
    st = os.stat(tokenizer_file)
    eos = sorted(int(i) for i in eos_ids)
    key = (os.path.realpath(tokenizer_file), st.st_mtime_ns, st.st_size, int(n_vocab), tuple(eos))
    with _cache_lock:
        t = _cache.get(key)
        if t is None:
            with open(tokenizer_file, encoding="utf-8") as f:
                text = f.read()
            try:
                t = llg.LLTokenizer(text, n_vocab=int(n_vocab), eos_token=eos or None)
            except Exception as e:
                raise FlashMoEError(f"{tokenizer_file}: llguidance cannot use this tokenizer: {e}") from e
            if len(_cache) >= 4:
                _cache.clear()
            _cache[key] = t
    return t


def json_grammar(schema=None) -> str:
    """llguidance grammar text for a JSON schema (None: any JSON object). Raises ArgumentError
    (naming `schema`) when the schema is not usable."""
    llg = _llg()
    if schema is None:
        schema = {"type": "object"}
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ArgumentError(f"schema must be a JSON object (dict), got {type(schema).__name__}")
    try:
        from jsonschema import validators
        validators.validator_for(schema).check_schema(schema)
    except ImportError:
        pass
    except Exception as e:  # jsonschema.SchemaError
        raise ArgumentError(f"schema is not a valid JSON schema: {getattr(e, 'message', e)}") from e
    try:
        g = llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "whitespace_pattern": _WS})
    except (ValueError, TypeError) as e:
        raise ArgumentError(f"schema cannot be compiled: {e}") from e
    err = llg.LLMatcher.validate_grammar(g)
    if err:
        raise ArgumentError(f"schema cannot be compiled: {err}")
    return g


def json_close_suffix(text: str) -> str | None:
    """The shortest text that completes a JSON prefix into a valid JSON value (None when
    `text` is not a JSON prefix this scanner understands). Values it must invent are 0 and ""."""
    stack = []  # "{" / "["
    expect = "value"  # value | key | colon | comma | key_or_end | value_or_end
    in_str = esc = False
    uhex = -1  # hex digits still needed after \u
    is_key = False
    lit = ""  # a number or true/false/null in progress
    for ch in text:
        if in_str:
            if uhex > 0:
                uhex -= 1
            elif esc:
                esc = False
                if ch == "u":
                    uhex = 4
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                expect = "colon" if is_key else "comma"
            continue
        if lit:
            if ch.isalnum() or ch in "+-.":
                lit += ch
                continue
            lit = ""
            expect = "comma"
        if ch in " \t\n\r":
            continue
        if expect in ("value", "value_or_end"):
            if ch == "]" and expect == "value_or_end":
                stack.pop()
                expect = "comma"
            elif ch in "{[":
                stack.append(ch)
                expect = "key_or_end" if ch == "{" else "value_or_end"
            elif ch == '"':
                in_str, is_key = True, False
            elif ch.isalnum() or ch == "-":
                lit = ch
            else:
                return None
        elif expect in ("key", "key_or_end"):
            if ch == "}" and expect == "key_or_end":
                stack.pop()
                expect = "comma"
            elif ch == '"':
                in_str, is_key = True, True
            else:
                return None
        elif expect == "colon":
            if ch != ":":
                return None
            expect = "value"
        elif expect == "comma":
            if not stack:
                return None
            if ch == ",":
                expect = "key" if stack[-1] == "{" else "value"
            elif (ch == "}" and stack[-1] == "{") or (ch == "]" and stack[-1] == "["):
                stack.pop()
            else:
                return None
    out = ""
    if in_str:
        if uhex > 0:
            out += "0" * uhex
        elif esc:
            out += "n"
        out += '"'
        expect = "colon" if is_key else "comma"
    elif lit:
        for word in ("true", "false", "null"):
            if word.startswith(lit):
                out += word[len(lit):]
                break
        else:
            if lit[-1] in "-+.eE":
                out += "0"
        expect = "comma"
    if expect == "colon":
        out += ":0"
    elif expect == "key":
        out += '"":0'
    elif expect == "value":
        if not stack and not text.strip():
            return "{}"
        out += "0"
    for c in reversed(stack):
        out += "}" if c == "{" else "]"
    return out


class GrammarConstraint:
    """A logits processor for Model.generate(logits_processor=...): fn(generated_ids, logits).

    max_tokens: the generation's token budget. With it, the output is closed in time: once the
    shortest completion of the text so far (`closer(text)`, by default json_close_suffix) needs
    all the tokens left (and the grammar accepts it), those tokens are forced, so a completion
    cut by the budget still matches the grammar whenever the invented values (0, "") fit.
    close_window: how many tokens before the end the closing is checked."""

    def __init__(self, lltok, grammar: str, n_vocab: int, max_tokens: int | None = None,
                 closer=None, close_window: int = 64, close_slack: int = 4):
        llg = _llg()
        self.lltok = lltok
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ArgumentError(f"schema cannot be compiled: {self.matcher.get_error()}")
        self.n_vocab = int(n_vocab)
        self.eos = list(lltok.eos_tokens)
        self.consumed = 0
        self.max_tokens = max_tokens
        self.closer = closer or json_close_suffix
        self.close_window = int(close_window)
        self.close_slack = int(close_slack)
        self.forced_close = 0  # tokens forced by the closing logic (for tests / stats)

    def _closing_token(self, generated) -> int | None:
        left = self.max_tokens - len(generated)  # tokens still to sample, this one included
        if left > self.close_window:
            return None
        if self.matcher.is_accepting():
            # complete: once closing has begun, end here (EOS) rather than in more whitespace
            if self.forced_close:
                ok = [e for e in self.eos if 0 <= e < self.n_vocab]
                return ok[0] if ok else None
            return None
        text = self.lltok.decode_bytes(list(generated)).decode("utf-8", errors="replace")
        suffix = self.closer(text)
        if not suffix:
            return None
        for toks in (self.lltok.tokenize_str(suffix),
                     [t for ch in suffix for t in self.lltok.tokenize_str(ch)]):
            if toks and self.matcher.validate_tokens(toks) == len(toks):
                # close_slack: +1 for EOS, +3 for steps where the closing does not apply yet
                # (e.g. in the middle of a multi-byte character), plus what one free choice can
                # add to the shortest completion (a tool call's optional parameter)
                if len(toks) + self.close_slack >= left:
                    return toks[0]
                return None
        return None

    def _consume(self, generated):
        for t in generated[self.consumed:]:
            if not self.matcher.consume_token(int(t)):
                raise FlashMoEError(f"constrained decoding: token {t} rejected by the grammar: "
                                    f"{self.matcher.get_error()}")
        self.consumed = len(generated)

    def allowed(self) -> np.ndarray:
        """bool[n_vocab] of the tokens allowed next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.n_vocab].astype(bool)
        if mask.shape[0] < self.n_vocab:
            mask = np.concatenate([mask, np.zeros(self.n_vocab - mask.shape[0], bool)])
        return mask

    def __call__(self, generated, logits):
        self._consume(generated)
        if self.matcher.is_error():
            raise FlashMoEError(f"constrained decoding failed: {self.matcher.get_error()}")
        mask = self.allowed()
        if self.max_tokens is not None:
            forced = self._closing_token(generated)
            if forced is not None and mask[forced]:
                mask[:] = False
                mask[forced] = True
                self.forced_close += 1
        if not mask.any():
            mask[[e for e in self.eos if 0 <= e < self.n_vocab]] = True
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~mask] = -np.inf
        return out

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


def json_constraint(model, schema=None, max_tokens: int | None = None) -> GrammarConstraint:
    """A processor that keeps `model`'s output valid JSON (matching `schema` when given); pass
    the generation's max_tokens so the JSON is closed before the budget runs out."""
    grammar = json_grammar(schema)
    return grammar_constraint(model, grammar, max_tokens)


def grammar_constraint(model, grammar: str, max_tokens: int | None = None) -> GrammarConstraint:
    tok = getattr(model, "tokenizer", None)
    if tok is None or not getattr(tok, "path", None):
        raise ArgumentError("constrained output needs the model's tokenizer.json")
    if not model.eos_token_ids:
        raise ArgumentError("constrained output needs an EOS token (none in generation_config.json, "
                            "the manifest or tokenizer_config.json)")
    lltok = llg_tokenizer(tok.path, model.n_vocab, model.eos_token_ids)
    return GrammarConstraint(lltok, grammar, model.n_vocab, max_tokens)


# ---------------------------------------------------------------------------- tool calls
# Qwen3.5 / Qwen3-Coder XML tool calls, as the chat template writes them and
# pyflashmoe.toolcalls parses them:
#   <tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n...</function>\n</tool_call>
# Parameters come in the schema's `properties` order; every required one is present, optional
# ones may be left out, no other names. A VALUE is what the parser turns into the argument:
# raw text for a parameter declared only as a string (no "<" in it, so no tag can appear inside),
# True/False/true/false for a boolean, else JSON matching the parameter's schema (strings in it
# without "<" unless the schema gives a pattern).
_TOOL_THINK_CHARS = 2000
_NAME_BAD = set("<>\n")


def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


_RX_META = set("\\.+*?()|[]{}^$#&-~")


def _rx_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in _RX_META:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "/":
            out.append("\\/")
        else:
            out.append(ch)
    return "".join(out)


def _lark_rx(rx: str) -> str:
    """A /.../ literal for a Rust regex (slashes escaped)."""
    return "/" + rx.replace("/", "\\/") + "/"


def _no_angle(schema):
    """A copy of a JSON schema whose unconstrained strings exclude "<" (so a JSON argument
    cannot contain a closing tag of the tool-call markup)."""
    if isinstance(schema, list):
        return [_no_angle(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "$defs", "definitions", "patternProperties") and isinstance(v, dict):
            out[k] = {kk: _no_angle(vv) for kk, vv in v.items()}
        elif k in ("items", "additionalProperties", "not", "contains", "if", "then", "else",
                   "anyOf", "oneOf", "allOf", "prefixItems"):
            out[k] = _no_angle(v)
        else:
            out[k] = v
    t = out.get("type")
    types = t if isinstance(t, list) else [t]
    if "string" in types and not any(k in out for k in ("pattern", "enum", "const", "format")):
        out["pattern"] = "^[^<]*$"
    return out


def _min_json(s, depth=0):
    """A short JSON text valid for schema s (None when this simple search finds none)."""
    if depth > 8:
        return None
    if s is True or s == {}:
        return "0"
    if not isinstance(s, dict):
        return None
    if "const" in s:
        return json.dumps(s["const"], ensure_ascii=False)
    if isinstance(s.get("enum"), list) and s["enum"]:
        return min((json.dumps(v, ensure_ascii=False) for v in s["enum"]), key=len)
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list):
            for sub in s[key]:
                got = _min_json(sub, depth + 1)
                if got is not None:
                    return got
            return None
    t = s.get("type")
    types = t if isinstance(t, list) else ([t] if t else ["integer"])
    for ty in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if ty not in types:
            continue
        if ty == "null":
            return "null"
        if ty == "boolean":
            return "true"
        if ty in ("integer", "number"):
            v = 0
            lo, hi = s.get("minimum"), s.get("maximum")
            if isinstance(s.get("exclusiveMinimum"), (int, float)):
                lo = s["exclusiveMinimum"] + 1
            if isinstance(s.get("exclusiveMaximum"), (int, float)):
                hi = s["exclusiveMaximum"] - 1
            if isinstance(lo, (int, float)) and v < lo:
                v = math.ceil(lo)
            if isinstance(hi, (int, float)) and v > hi:
                v = math.floor(hi)
            return str(int(v))
        if ty == "string":
            if "pattern" in s and s["pattern"] != "^[^<]*$":
                ex = _examples(s)
                return json.dumps(ex[0], ensure_ascii=False) if ex else None
            return json.dumps("a" * int(s.get("minLength", 0) or 0))
        if ty == "array":
            n = int(s.get("minItems", 0) or 0)
            if n == 0:
                return "[]"
            item = _min_json(s.get("items", {}), depth + 1)
            return None if item is None else "[" + ",".join([item] * n) + "]"
        if ty == "object":
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            parts = []
            for k in s.get("required") or []:
                v = _min_json(props.get(k, {}), depth + 1)
                if v is None:
                    return None
                parts.append(json.dumps(k, ensure_ascii=False) + ":" + v)
            return "{" + ",".join(parts) + "}"
    return None


def _examples(s: dict) -> list:
    """Strings a closing may use for a string schema with a pattern: its `examples` /
    `default`, and one built from the pattern; shortest first."""
    ex = list(s.get("examples") or []) if isinstance(s.get("examples"), list) else []
    if "default" in s:
        ex.append(s["default"])
    if isinstance(s.get("pattern"), str):
        ex.append(_regex_example(s["pattern"]))
    return sorted((e for e in ex if isinstance(e, str) and "<" not in e), key=len)


def _regex_example(pattern: str) -> str | None:
    """A short string that re.search(pattern, s) accepts, built from the pattern's parse tree
    (literals, classes, \\d \\w \\s, groups, alternation, repeats), or None."""
    import re
    try:
        from re import _parser as sp  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse as sp
    try:
        tree = sp.parse(pattern)
    except Exception:
        return None
    cat_char = {"CATEGORY_DIGIT": "0", "CATEGORY_WORD": "a", "CATEGORY_SPACE": " ",
                "CATEGORY_NOT_DIGIT": "a", "CATEGORY_NOT_WORD": "-", "CATEGORY_NOT_SPACE": "a"}

    def gen(items):
        out = []
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(av))
            elif name == "NOT_LITERAL":
                out.append("a" if chr(av) != "a" else "b")
            elif name == "ANY":
                out.append("a")
            elif name == "IN":
                ch = None
                neg = any(str(o) == "NEGATE" for o, _ in av)
                if neg:
                    bad = set()
                    for o, v in av:
                        if str(o) == "LITERAL":
                            bad.add(chr(v))
                        elif str(o) == "RANGE":
                            bad.update(chr(c) for c in range(v[0], min(v[1], v[0] + 200) + 1))
                    ch = next((c for c in "aA0 -_." if c not in bad), None)
                else:
                    o, v = av[0]
                    o = str(o)
                    if o == "LITERAL":
                        ch = chr(v)
                    elif o == "RANGE":
                        ch = chr(v[0])
                    elif o == "CATEGORY":
                        ch = cat_char.get(str(v))
                if ch is None or ch == "<":
                    return None
                out.append(ch)
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, _hi, sub = av
                piece = gen(sub)
                if piece is None:
                    return None
                out.append(piece * lo)
            elif name == "SUBPATTERN":
                piece = gen(av[-1])
                if piece is None:
                    return None
                out.append(piece)
            elif name == "BRANCH":
                opts = [gen(b) for b in av[1]]
                opts = [o for o in opts if o is not None]
                if not opts:
                    return None
                out.append(min(opts, key=len))
            elif name == "AT":
                continue
            elif name == "CATEGORY":
                ch = cat_char.get(str(av))
                if ch is None:
                    return None
                out.append(ch)
            else:
                return None
        return "".join(out)

    ex = gen(tree)
    if ex is None or "<" in ex:
        return None
    try:
        return ex if re.search(pattern, ex) else None
    except re.error:
        return None


def _schema_strings(s, depth=0) -> set:
    """Every string a schema names as a value: enum / const / examples / default entries, and an
    example of each pattern."""
    out = set()
    if depth > 8:
        return out
    if isinstance(s, list):
        for x in s:
            out |= _schema_strings(x, depth + 1)
        return out
    if not isinstance(s, dict):
        return out
    for k in ("enum", "examples"):
        if isinstance(s.get(k), list):
            out.update(v for v in s[k] if isinstance(v, str))
    for k in ("const", "default"):
        if isinstance(s.get(k), str):
            out.add(s[k])
    if isinstance(s.get("pattern"), str) and s["pattern"] != "^[^<]*$":
        ex = _regex_example(s["pattern"])
        if ex is not None:
            out.add(ex)
    for k, v in s.items():
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            for vv in v.values():
                out |= _schema_strings(vv, depth + 1)
        elif k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            out |= _schema_strings(v, depth + 1)
    return out


def _valid(value_text: str, schema) -> bool:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema ships with the serve/test extras
        return True
    try:
        jsonschema.validate(json.loads(value_text), schema)
        return True
    except Exception:
        return False


class _Param:
    def __init__(self, name, schema, required, defs):
        from pyflashmoe.toolcalls import declared_string
        self.name = name
        self.required = required
        self.schema = schema if isinstance(schema, (dict, bool)) else {}
        declared = self.schema.get("type") if isinstance(self.schema, dict) else None
        self.enum = None
        self.min_len = 0
        if declared_string(declared):
            self.kind = "raw"
            sch = self.schema
            opts = sch.get("enum") if isinstance(sch.get("enum"), list) else (
                [sch["const"]] if "const" in sch else None)
            if opts is not None:
                self.enum = [o for o in opts if isinstance(o, str) and "<" not in o]
                if not self.enum:
                    raise ArgumentError(f"tools: parameter {name!r}: no string in its enum/const "
                                        "can be written as a tool-call value")
                self.body = "(?:" + "|".join(_rx_escape(o) for o in self.enum) + ")"
                self.pattern = None
            else:
                lo = int(sch.get("minLength", 0) or 0)
                hi = sch.get("maxLength")
                self.min_len = lo
                self.body = "[^<]{%d,%s}" % (lo, "" if hi is None else int(hi))
                self.pattern = sch.get("pattern") if isinstance(sch.get("pattern"), str) else None
        elif declared == "boolean":
            self.kind = "bool"
        else:
            self.kind = "json"
            sub = _no_angle(self.schema if isinstance(self.schema, dict) else {})
            if isinstance(sub, dict) and defs:
                sub = dict(sub)
                for k, v in defs.items():
                    sub.setdefault(k, v)
            self.json_schema = sub
            # bounded whitespace between JSON tokens (as json_grammar), so a weak model cannot
            # wander in whitespace
            self.lark_schema = dict(sub) if isinstance(sub, dict) else {}
            self.lark_schema["x-guidance"] = {"whitespace_flexible": False, "whitespace_pattern": _WS}

    def value_rule(self, rname: str) -> list[str]:
        """Lark lines defining rule `rname` = the framed value ("\\n" VALUE "\\n")."""
        term = rname.upper()
        if self.kind == "raw":
            if self.pattern is not None:
                p = self.pattern
                start = p.startswith("^")
                end = p.endswith("$") and not p.endswith("\\$")
                core = p[1 if start else 0:len(p) - (1 if end else 0)]
                rx = ("" if start else "(?s:.*)") + "(?:" + core + ")" + ("" if end else "(?s:.*)")
                body = f"({_lark_rx(self.body)} & {_lark_rx(rx)})"
            else:
                body = _lark_rx(self.body)
            return [f"{rname}: {term}", f"{term}: /\\n/ {body} /\\n/"]
        if self.kind == "bool":
            return [f"{rname}: {term}", f"{term}: /\\n(?:true|false|True|False)\\n/"]
        return [f"{rname}: \"\\n\" %json {json.dumps(self.lark_schema, ensure_ascii=False)} \"\\n\""]

    def min_value(self) -> str | None:
        """The shortest framed value text ("\\n...\\n") this parameter accepts, or None."""
        if self.kind == "raw":
            if self.enum:
                return "\n" + min(self.enum, key=len) + "\n"
            if self.pattern is not None:
                for e in _examples(self.schema):
                    if _valid(json.dumps(e), self.schema):
                        return "\n" + e + "\n"
                return None
            return "\n" + "a" * self.min_len + "\n"
        if self.kind == "bool":
            return "\nTrue\n"
        v = _min_json(self.json_schema)
        if v is None or not _valid(v, self.json_schema):
            return None
        return "\n" + v + "\n"

    def close_value(self, vtext: str) -> str | None:
        """What completes the framed value text `vtext` (a prefix of "\\n" VALUE "\\n")."""
        if vtext == "":
            return self.min_value()
        if not vtext.startswith("\n"):
            return None
        inner = vtext[1:]
        if self.kind == "raw":
            if self.enum:
                for o in sorted(self.enum, key=len):
                    if (o + "\n").startswith(inner):
                        return (o + "\n")[len(inner):]
                    if o.startswith(inner):
                        return o[len(inner):] + "\n"
                return None
            if self.pattern is not None:
                import re
                body = inner[:-1] if inner.endswith("\n") else inner
                cands = [""] if inner.endswith("\n") else []
                for e in _examples(self.schema):
                    cands += [e[i:] + "\n" for i in range(len(e), -1, -1)]
                for c in cands:
                    v = (inner + c)[:-1] if c else body
                    if (not c or "\n" not in c[:-1]) and re.search(self.pattern, v) \
                            and len(v) >= self.min_len:
                        return c
                return None
            if inner.endswith("\n") and len(inner) - 1 >= self.min_len:
                return ""
            return "a" * max(0, self.min_len - len(inner)) + "\n"
        if self.kind == "bool":
            for w in ("True", "False", "true", "false"):
                if (w + "\n").startswith(inner):
                    return (w + "\n")[len(inner):]
            return None
        if inner.endswith("\n"):
            try:
                json.loads(inner)
                return ""
            except ValueError:
                pass
        # the generic JSON closing (invents 0 and ""), else the rest of the shortest valid value
        # when the text is a prefix of it; the first one the schema accepts
        first = json_close_suffix(inner)
        cands = [first]
        mj = _min_json(self.json_schema)
        if mj is not None and mj.startswith(inner):
            cands.append(mj[len(inner):])
        if first and first.startswith('"') and "\\" not in inner[inner.rfind('"'):]:
            # inside a string: finish it as one of the schema's enum / const / example strings
            part = inner[inner.rfind('"') + 1:]
            for e in sorted(_schema_strings(self.json_schema), key=len):
                if e.startswith(part):
                    tail = json.dumps(e, ensure_ascii=False)[1:][len(json.dumps(part)[1:-1]):]
                    rest = json_close_suffix(inner + tail)
                    if rest is not None:
                        cands.append(tail + rest)
        if first and first.startswith("0"):
            # a value is due: one of the schema's strings
            for e in sorted(_schema_strings(self.json_schema), key=len):
                v = json.dumps(e, ensure_ascii=False)
                rest = json_close_suffix(inner + v)
                if rest is not None:
                    cands.append(v + rest)
        for c in cands:
            if c is not None and _valid(inner + c, self.json_schema):
                return c + "\n"
        return None


class _Function:
    def __init__(self, tool):
        fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) \
            else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ArgumentError("tools: each tool needs function.name (a non-empty string)")
        self.name = fn["name"]
        if _NAME_BAD & set(self.name):
            raise ArgumentError(f"tools: function name {self.name!r} cannot be written in a tool "
                                "call (it has '<', '>' or a newline)")
        params = fn.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ArgumentError(f"tools: {self.name}.parameters must be a JSON schema object")
        self.schema = params
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        req = params.get("required") if isinstance(params.get("required"), list) else []
        missing = [r for r in req if r not in props]
        if missing:
            raise ArgumentError(f"tools: {self.name}.parameters requires {missing[0]!r}, which "
                                "is not in its properties")
        defs = {k: params[k] for k in ("$defs", "definitions") if isinstance(params.get(k), dict)}
        self.params = []
        for pname, psch in props.items():
            if _NAME_BAD & set(pname) or not pname:
                raise ArgumentError(f"tools: {self.name}: parameter name {pname!r} cannot be "
                                    "written in a tool call")
            self.params.append(_Param(pname, psch, pname in req, defs))

    def min_params(self, start: int) -> str | None:
        out = []
        for p in self.params[start:]:
            if p.required:
                v = p.min_value()
                if v is None:
                    return None
                out.append(f"<parameter={p.name}>{v}</parameter>\n")
        return "".join(out)


_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
_THINK_CLOSE = "</think>"


class ToolCallGrammar:
    """The grammar (llguidance Lark) of "one or more tool calls to these tools, with arguments
    that match each function's JSON schema", in the Qwen3.5 XML format, plus the shortest
    completion of a partial call (closer) for a token budget.

    tools: OpenAI `tools` ([{"type": "function", "function": {"name", "parameters"}}]).
    name: only this function (tool_choice naming one). reasoning: the prompt ended inside an
    open <think> block: free reasoning text (no "<", at most 2,000 characters) and </think>
    come first. parallel: allow several calls (one per <tool_call> block), else exactly one.
    special: token texts that are single added tokens of the tokenizer (llguidance matches those
    only as special tokens: <tool_call>, </tool_call>, </think>)."""

    def __init__(self, tools, name: str | None = None, reasoning: bool = False,
                 parallel: bool = False, special=()):
        if not isinstance(tools, (list, tuple)) or not tools:
            raise ArgumentError("tools must be a non-empty list of function tools")
        fns = [_Function(t) for t in tools]
        if name is not None:
            fns = [f for f in fns if f.name == name]
            if not fns:
                raise ArgumentError(f"tool_choice names function {name!r}, which is not in tools")
        seen = set()
        for f in fns:
            if f.name in seen:
                raise ArgumentError(f"tools: function {f.name!r} is listed twice")
            seen.add(f.name)
        self.fns = fns
        self.reasoning = bool(reasoning)
        self.parallel = bool(parallel)
        self.special = set(special)

    def _tok(self, text):
        return text if text in self.special else _lark_str(text)

    def grammar(self) -> str:
        lines = ["%llguidance {}"]
        head = "think " if self.reasoning else ""
        lines.append(f"start: {head}call" + (' ("\\n" call)*' if self.parallel else ""))
        if self.reasoning:
            lines.append(f"think: THINK {self._tok(_THINK_CLOSE)} SEP")
            lines.append(f"THINK: /[^<]{{0,{_TOOL_THINK_CHARS}}}/")
            lines.append("SEP: /\\n{0,2}/")
        lines.append(f"call: {self._tok(_CALL_OPEN)} \"\\n\" ("
                     + " | ".join(f"f{i}" for i in range(len(self.fns)))
                     + f") \"\\n\" {self._tok(_CALL_CLOSE)}")
        for i, f in enumerate(self.fns):
            parts = [_lark_str(f"<function={f.name}>\n")]
            for j, p in enumerate(f.params):
                parts.append(f"p{i}_{j}" + ("" if p.required else "?"))
                lines.append(f"p{i}_{j}: {_lark_str(f'<parameter={p.name}>')} v{i}_{j} "
                             f"{_lark_str('</parameter>' + chr(10))}")
                lines.extend(p.value_rule(f"v{i}_{j}"))
            parts.append(_lark_str("</function>"))
            lines.append(f"f{i}: " + " ".join(parts))
        return "\n".join(lines) + "\n"

    # ----- the shortest completion of a partial output (for the token budget)
    def _min_call(self) -> str | None:
        best = None
        for f in self.fns:
            body = f.min_params(0)
            if body is None:
                continue
            c = f"{_CALL_OPEN}\n<function={f.name}>\n{body}</function>\n{_CALL_CLOSE}"
            if best is None or len(c) < len(best):
                best = c
        return best

    def min_call_chars(self) -> int:
        c = self._min_call()
        return len(c) if c else 0

    def close(self, text: str) -> str | None:
        """The shortest text that completes `text` (generated so far) into a full output, or
        None when this does not know one."""
        rest = text
        if self.reasoning:
            j = rest.find(_THINK_CLOSE)
            if j < 0:
                k = rest.rfind("<")
                if k >= 0:
                    if not _THINK_CLOSE.startswith(rest[k:]):
                        return None
                    pre = _THINK_CLOSE[len(rest) - k:]
                else:
                    pre = _THINK_CLOSE
                mc = self._min_call()
                return None if mc is None else pre + mc
            rest = rest[j + len(_THINK_CLOSE):]
            n = 0
            while n < 2 and rest[n:n + 1] == "\n":
                n += 1
            rest = rest[n:]
        while True:
            got = self._close_call(rest)
            if got is None:
                return None
            suffix, used = got
            if suffix or used == len(rest):
                return suffix
            # a complete call followed by more text: the next call (parallel)
            rest = rest[used:]
            if not rest.startswith("\n"):
                return None
            rest = rest[1:]

    def _close_call(self, rest: str):
        """(suffix, chars used): the completion of the call that `rest` starts with; suffix ""
        when that call is complete (then `used` is its length)."""
        lit = f"{_CALL_OPEN}\n<function="
        if len(rest) <= len(lit):
            if not lit.startswith(rest):
                return None
            mc = self._min_call()
            return None if mc is None else (mc[len(rest):], len(rest))
        if not rest.startswith(lit):
            return None
        p = len(lit)
        k = rest.find(">", p)
        end_lit = f"</function>\n{_CALL_CLOSE}"
        if k < 0:
            part = rest[p:]
            best = None
            for f in self.fns:
                if f.name.startswith(part):
                    body = f.min_params(0)
                    if body is None:
                        continue
                    c = f.name[len(part):] + ">\n" + body + end_lit
                    if best is None or len(c) < len(best):
                        best = c
            return None if best is None else (best, len(rest))
        f = next((x for x in self.fns if x.name == rest[p:k]), None)
        if f is None:
            return None
        p = k + 1
        if p == len(rest):
            body = f.min_params(0)
            return None if body is None else ("\n" + body + end_lit, len(rest))
        if rest[p] != "\n":
            return None
        p += 1
        nxt = 0  # the first parameter that may come next
        popen = "<parameter="
        while True:
            seg = rest[p:]
            if seg.startswith(popen):
                q = p + len(popen)
                k = rest.find(">", q)
                allowed = []
                for idx in range(nxt, len(f.params)):
                    allowed.append(idx)
                    if f.params[idx].required:
                        break
                if k < 0:
                    part = rest[q:]
                    best = None
                    for idx in allowed:
                        prm = f.params[idx]
                        if not prm.name.startswith(part):
                            continue
                        v, body = prm.min_value(), f.min_params(idx + 1)
                        if v is None or body is None:
                            continue
                        c = prm.name[len(part):] + ">" + v + "</parameter>\n" + body + end_lit
                        if best is None or len(c) < len(best):
                            best = c
                    return None if best is None else (best, len(rest))
                idx = next((i for i in allowed if f.params[i].name == rest[q:k]), None)
                if idx is None:
                    return None
                prm = f.params[idx]
                p = k + 1
                e = rest.find("</parameter>", p)
                if e < 0:
                    tail = rest[p:]
                    # the value may be done and "</parameter>" partly written
                    lt = tail.rfind("<")
                    partial_close = ""
                    if lt >= 0:
                        if not "</parameter>".startswith(tail[lt:]):
                            return None
                        partial_close, tail = tail[lt:], tail[:lt]
                        cv = "" if prm.close_value(tail) == "" else None
                        if cv is None:
                            return None
                        vs = ""
                    else:
                        vs = prm.close_value(tail)
                        if vs is None:
                            return None
                    body = f.min_params(idx + 1)
                    if body is None:
                        return None
                    return (vs + "</parameter>\n"[len(partial_close):] + body + end_lit, len(rest))
                p = e + len("</parameter>")
                if p == len(rest):
                    body = f.min_params(idx + 1)
                    return None if body is None else ("\n" + body + end_lit, len(rest))
                if rest[p] != "\n":
                    return None
                p += 1
                nxt = idx + 1
                continue
            if seg.startswith(end_lit):
                return ("", p + len(end_lit))
            opts = []
            if end_lit.startswith(seg) and all(not x.required for x in f.params[nxt:]):
                opts.append(end_lit[len(seg):])
            if popen.startswith(seg) and nxt < len(f.params):
                for idx in range(nxt, len(f.params)):
                    prm = f.params[idx]
                    v, body = prm.min_value(), f.min_params(idx + 1)
                    if v is not None and body is not None:
                        opts.append(popen[len(seg):] + prm.name + ">" + v + "</parameter>\n"
                                    + body + end_lit)
                    if prm.required:
                        break
            if not opts:
                return None
            return (min(opts, key=len), len(rest))


def tool_call_constraint(model, tools, name: str | None = None, reasoning: bool = False,
                         parallel: bool = False, max_tokens: int | None = None) -> GrammarConstraint:
    """A processor that makes `model` answer with a tool call (Qwen3.5 XML format) to one of
    `tools` (only `name` when given) whose arguments match that function's JSON schema: what
    OpenAI's tool_choice "required" / a named function promise. reasoning: the prompt ended in
    an open <think> block (toolcalls.prompt_opens_thinking). Pass the generation's max_tokens so
    the call is closed before the budget runs out."""
    tok = getattr(model, "tokenizer", None)
    added = getattr(tok, "added_tokens", None) or {}
    special = [t for t in (_CALL_OPEN, _CALL_CLOSE, _THINK_CLOSE) if t in added]
    tg = ToolCallGrammar(tools, name=name, reasoning=reasoning, parallel=parallel, special=special)
    grammar = tg.grammar()
    err = _llg().LLMatcher.validate_grammar(grammar)
    if err:
        raise ArgumentError(f"tools: the tool-call grammar cannot be compiled: {err}")
    c = grammar_constraint(model, grammar, max_tokens)
    c.closer = tg.close
    # slack: an optional parameter the model may still open (or, with parallel calls, another
    # call) lengthens the shortest completion by its own shortest form
    grow = [len(c.lltok.tokenize_str(f"<parameter={p.name}>{p.min_value() or ''}</parameter>\n"))
            for f in tg.fns for p in f.params if not p.required]
    mc = tg._min_call()
    n_mc = len(c.lltok.tokenize_str(mc)) if mc else 0
    if parallel:
        grow.append(n_mc + 1)
    c.close_slack = 4 + max(grow, default=0)
    c.close_window = max(64, n_mc + c.close_slack + 16)
    c.tool_grammar = tg
    return c
