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

    max_tokens: the generation's token budget. With it, JSON output is closed in time: once the
    shortest completion of the text so far (see json_close_suffix) needs all the tokens left
    (and the grammar accepts it), those tokens are forced, so a completion cut by the budget is
    still valid JSON whenever the schema allows the invented values (0, "")."""

    def __init__(self, lltok, grammar: str, n_vocab: int, max_tokens: int | None = None):
        llg = _llg()
        self.lltok = lltok
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ArgumentError(f"schema cannot be compiled: {self.matcher.get_error()}")
        self.n_vocab = int(n_vocab)
        self.eos = list(lltok.eos_tokens)
        self.consumed = 0
        self.max_tokens = max_tokens
        self.forced_close = 0  # tokens forced by the closing logic (for tests / stats)

    def _closing_token(self, generated) -> int | None:
        left = self.max_tokens - len(generated)  # tokens still to sample, this one included
        if left > 64:
            return None
        if self.matcher.is_accepting():
            # complete: once closing has begun, end here (EOS) rather than in more whitespace
            if self.forced_close:
                ok = [e for e in self.eos if 0 <= e < self.n_vocab]
                return ok[0] if ok else None
            return None
        text = self.lltok.decode_bytes(list(generated)).decode("utf-8", errors="replace")
        suffix = json_close_suffix(text)
        if not suffix:
            return None
        for toks in (self.lltok.tokenize_str(suffix),
                     [t for ch in suffix for t in self.lltok.tokenize_str(ch)]):
            if toks and self.matcher.validate_tokens(toks) == len(toks):
                # +1 for EOS, +3 of slack for steps where the closing does not apply yet
                # (e.g. in the middle of a multi-byte character)
                if len(toks) + 4 >= left:
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
