"""The C core's manifest JSON parser (csrc/fm_json.c) and expert reader (csrc/fm_io.c).

Both are internal (fm_internal.h), so they are reached through tiny `fm_test_*` entry points of the
built extension via ctypes. References nobody here wrote: Python's `json` module for the parser,
`np.memmap` slices of the same file for the reader.
"""
import ctypes
import json
import math
import os
import pathlib
import random

import numpy as np
import pytest

import pyflashmoe._core as _core

LIB = ctypes.CDLL(_core.__file__)

FM_OK, FM_ERR_ARG, FM_ERR_IO, FM_ERR_FORMAT, FM_ERR_OOM = 0, -1, -2, -3, -4


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


# ---------------------------------------------------------------------------------------------
# expert reader
# ---------------------------------------------------------------------------------------------
class ExpertFile(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char_p), ("data_offset", ctypes.c_uint64), ("block_bytes", ctypes.c_uint64),
                ("n_experts", ctypes.c_int32)]


class IoStats(ctypes.Structure):
    _fields_ = [("bytes_read", ctypes.c_int64), ("loads", ctypes.c_int64), ("hits", ctypes.c_int64),
                ("ms_wait", ctypes.c_double)]


LIB.fm_io_open.restype = ctypes.c_int
LIB.fm_io_open.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ExpertFile), ctypes.c_int32, ctypes.c_int32,
                           ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
LIB.fm_io_close.restype = None
LIB.fm_io_close.argtypes = [ctypes.c_void_p]
LIB.fm_io_submit.restype = ctypes.c_int
LIB.fm_io_submit.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32,
                             ctypes.c_char_p, ctypes.c_size_t]
LIB.fm_io_wait.restype = ctypes.c_int
LIB.fm_io_wait.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(IoStats), ctypes.c_char_p,
                           ctypes.c_size_t]
LIB.fm_io_direct_active.restype = ctypes.c_int32
LIB.fm_io_direct_active.argtypes = [ctypes.c_void_p]
LIB.fm_io_probe.restype = ctypes.c_int
LIB.fm_io_probe.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                            ctypes.POINTER(ctypes.c_double), ctypes.c_char_p, ctypes.c_size_t]


class FmError(Exception):
    def __init__(self, status, msg):
        super().__init__(f"status {status}: {msg}")
        self.status, self.msg = status, msg


def write_expert_file(path, n_experts, block_bytes, seed=0):
    """An experts/L*.safetensors file as docs/INTERNALS.md describes it: one U8 tensor "experts"
    [n_experts, block_bytes], JSON header padded with spaces so the data starts at a multiple of
    4096. Returns (data_offset, data)."""
    data = np.random.default_rng(seed).integers(0, 256, size=(n_experts, block_bytes), dtype=np.uint8)
    header = json.dumps({"experts": {"dtype": "U8", "shape": [n_experts, block_bytes],
                                     "data_offsets": [0, n_experts * block_bytes]}}).encode()
    pad = (-(8 + len(header))) % 4096
    header += b" " * pad
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(data.tobytes())
    return 8 + len(header), data


class Reader:
    """ctypes driver of fm_io_open / fm_io_submit / fm_io_wait."""

    def __init__(self, layers, io_threads=0, direct_io=0, ram_budget=0, max_batch=8):
        # layers: list of (path or None, data_offset, block_bytes, n_experts)
        self.layers = layers
        self.files = (ExpertFile * len(layers))(*[
            ExpertFile(None if p is None else str(p).encode(), off, bb, n) for p, off, bb, n in layers])
        self.h = ctypes.c_void_p()
        err = ctypes.create_string_buffer(1024)
        st = LIB.fm_io_open(ctypes.byref(self.h), self.files, len(layers), io_threads, direct_io, ram_budget,
                            max_batch, err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())
        self.max_batch = max_batch

    def read(self, il, experts):
        """Submit + wait; returns (list of block copies, IoStats)."""
        ex = (ctypes.c_int32 * max(1, len(experts)))(*experts)
        err = ctypes.create_string_buffer(1024)
        st = LIB.fm_io_submit(self.h, il, ex, len(experts), err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())
        blocks = (ctypes.c_void_p * max(1, len(experts)))()
        stats = IoStats()
        st = LIB.fm_io_wait(self.h, blocks, ctypes.byref(stats), err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())
        bb = self.layers[il][2]
        return [np.frombuffer(ctypes.string_at(blocks[i], bb), np.uint8) for i in range(len(experts))], stats

    def pointers(self, il, experts):
        ex = (ctypes.c_int32 * len(experts))(*experts)
        err = ctypes.create_string_buffer(1024)
        assert LIB.fm_io_submit(self.h, il, ex, len(experts), err, 1024) == FM_OK, err.value
        blocks = (ctypes.c_void_p * len(experts))()
        assert LIB.fm_io_wait(self.h, blocks, None, err, 1024) == FM_OK, err.value
        return list(blocks)

    def close(self):
        if self.h:
            LIB.fm_io_close(self.h)
            self.h = ctypes.c_void_p()


