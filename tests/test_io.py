"""The C core's manifest JSON parser (csrc/fm_json.c) and expert reader (csrc/fm_io.c).

Both are internal (fm_internal.h), so they are reached through tiny `fm_test_*` entry points of the
built extension via ctypes. References nobody here wrote: Python's `json` module for the parser,
`np.memmap` slices of the same file for the reader.
"""
import ctypes
import json
import math
import os
import random

import numpy as np
import pytest

import pyflashmoe._core as _core

LIB = ctypes.CDLL(_core.__file__)

FM_OK, FM_ERR_ARG, FM_ERR_IO, FM_ERR_FORMAT = 0, -1, -2, -3


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
_rt = LIB.fm_test_json_roundtrip
_rt.restype = ctypes.c_int64
_rt.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                ctypes.c_size_t]


def c_roundtrip(text, n=None):
    """Parse with fm_json; return (re-serialized text, None) or (None, error message)."""
    data = text.encode() if isinstance(text, str) else text
    n = len(data) if n is None else n
    cap = 4 * len(data) + 4096
    out = ctypes.create_string_buffer(cap)
    err = ctypes.create_string_buffer(512)
    r = _rt(data, n, out, cap, err, 512)
    if r == -1:
        return None, err.value.decode()
    assert r >= 0, f"fm_test_json_roundtrip returned {r} (-3: fm_json_get disagrees with fm_json_at)"
    return out.raw[:r].decode("utf-8"), None


def _floats(x):
    """json.loads result with every number as float (fm_json stores doubles)."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return {k: _floats(v) for k, v in x.items()}


def _random_value(rng, depth=0):
    kinds = ["num", "int", "str", "bool", "null"] + (["arr", "obj"] if depth < 6 else [])
    k = rng.choice(kinds)
    if k == "num":
        return rng.choice([rng.uniform(-1e6, 1e6), rng.gauss(0, 1) * 10 ** rng.randint(-300, 300), 0.0, -0.0,
                           5e-324, 1.7976931348623157e308])
    if k == "int":
        return rng.randint(-2**53, 2**53)
    if k == "str":
        alphabet = "abc xyz\"\\/\b\f\n\r\t\x00\x01\x1f\x7fé€𝄞😀中文\u2028\ufffd"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "arr":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {f"k{rng.randint(0, 10**6)}{rng.choice(['', 'é', '😀', ' '])}": _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 20))}


@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_random_documents_match_python_json(ensure_ascii, indent):
    rng = random.Random(1234 + ensure_ascii * 2 + (indent or 0))
    for _ in range(200):
        doc = _random_value(rng)
        text = json.dumps(doc, ensure_ascii=ensure_ascii, indent=indent)
        out, err = c_roundtrip(text)
        assert err is None, (err, text)
        assert _floats(json.loads(out)) == _floats(json.loads(text)), text


def test_json_escapes_and_surrogate_pairs():
    text = r'["\u00e9\u20ac\ud834\udd1e\uD83D\uDE00", "\"\\\/\b\f\n\r\t", "\u0041\u0000z"]'
    out, err = c_roundtrip(text)
    assert err is None
    assert json.loads(out) == json.loads(text) == ["é€𝄞😀", "\"\\/\b\f\n\r\t", "A\x00z"]


def test_json_numbers_match_strtod_reference():
    nums = ["0", "-0", "1", "-1", "0.5", "1e10", "1E+2", "1e-2", "-12.75e-3", "123456789012345678901234567890",
            "2.2250738585072014e-308", "4.9e-324", "1.7976931348623157e308", "0." + "1" * 200, "1e-400"]
    out, err = c_roundtrip("[" + ",".join(nums) + "]")
    assert err is None
    assert json.loads(out) == [float(x) for x in nums]


def test_json_large_object_lookup_and_order():
    # > FM_JSON_INDEX_MIN keys: the sorted index path of fm_json_get (checked inside the hook)
    doc = {f"blk.{i}.attn_q": {"offset": i * 4096, "shape": [i, 2 * i]} for i in range(3000)}
    out, err = c_roundtrip(json.dumps(doc))
    assert err is None
    assert list(json.loads(out)) == list(doc)  # document order kept
    assert json.loads(out) == doc


def test_json_length_is_respected_without_nul():
    out, err = c_roundtrip(b'[1,2]garbage', 5)
    assert err is None and json.loads(out) == [1, 2]
    out, err = c_roundtrip(b'"abc"', 4)
    assert out is None and "unterminated string" in err


# Documents Python's json (strict=True) rejects must be rejected too.
PY_INVALID = ['', ' ', '[', ']', '{', '{"a"}', '{"a":}', '{"a":1,}', '[1,]', '[,1]', '01', '-', '1.', '.5', '1e',
              '1e+', '+1', 'tru', 'nul', 'True', '"\\x"', '"\\u12"', '"\\u12G4"', '"a\nb"', '"\t"', '[1 2]',
              '{"a" 1}', '{1:2}', "{'a':1}", '"abc', '[1]]', '1 2', '[1]x', '/*c*/1', '0x10', '--1', '-01']
# Documents Python accepts but a strict RFC 8259 parser must not (they cannot come from our writer).
STRICT_EXTRA = ['NaN', '-Infinity', 'Infinity', '[1e999]', '{"a":1,"a":2}', '"\\ud800"', '"\\udc00x"',
                '"\\ud800\\u0041"', '{"k0":0,"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k8":8,"k3":9}']


@pytest.mark.parametrize("text", PY_INVALID)
def test_json_rejects_what_python_rejects(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    out, err = c_roundtrip(text)
    assert out is None
    assert err.startswith("line ") and " col " in err, err


@pytest.mark.parametrize("text", STRICT_EXTRA)
def test_json_strict_extras(text):
    out, err = c_roundtrip(text)
    assert out is None, out
    assert err.startswith("line "), err


@pytest.mark.parametrize("raw", [b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"'])
def test_json_rejects_invalid_utf8(raw):
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    out, err = c_roundtrip(raw)
    assert out is None and "UTF-8" in err


@pytest.mark.parametrize("text", ['{"a": 1,\n "b": tru}', '[1,\n2,\n  3,\n    @]', '{"x": [1, 2,\n\n  }'])
def test_json_error_line_col_match_python(text):
    with pytest.raises(json.JSONDecodeError) as ei:
        json.loads(text)
    _, err = c_roundtrip(text)
    assert err.startswith(f"line {ei.value.lineno} col {ei.value.colno}:"), (err, ei.value)


def test_json_depth_limit():
    ok = "[" * 256 + "]" * 256
    assert c_roundtrip(ok)[1] is None
    out, err = c_roundtrip("[" * 257 + "]" * 257)
    assert out is None and "deep" in err
    out, err = c_roundtrip('{"a":' * 100000)  # no stack overflow
    assert out is None and "deep" in err


def test_json_bom_is_skipped():
    out, err = c_roundtrip(b'\xef\xbb\xbf {"a": [true, false, null]} ')
    assert err is None and json.loads(out) == {"a": [True, False, None]}