@pytest.fixture
def expert_file(tmp_path):
    path = tmp_path / "L000.safetensors"
    off, _ = write_expert_file(path, n_experts=16, block_bytes=3 * 4096, seed=1)
    return path, off, 3 * 4096, 16


def test_expert_file_layout_is_valid_safetensors(expert_file):
    from safetensors.numpy import load_file
    path, off, bb, n = expert_file
    assert off % 4096 == 0
    t = load_file(str(path))["experts"]
    assert t.shape == (n, bb) and t.dtype == np.uint8
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    assert np.array_equal(t, mm)


@pytest.mark.parametrize("io_threads", [1, 3, 0])
def test_reads_match_memmap(expert_file, io_threads):
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    r = Reader([(path, off, bb, n)], io_threads=io_threads, max_batch=8)
    try:
        rng = random.Random(io_threads)
        for _ in range(40):
            ex = [rng.randrange(n) for _ in range(rng.randint(1, 8))]
            blocks, st = r.read(0, ex)
            for e, b in zip(ex, blocks):
                assert np.array_equal(b, mm[e]), e
            assert st.loads == len(set(ex)) and st.hits == 0
            assert st.bytes_read == len(set(ex)) * bb
            assert st.ms_wait >= 0
        blocks, st = r.read(0, [])
        assert blocks == [] and st.bytes_read == 0
    finally:
        r.close()


def test_duplicates_read_once(expert_file):
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    r = Reader([(path, off, bb, n)], max_batch=6)
    try:
        ex = [3, 7, 3, 3, 0, 7]
        ptrs = r.pointers(0, ex)
        assert ptrs[0] == ptrs[2] == ptrs[3] and ptrs[1] == ptrs[5] and len({ptrs[0], ptrs[1], ptrs[4]}) == 3
        assert all(p % 4096 == 0 for p in ptrs)  # aligned for O_DIRECT
        blocks, st = r.read(0, ex)
        assert st.bytes_read == 3 * bb and st.loads == 3
        for e, b in zip(ex, blocks):
            assert np.array_equal(b, mm[e])
    finally:
        r.close()


def test_multiple_layers_different_block_sizes(tmp_path):
    specs = []
    mms = []
    for il, (n, bb) in enumerate([(8, 4096), (5, 5 * 4096), (12, 2 * 4096)]):
        p = tmp_path / f"L{il:03d}.safetensors"
        off, _ = write_expert_file(p, n, bb, seed=10 + il)
        specs.append((p, off, bb, n))
        mms.append(np.memmap(p, np.uint8, "r", offset=off, shape=(n, bb)))
    specs.insert(1, (None, 0, 0, 0))  # a dense layer without experts
    mms.insert(1, None)
    r = Reader(specs, io_threads=2, ram_budget=6 * 5 * 4096, max_batch=4)
    try:
        rng = random.Random(5)
        for _ in range(60):
            il = rng.choice([0, 2, 3])
            n = specs[il][3]
            ex = [rng.randrange(n) for _ in range(rng.randint(1, 4))]
            blocks, st = r.read(il, ex)
            for e, b in zip(ex, blocks):
                assert np.array_equal(b, mms[il][e]), (il, e)
            assert st.loads + st.hits == len(set(ex))
            assert st.bytes_read == st.loads * specs[il][2]
        with pytest.raises(FmError) as ei:
            r.read(1, [0])
        assert ei.value.status == FM_ERR_ARG and "layer 1" in ei.value.msg
    finally:
        r.close()


def test_ram_cache_repeat_reads_nothing(expert_file):
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    r = Reader([(path, off, bb, n)], ram_budget=n * bb, max_batch=8)
    try:
        _, st = r.read(0, [1, 2, 3, 4])
        assert st.bytes_read == 4 * bb and st.loads == 4 and st.hits == 0
        blocks, st = r.read(0, [4, 3, 2, 1, 1])
        assert st.bytes_read == 0 and st.loads == 0 and st.hits == 4
        for e, b in zip([4, 3, 2, 1, 1], blocks):
            assert np.array_equal(b, mm[e])
        blocks, st = r.read(0, [1, 9])
        assert st.bytes_read == bb and st.loads == 1 and st.hits == 1
        assert np.array_equal(blocks[1], mm[9])
    finally:
        r.close()


def test_lfu_eviction_and_admission(expert_file):
    """RAM cache policy (csrc/fm_io.c): LFU with aging, ties by recency, a block just read is
    admitted only if its use count is at least the victim's."""
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    # capacity floor(budget / block_bytes) = 2 blocks
    r = Reader([(path, off, bb, n)], ram_budget=3 * bb - 1, max_batch=4)
    A, B, C, D = 5, 6, 7, 8

    def hits(e):
        blocks, st = r.read(0, [e])
        assert np.array_equal(blocks[0], mm[e]), e
        assert st.loads + st.hits == 1 and st.bytes_read == st.loads * bb
        return st.hits

    try:
        assert [hits(e) for e in (A, A, A, B)] == [0, 1, 1, 0]   # counts A 3, B 1
        assert hits(C) == 0      # C (1) replaces B (1, the lowest count), not A (3)
        assert hits(A) == 1      # A 4
        assert hits(C) == 1      # C 2
        assert hits(D) == 0      # D (1) is not admitted over C (2): the cache keeps A and C
        assert hits(C) == 1      # C 3
        assert hits(D) == 0      # D 2 < C 3: still not admitted
        assert hits(D) == 0      # D 3 >= C 3: admitted, C evicted
        assert hits(D) == 1 and hits(A) == 1
        assert hits(C) == 0      # C 4 >= D 4: admitted, evicts D (tie: D is less recent than A's use)
        assert hits(A) == 1 and hits(C) == 1
    finally:
        r.close()


def test_lfu_ties_go_to_the_least_recent(expert_file):
    path, off, bb, n = expert_file
    r = Reader([(path, off, bb, n)], ram_budget=3 * bb, max_batch=4)  # 3 blocks
    try:
        for e in (1, 2, 3):
            assert r.read(0, [e])[1].hits == 0
        assert r.read(0, [1])[1].hits == 1 and r.read(0, [2])[1].hits == 1 and r.read(0, [3])[1].hits == 1
        # all at count 2; a new block at count 2 replaces the least recent of them (1)
        assert r.read(0, [4])[1].hits == 0 and r.read(0, [4])[1].hits == 0   # 4: count 1, then 2: admitted
        assert r.read(0, [2])[1].hits == 1 and r.read(0, [3])[1].hits == 1 and r.read(0, [4])[1].hits == 1
        assert r.read(0, [1])[1].hits == 0
    finally:
        r.close()


def test_lfu_counts_age(expert_file):
    """Use counts saturate at 255: the use that would pass it halves every count (cached or not),
    so old popularity fades. A: 300 uses -> 255, halved to 127, then 45 more = 172. B is admitted
    over A once its count reaches 172 (not 300)."""
    path, off, bb, n = expert_file
    r = Reader([(path, off, bb, n)], ram_budget=bb, max_batch=4)  # 1 block
    try:
        assert sum(r.read(0, [3])[1].hits for _ in range(300)) == 299
        first_hit = next(i for i in range(1, 400) if r.read(0, [4])[1].hits)  # 1-based use of B
        assert first_hit == 173, first_hit
        assert r.read(0, [3])[1].hits == 0
    finally:
        r.close()


def test_pinned_blocks_are_never_evicted(expert_file):
    """A request larger than the cache: its hits are pinned until the next submit, so its misses
    (used more often than the cached blocks, so they would be admitted) find no victim."""
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    r = Reader([(path, off, bb, n)], ram_budget=2 * bb, max_batch=4)
    try:
        for e in (0, 1):
            r.read(0, [e])
        for _ in range(5):           # 2 and 3 used far more than 0 and 1, never cached (no room)
            r.read(0, [0, 1, 2, 3])
        blocks, st = r.read(0, [0, 1, 2, 3])
        assert st.hits == 2 and st.loads == 2
        for e, b in zip([0, 1, 2, 3], blocks):
            assert np.array_equal(b, mm[e]), e
        ptrs = r.pointers(0, [0, 1, 2, 3])       # the cached blocks' memory is handed out ...
        assert all(np.array_equal(np.frombuffer(ctypes.string_at(p, bb), np.uint8), mm[e])
                   for p, e in zip(ptrs, [0, 1, 2, 3]))
        assert r.read(0, [2])[1].hits == 0       # ... and a later single request can now evict for 2
        assert r.read(0, [2])[1].hits == 1
    finally:
        r.close()


def _cyclic_layers(tmp_path, n_layers, n):
    specs = []
    for il in range(n_layers):
        p = tmp_path / f"L{il:03d}.safetensors"
        o, _ = write_expert_file(p, n_experts=n, block_bytes=4096, seed=10 + il)
        specs.append((p, o, 4096, n))
    return specs


def test_cyclic_decode_hits_below_one_token_working_set(tmp_path):
    """Decode visits the layers in a fixed cycle. Each token: every layer asks for K = 2 blocks,
    its hot expert (0) and a rotating cold one; the cache holds 6 < n_layers x K = 8 blocks. One LRU
    over all layers got 0 hits here (each block's reuse distance is 8 > 6 blocks); LFU keeps the
    4 hot blocks: at least 4 of every 8 blocks hit once warm."""
    L, n, T = 4, 8, 40
    specs = _cyclic_layers(tmp_path, L, n)
    mms = [np.memmap(p, np.uint8, "r", offset=o, shape=(n, bb)) for p, o, bb, _ in specs]
    r = Reader(specs, ram_budget=6 * 4096, max_batch=2)
    try:
        hits = total = 0
        for t in range(T):
            for il in range(L):
                ex = [0, 1 + (t + il) % (n - 1)]
                blocks, st = r.read(il, ex)
                for e, b in zip(ex, blocks):
                    assert np.array_equal(b, mms[il][e]), (t, il, e)
                if t >= 4:
                    hits += st.hits
                    total += len(ex)
        assert hits >= total // 2, (hits, total)
    finally:
        r.close()


def test_cache_budget_and_data_under_random_use(tmp_path):
    """Random skewed requests over several layers (blocks of different sizes): every block handed
    out is the file's, and the cache never holds more than floor(ram_budget / largest block) blocks
    (probe: each block read once afterwards; hits <= blocks cached when the probe starts)."""
    specs = []
    for il, (n, bb) in enumerate([(12, 4096), (9, 2 * 4096), (16, 4096)]):
        p = tmp_path / f"L{il:03d}.safetensors"
        o, _ = write_expert_file(p, n_experts=n, block_bytes=bb, seed=20 + il)
        specs.append((p, o, bb, n))
    mms = [np.memmap(p, np.uint8, "r", offset=o, shape=(n, bb)) for p, o, bb, n in specs]
    cap = 7
    r = Reader(specs, io_threads=3, ram_budget=cap * 2 * 4096 + 4095, max_batch=5)
    rng = np.random.default_rng(3)
    try:
        hits = 0
        for _ in range(1500):   # enough uses to age the counters (a counter passes 255) a few times
            il = int(rng.integers(3))
            n = specs[il][3]
            ex = [int(x) for x in np.minimum(rng.zipf(1.6, size=int(rng.integers(1, 6))) - 1, n - 1)]
            blocks, st = r.read(il, ex)
            for e, b in zip(ex, blocks):
                assert np.array_equal(b, mms[il][e]), (il, e)
            assert st.loads + st.hits == len(set(ex)) and st.bytes_read == st.loads * specs[il][2]
            hits += st.hits
        assert hits > 0
        probe = sum(r.read(il, [e])[1].hits for il in range(3) for e in range(specs[il][3]))
        assert 0 < probe <= cap
    finally:
        r.close()


def test_bad_arguments(expert_file):
    path, off, bb, n = expert_file
    r = Reader([(path, off, bb, n)], max_batch=4)
    try:
        for il, ex, what in [(0, [0, n], f"experts[1] = {n}"), (0, [-1], "experts[0] = -1"), (1, [0], "il = 1"),
                             (-1, [0], "il = -1"), (0, [0, 1, 2, 3, 4], "n = 5")]:
            with pytest.raises(FmError) as ei:
                r.read(il, ex)
            assert ei.value.status == FM_ERR_ARG and what in ei.value.msg, ei.value.msg
        err = ctypes.create_string_buffer(256)
        assert LIB.fm_io_wait(r.h, None, None, err, 256) == FM_ERR_ARG  # nothing submitted
        blocks, _ = r.read(0, [2])  # still usable
        assert np.array_equal(blocks[0], np.memmap(path, np.uint8, "r", offset=off + 2 * bb, shape=(bb,)))
    finally:
        r.close()
    with pytest.raises(FmError) as ei:
        Reader([(path, off, bb, n)], max_batch=0)
    assert ei.value.status == FM_ERR_ARG and "max_batch" in ei.value.msg
    with pytest.raises(FmError) as ei:
        Reader([(path, off + 1, bb, n)])
    assert ei.value.status == FM_ERR_FORMAT and str(path) in ei.value.msg
    with pytest.raises(FmError) as ei:
        Reader([(path.parent / "missing.safetensors", off, bb, n)])
    assert ei.value.status == FM_ERR_IO and "missing.safetensors" in ei.value.msg


def test_truncated_file_fails_at_open(expert_file):
    path, off, bb, n = expert_file
    size = os.path.getsize(path)
    os.truncate(path, size - 4096)
    with pytest.raises(FmError) as ei:
        Reader([(path, off, bb, n)])
    assert ei.value.status == FM_ERR_FORMAT
    assert str(path) in ei.value.msg and str(size - 4096) in ei.value.msg and str(size) in ei.value.msg


@pytest.mark.parametrize("ram_budget", [0, 4 * 3 * 4096])
def test_file_truncated_mid_run_then_restored(expert_file, ram_budget):
    path, off, bb, n = expert_file
    full = path.read_bytes()
    mm_ref = np.frombuffer(full, np.uint8, offset=off).reshape(n, bb)
    r = Reader([(path, off, bb, n)], io_threads=2, ram_budget=ram_budget, max_batch=4)
    try:
        blocks, _ = r.read(0, [0, 1])
        assert np.array_equal(blocks[1], mm_ref[1])
        os.truncate(path, off + 2 * bb + 100)  # experts >= 2 now cut short or missing
        with pytest.raises(FmError) as ei:
            r.read(0, [0, 2, 9])
        assert ei.value.status == FM_ERR_IO
        assert str(path) in ei.value.msg and "layer 0" in ei.value.msg and "expert 2" in ei.value.msg
        with pytest.raises(FmError) as ei:
            r.read(0, [9])
        assert ei.value.status == FM_ERR_IO and "expert 9" in ei.value.msg
        with open(path, "r+b") as f:  # restore in place (same inode, the reader's fd sees it)
            f.write(full)
        blocks, st = r.read(0, [9, 2, 0, 1])
        for e, b in zip([9, 2, 0, 1], blocks):
            assert np.array_equal(b, mm_ref[e]), e
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# hooks (fm_io_open_ex): block buffers from the caller's allocator, a per-block callback; fm_io_peek
# ---------------------------------------------------------------------------------------------
ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
BLOCK_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p)


class IoHooks(ctypes.Structure):
    _fields_ = [("alloc", ALLOC_FN), ("free", FREE_FN), ("on_block", BLOCK_FN), ("user", ctypes.c_void_p)]


LIB.fm_io_open_ex.restype = ctypes.c_int
LIB.fm_io_open_ex.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ExpertFile), ctypes.c_int32,
                              ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32,
                              ctypes.POINTER(IoHooks), ctypes.c_char_p, ctypes.c_size_t]
LIB.fm_io_next.restype = ctypes.c_int32
LIB.fm_io_next.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_void_p)]
LIB.fm_io_peek.restype = ctypes.c_void_p
LIB.fm_io_peek.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
LIB.fm_io_cache_capacity.restype = ctypes.c_int32
LIB.fm_io_cache_capacity.argtypes = [ctypes.c_void_p]
LIB.fm_io_max_batch.restype = ctypes.c_int32
LIB.fm_io_max_batch.argtypes = [ctypes.c_void_p]


class HookedReader(Reader):
    """Reader opened through fm_io_open_ex with Python hooks that record every call: buffers from
    an allocator of our own (4096-aligned ctypes buffers), on_block events (index, block, thread);
    on_block may also be a callable(index, block), called after the event is recorded."""

    def __init__(self, layers, io_threads=0, direct_io=0, ram_budget=0, max_batch=8, alloc=True, on_block=True,
                 block_delay=0.0):
        import threading
        import time
        self.layers = layers
        self.max_batch = max_batch
        self.bufs = {}          # address -> (ctypes buffer, bytes) of live allocations
        self.n_alloc = self.n_free = 0
        self.alloc_sizes = set()
        self.fail_alloc = False
        self.bad_free = []
        self.events = []        # (index, block address, thread ident) in call order
        self.lock = threading.Lock()
        main = threading.get_ident()

        def _alloc(user, nbytes):
            if self.fail_alloc:
                return None
            raw = ctypes.create_string_buffer(nbytes + 4096)
            addr = (ctypes.addressof(raw) + 4095) // 4096 * 4096
            with self.lock:
                self.bufs[addr] = (raw, nbytes)
                self.n_alloc += 1
                self.alloc_sizes.add(nbytes)
                self.alloc_threads.add(threading.get_ident() == main)
            return addr

        def _free(user, ptr, nbytes):
            with self.lock:
                got = self.bufs.pop(ptr, None)
                if got is None or got[1] != nbytes:
                    self.bad_free.append((ptr, nbytes))
                self.n_free += 1

        def _on_block(user, index, block):
            if block_delay:
                time.sleep(block_delay)
            with self.lock:
                self.events.append((index, block, threading.get_ident()))
            if callable(on_block):
                on_block(index, block)

        self.alloc_threads = set()
        self._cbs = IoHooks(ALLOC_FN(_alloc) if alloc else ALLOC_FN(), FREE_FN(_free) if alloc else FREE_FN(),
                            BLOCK_FN(_on_block) if on_block else BLOCK_FN(), None)
        self.files = (ExpertFile * len(layers))(*[
            ExpertFile(None if p is None else str(p).encode(), off, bb, n) for p, off, bb, n in layers])
        self.h = ctypes.c_void_p()
        err = ctypes.create_string_buffer(1024)
        st = LIB.fm_io_open_ex(ctypes.byref(self.h), self.files, len(layers), io_threads, direct_io, ram_budget,
                               max_batch, ctypes.byref(self._cbs), err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())

    def submit(self, il, experts):
        ex = (ctypes.c_int32 * max(1, len(experts)))(*experts)
        err = ctypes.create_string_buffer(1024)
        st = LIB.fm_io_submit(self.h, il, ex, len(experts), err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())

    def next(self):
        idx, blk = ctypes.c_int32(), ctypes.c_void_p()
        if not LIB.fm_io_next(self.h, ctypes.byref(idx), ctypes.byref(blk)):
            return None
        return idx.value, blk.value

    def wait(self, n):
        err = ctypes.create_string_buffer(1024)
        blocks = (ctypes.c_void_p * max(1, n))()
        stats = IoStats()
        st = LIB.fm_io_wait(self.h, blocks, ctypes.byref(stats), err, 1024)
        if st != FM_OK:
            raise FmError(st, err.value.decode())
        return list(blocks)[:n], stats


def _owned(hr, ptr):
    """ptr lies in a buffer the hook allocated"""
    return any(a <= ptr < a + nb for a, (_, nb) in hr.bufs.items())


@pytest.mark.parametrize("ram_budget", [0, 5 * 3 * 4096])
def test_hooks_alloc_every_block_buffer(expert_file, ram_budget):
    """Every block buffer (read slots and RAM cache entries) comes from hooks.alloc, on the thread
    that submits, with the block size; fm_io_close frees each exactly once; data identical."""
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    hr = HookedReader([(path, off, bb, n)], io_threads=3, ram_budget=ram_budget, max_batch=4, on_block=False)
    try:
        assert LIB.fm_io_cache_capacity(hr.h) == ram_budget // bb and LIB.fm_io_max_batch(hr.h) == 4
        rng = random.Random(2)
        for _ in range(60):
            ex = [rng.randrange(n) for _ in range(rng.randint(1, 4))]
            blocks, st = hr.read(0, ex)
            for e, b in zip(ex, blocks):
                assert np.array_equal(b, mm[e]), e
            assert all(_owned(hr, p) for p in hr.pointers(0, ex))
        assert hr.alloc_sizes == {bb} and hr.alloc_threads == {True}
        # slots (2 * max_batch) + cache entries, never more (the CUDA backend pins exactly that many)
        assert 0 < hr.n_alloc <= 2 * 4 + ram_budget // bb
        if ram_budget:  # cache entries are former slots; the slots were refilled
            assert hr.n_alloc > ram_budget // bb
    finally:
        hr.close()
    assert hr.n_free == hr.n_alloc and not hr.bufs and not hr.bad_free


def test_hooks_alloc_failure_is_oom_and_reader_recovers(expert_file):
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    hr = HookedReader([(path, off, bb, n)], ram_budget=0, max_batch=4)
    try:
        hr.fail_alloc = True
        with pytest.raises(FmError) as ei:
            hr.read(0, [1, 2])
        assert ei.value.status == FM_ERR_OOM and "slot buffer" in ei.value.msg and str(bb) in ei.value.msg
        hr.fail_alloc = False
        blocks, st = hr.read(0, [1, 2])
        assert np.array_equal(blocks[0], mm[1]) and np.array_equal(blocks[1], mm[2]) and st.loads == 2
    finally:
        hr.close()
    assert hr.n_free == hr.n_alloc and not hr.bufs


def test_hooks_mismatched_alloc_free_rejected(expert_file):
    path, off, bb, n = expert_file
    files = (ExpertFile * 1)(ExpertFile(str(path).encode(), off, bb, n))
    hooks = IoHooks(ALLOC_FN(lambda u, nb: None), FREE_FN(), BLOCK_FN(), None)
    h = ctypes.c_void_p()
    err = ctypes.create_string_buffer(512)
    assert LIB.fm_io_open_ex(ctypes.byref(h), files, 1, 0, 0, 0, 4, ctypes.byref(hooks), err, 512) == FM_ERR_ARG
    assert b"hooks.alloc" in err.value and not h.value
    # NULL hooks: the same as fm_io_open
    assert LIB.fm_io_open_ex(ctypes.byref(h), files, 1, 0, 0, 0, 4, None, err, 512) == FM_OK, err.value
    LIB.fm_io_close(h)


@pytest.mark.parametrize("ram_budget", [0, 6 * 3 * 4096])
def test_on_block_once_per_block_before_it_is_handed_out(expert_file, ram_budget):
    """on_block: once per distinct block of a request, with its first request index and the block
    fm_io hands out; cache hits inside fm_io_submit (on its thread, all before it returns), reads
    on an I/O thread before fm_io_next can return them (so a backend's copy is already queued);
    fm_io_next then delivers in completion order."""
    import threading
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    hr = HookedReader([(path, off, bb, n)], io_threads=3, ram_budget=ram_budget, max_batch=6, block_delay=0.002)
    main = threading.get_ident()
    try:
        rng = random.Random(7)
        total_hits = 0
        for _ in range(25):
            ex = [rng.randrange(8) for _ in range(rng.randint(1, 6))]
            first = {}
            for i, e in enumerate(ex):
                first.setdefault(e, i)
            cached = {e for e in first if LIB.fm_io_peek(hr.h, 0, e)}
            hr.events.clear()
            hr.submit(0, ex)
            with hr.lock:
                at_submit = list(hr.events)
            # every hit's callback ran inside fm_io_submit, on this thread
            assert {ex[i] for i, _, _ in at_submit} >= cached
            assert all(t == main for i, _, t in at_submit if ex[i] in cached)
            handed = []
            while True:
                got = hr.next()
                if got is None:
                    break
                i, blk = got
                with hr.lock:
                    seen = {(j, b) for j, b, _ in hr.events}
                assert (i, blk) in seen, "fm_io_next handed out a block before its on_block"
                assert np.array_equal(np.frombuffer(ctypes.string_at(blk, bb), np.uint8), mm[ex[i]])
                handed.append(i)
            blocks, st = hr.wait(len(ex))
            assert sorted(handed) == sorted(first.values())
            ev = [(i, b) for i, b, _ in hr.events]
            assert sorted(i for i, _ in ev) == sorted(first.values())     # once per distinct block
            for i, b in ev:
                assert b == blocks[i] and first[ex[i]] == i
            reads = [t for i, _, t in hr.events if ex[i] not in cached]
            assert all(t != main for t in reads)                         # reads: on I/O threads
            assert st.hits == len(cached) and st.loads == len(first) - len(cached)
            total_hits += st.hits
        assert (total_hits > 0) == (ram_budget > 0)
    finally:
        hr.close()


def test_on_block_not_called_for_a_failed_read(expert_file):
    path, off, bb, n = expert_file
    full = path.read_bytes()
    hr = HookedReader([(path, off, bb, n)], io_threads=2, max_batch=4)
    try:
        os.truncate(path, off + 2 * bb)
        hr.events.clear()
        hr.submit(0, [1, 5, 0])
        handed = []
        while (got := hr.next()) is not None:
            handed.append(got)
        with pytest.raises(FmError) as ei:
            hr.wait(3)
        assert ei.value.status == FM_ERR_IO and "expert 5" in ei.value.msg
        called = {i: b for i, b, _ in hr.events}
        assert sorted(called) == [0, 2]                                  # experts 1 and 0, not 5
        assert sorted(handed, key=lambda t: t[0]) == [(0, called[0]), (1, None), (2, called[2])]
    finally:
        with open(path, "r+b") as f:
            f.write(full)
        hr.close()


def test_async_copies_see_intact_blocks_until_the_next_submit(tmp_path):
    """The CUDA backend's pattern: on_block starts an asynchronous copy of each block (here: noted,
    and done later, standing in for the copy stream), and the caller finishes all copies of a
    request before it submits the next one. With a small RAM cache (admissions, evictions, buffers
    swapping between slots and cache) every copy done at the last moment, right before the next
    submit, must see its block's bytes; done later, many would not (the buffers are reused), which
    is why the backend waits."""
    n, bb = 24, 4096
    path = tmp_path / "L000.safetensors"
    off, data = write_expert_file(path, n, bb, seed=21)
    cur, pending, late = {}, [], []

    def on_block(index, block):
        pending.append((cur["ex"][index], block))

    hr = HookedReader([(path, off, bb, n)], io_threads=3, ram_budget=5 * bb, max_batch=6, on_block=on_block)
    try:
        rng = random.Random(4)
        hot = [0, 1, 2, 3]
        for _ in range(150):
            for e, ptr in pending:  # the previous request's copies, finished before this submit
                assert np.array_equal(np.frombuffer(ctypes.string_at(ptr, bb), np.uint8), data[e]), e
            late.extend(pending)
            pending.clear()
            ex = list({rng.choice(hot) if rng.random() < 0.6 else rng.randrange(n)
                       for _ in range(rng.randint(1, 6))})
            cur["ex"] = ex
            hr.submit(0, ex)
            while hr.next() is not None:
                pass
            hr.wait(len(ex))
        stale = sum(not np.array_equal(np.frombuffer(ctypes.string_at(p, bb), np.uint8), data[e]) for e, p in late)
        assert stale > 0  # copies left for later would have read reused buffers
    finally:
        hr.close()


def test_peek_counts_no_use(expert_file):
    """fm_io_peek: the cached block or NULL, and peeking is not a use (LFU counts unchanged)."""
    path, off, bb, n = expert_file
    mm = np.memmap(path, np.uint8, "r", offset=off, shape=(n, bb))
    r = Reader([(path, off, bb, n)], ram_budget=2 * bb, max_batch=4)
    r0 = Reader([(path, off, bb, n)], ram_budget=0, max_batch=4)
    A, B, C = 1, 2, 3
    try:
        r0.read(0, [A])
        assert not LIB.fm_io_peek(r0.h, 0, A) and LIB.fm_io_cache_capacity(r0.h) == 0
        for e in (A, A, B):        # counts A 2, B 1; cache {A, B}
            r.read(0, [e])
        for e in (A, B):
            p = LIB.fm_io_peek(r.h, 0, e)
            assert p and np.array_equal(np.frombuffer(ctypes.string_at(p, bb), np.uint8), mm[e])
        assert not LIB.fm_io_peek(r.h, 0, C)
        for bad in [(0, -1), (0, n), (1, 0), (-1, 0)]:
            assert not LIB.fm_io_peek(r.h, *bad)
        for _ in range(10):        # were these uses, B (11) would beat C (1) below
            LIB.fm_io_peek(r.h, 0, B)
        assert r.read(0, [C])[1].hits == 0
        assert not LIB.fm_io_peek(r.h, 0, B) and LIB.fm_io_peek(r.h, 0, C) and LIB.fm_io_peek(r.h, 0, A)
    finally:
        r.close()
        r0.close()


def _direct_dir(tmp_path):
    """A directory whose filesystem honours O_DIRECT (tmpfs on older kernels does not)."""
    for d in [tmp_path, pathlib.Path("/var/tmp"), pathlib.Path(__file__).resolve().parent.parent / "build"]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f"odirect-probe-{os.getpid()}"
            probe.write_bytes(b"\0" * 8192)
            try:
                fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
                os.close(fd)
                return d
            finally:
                probe.unlink()
        except (OSError, AttributeError):
            continue
    return None


def test_direct_io_equals_buffered(tmp_path):
    d = _direct_dir(tmp_path)
    if d is None:
        pytest.skip("no directory here supports O_DIRECT (tmp_path, /var/tmp, build/)")
    path = d / f"L000-direct-{os.getpid()}.safetensors"
    try:
        n, bb = 10, 4 * 4096
        off, data = write_expert_file(path, n, bb, seed=3)
        rd = Reader([(path, off, bb, n)], direct_io=1, max_batch=5)
        rb = Reader([(path, off, bb, n)], direct_io=0, max_batch=5)
        try:
            assert LIB.fm_io_direct_active(rd.h) == 1
            assert LIB.fm_io_direct_active(rb.h) == 0
            rng = random.Random(9)
            for _ in range(20):
                ex = [rng.randrange(n) for _ in range(5)]
                bd, sd = rd.read(0, ex)
                bbuf, _ = rb.read(0, ex)
                for e, x, y in zip(ex, bd, bbuf):
                    assert np.array_equal(x, y) and np.array_equal(x, data[e])
                assert sd.bytes_read == len(set(ex)) * bb
            assert LIB.fm_io_direct_active(rd.h) == 1  # no read fell back to buffered
        finally:
            rd.close()
            rb.close()
    finally:
        path.unlink(missing_ok=True)


def test_probe(expert_file, tmp_path):
    path, off, bb, n = expert_file
    g = ctypes.c_double()
    err = ctypes.create_string_buffer(512)
    assert LIB.fm_io_probe(str(path).encode(), bb, 32, 2, 0, ctypes.byref(g), err, 512) == FM_OK, err.value
    assert g.value > 0 and math.isfinite(g.value)
    assert LIB.fm_io_probe(str(path).encode(), 1000, 4, 2, 0, ctypes.byref(g), err, 512) == FM_ERR_ARG
    assert b"block_bytes" in err.value
    assert LIB.fm_io_probe(str(tmp_path / "nope").encode(), bb, 4, 2, 0, ctypes.byref(g), err, 512) == FM_ERR_IO
    assert b"nope" in err.value
    d = _direct_dir(tmp_path)
    if d == tmp_path:
        assert LIB.fm_io_probe(str(path).encode(), bb, 16, 2, 1, ctypes.byref(g), err, 512) == FM_OK, err.value
        assert g.value > 0
