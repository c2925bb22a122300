"""Issue 10 item 3: session state snapshots (csrc/fm_state.c, Session.save_state / load_state).

A session saved at a prefix, continued, and a fresh session loaded from the snapshot and continued
with the same tokens give bit-identical logits on the CPU backend (the demo model and tiny models
of each arch: hybrid linear + full attention, and full attention only). Refusals: a snapshot of
another model (other dims: named; same dims, other weight formats: the fingerprint), truncated,
too long, bad magic, damaged (checksum), more tokens than n_ctx; the session is unchanged after a
refusal. CUDA (skips without a GPU): the same round trip on the CUDA backend, and snapshots
crossing backends (CPU -> CUDA -> CPU).
"""
import os

import numpy as np
import pytest

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.errors import ContextFullError, FormatError  # noqa: E402

import logits_cases  # noqa: E402

# the demo, and one tiny model per arch (hybrid: qwen3_5_moe, qwen3_next; full attention only: qwen3_moe)
MODELS = ["demo", "qwen3_5_moe-q4g32", "qwen3_next-bf16", "qwen3_moe-q4g32"]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("state_models"))


def _path(name, root):
    if name != "demo":
        pytest.importorskip("transformers", reason="tiny models are built with transformers")
    return logits_cases.build(name, root)


def _toks(eng, n=24, seed=3):
    return np.random.default_rng(seed).integers(3, eng.n_vocab, size=n).astype(np.int32)


def _continue(ses, toks):
    """prefill toks[:-4] (all rows), then decode the last 4 one by one: every logit row"""
    rows = [ses.eval(toks[:-4], all_logits=True)]
    for t in toks[-4:]:
        rows.append(ses.eval(np.array([t], np.int32))[None])
    return np.concatenate(rows)


@pytest.mark.parametrize("name", MODELS)
def test_save_continue_load_continue_bit_identical(name, model_root):
    eng = core.Engine(_path(name, model_root), backend=0, n_threads=2)
    toks = _toks(eng)
    a = core.Session(eng, 64)
    a.eval(toks[:10])
    snap = a.save_state()
    assert isinstance(snap, bytes) and len(snap) == a.state_size()
    ref = _continue(a, toks[10:])
    assert a.pos == len(toks)
    # a fresh session (smaller n_ctx: enough for what it holds) resumes from the snapshot
    b = core.Session(eng, 40)
    b.load_state(snap)
    assert b.pos == 10
    assert b.save_state() == snap  # the round trip is exact
    np.testing.assert_array_equal(_continue(b, toks[10:]), ref)
    # the session that went on rewinds to the snapshot (stale KV rows past pos, newer recurrent state)
    a.load_state(memoryview(snap))
    assert a.pos == 10
    np.testing.assert_array_equal(_continue(a, toks[10:]), ref)
    # and the whole thing from scratch agrees with both
    c = core.Session(eng, 64)
    c.eval(toks[:10])
    np.testing.assert_array_equal(_continue(c, toks[10:]), ref)


def test_snapshot_at_position_zero_and_other_buffers(model_root):
    eng = core.Engine(_path("demo", model_root), backend=0, n_threads=2)
    toks = _toks(eng)
    s = core.Session(eng, 32)
    empty = s.save_state()
    s.eval(toks[:8])
    ref = s.eval(toks[8:12], all_logits=True)
    snap8 = None
    s.load_state(empty)
    assert s.pos == 0
    s.eval(toks[:8])
    snap8 = s.save_state()
    np.testing.assert_array_equal(s.eval(toks[8:12], all_logits=True), ref)
    # numpy uint8 arrays and bytearrays are accepted too
    t = core.Session(eng, 32)
    t.load_state(np.frombuffer(snap8, np.uint8))
    np.testing.assert_array_equal(t.eval(toks[8:12], all_logits=True), ref)
    t.load_state(bytearray(snap8))
    np.testing.assert_array_equal(t.eval(toks[8:12], all_logits=True), ref)
    # the size grows with pos by the KV rows of the full-attention layers only
    assert len(snap8) > len(empty)


def _refused(ses, buf, *words, exc=FormatError):
    pos = ses.pos
    with pytest.raises(exc) as ei:
        ses.load_state(buf)
    msg = str(ei.value)
    for w in words:
        assert w in msg, msg
    assert ses.pos == pos  # nothing changed
    return msg


def test_refusals(model_root):
    eng = core.Engine(_path("demo", model_root), backend=0, n_threads=2)
    toks = _toks(eng)
    s = core.Session(eng, 32)
    s.eval(toks[:12])
    snap = s.save_state()
    t = core.Session(eng, 32)
    t.eval(toks[:5])
    ref = core.Session(eng, 32)
    ref.eval(toks[:5])
    want = ref.eval(toks[5:9], all_logits=True)
    _refused(t, snap[:-1], "truncated")
    _refused(t, snap[:100], "truncated")
    _refused(t, snap[:10], "too short")
    _refused(t, b"", "too short")
    _refused(t, snap + b"\0", "past the end")
    _refused(t, b"GGUF" + snap[4:], "bad magic")
    bad = bytearray(snap)
    bad[-3] ^= 0x10  # a payload bit
    _refused(t, bytes(bad), "checksum")
    bad = bytearray(snap)
    bad[16] ^= 0x01  # the version field (covered by the checksum, checked first)
    _refused(t, bytes(bad), "version")
    small = core.Session(eng, 8)
    _refused(small, snap, "12 tokens", "n_ctx is 8", exc=ContextFullError)
    with pytest.raises(Exception) as ei:
        t.load_state("not bytes")
    assert "bytes-like" in str(ei.value)
    # after every refusal the session goes on as if nothing happened
    np.testing.assert_array_equal(t.eval(toks[5:9], all_logits=True), want)


def test_snapshot_of_other_weights_is_refused(model_root, tmp_path):
    """Same layer table and formats, other weights: the model dir's manifest (which lists the
    sha256 of every weight file) differs."""
    import json
    import shutil
    src = _path("demo", model_root)
    dst = tmp_path / "other"
    shutil.copytree(src, dst)
    man = json.loads((dst / "pyflashmoe.json").read_text())
    man["files"]["dense.safetensors"]["sha256"] = "0" * 64  # as if retrained: other weights
    (dst / "pyflashmoe.json").write_text(json.dumps(man))
    a = core.Engine(src, backend=0, n_threads=2)
    b = core.Engine(str(dst), backend=0, n_threads=2)
    s = core.Session(a, 16)
    s.eval(_toks(a, 6))
    _refused(core.Session(b, 16), s.save_state(), "another model", "other weights", "pyflashmoe.json")


def test_snapshot_of_another_model_is_refused(model_root):
    pytest.importorskip("transformers", reason="tiny models are built with transformers")
    demo = core.Engine(_path("demo", model_root), backend=0, n_threads=2)
    q4 = core.Engine(_path("qwen3_5_moe-q4g32", model_root), backend=0, n_threads=2)
    bf16 = core.Engine(_path("qwen3_5_moe-bf16", model_root), backend=0, n_threads=2)
    nxt = core.Engine(_path("qwen3_next-bf16", model_root), backend=0, n_threads=2)
    full = core.Engine(_path("qwen3_moe-q4g32", model_root), backend=0, n_threads=2)

    def snap(eng):
        s = core.Session(eng, 16)
        s.eval(_toks(eng, 6))
        return s.save_state()

    # other dims: the first that differs is named
    msg = _refused(core.Session(q4, 16), snap(demo), "another model")
    assert "layers" in msg or "hidden size" in msg or "vocabulary" in msg, msg
    # same dims, a layer of another kind
    _refused(core.Session(full, 16), snap(q4), "another model", "layer 0", "linear attention")
    # same dims and kinds, other weight formats (4-bit vs bf16 of one checkpoint): the fingerprint
    _refused(core.Session(bf16, 16), snap(q4), "another model", "fingerprint")
    # qwen3_next vs qwen3_5_moe (same layout, other features)
    _refused(core.Session(nxt, 16), snap(bf16), "another model")
    # experts per token is part of the model
    q4k1 = core.Engine(_path("qwen3_5_moe-q4g32", model_root), backend=0, n_threads=2, experts_per_token=1)
    _refused(core.Session(q4k1, 16), snap(q4), "experts per token")


# ---------------------------------------------------------------- CUDA

GPU = hasattr(core, "cuda_available") and core.cuda_available()
REASON = ("pyflashmoe._core has no CUDA API" if not hasattr(core, "cuda_available") else
          "this build has no CUDA backend (built without nvcc or FLASHMOE_CUDA=0)" if not core.cuda_compiled()
          else core.cuda_describe())
needs_gpu = pytest.mark.skipif(not GPU, reason=REASON)


@needs_gpu
@pytest.mark.parametrize("graph", [1, 0])
@pytest.mark.parametrize("name", MODELS)
def test_cuda_save_continue_load_continue_bit_identical(name, graph, model_root):
    """The CPU test on the CUDA backend (resident experts: a deterministic path): continue after the
    save and continue after a load into a fresh session give the same bits; with and without the
    decode graph."""
    eng = core.Engine(_path(name, model_root), backend=1, debug={"cuda_graph": graph})
    toks = _toks(eng)
    a = core.Session(eng, 64)
    a.eval(toks[:10])
    snap = a.save_state()
    ref = _continue(a, toks[10:])
    b = core.Session(eng, 40)
    b.load_state(snap)
    assert b.pos == 10 and b.save_state() == snap
    np.testing.assert_array_equal(_continue(b, toks[10:]), ref)
    a.load_state(snap)
    np.testing.assert_array_equal(_continue(a, toks[10:]), ref)


@needs_gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_and_cpu_snapshots_cross(name, model_root):
    """A CPU snapshot loads into a CUDA session and back: the continuation matches the CPU's within
    the CUDA-vs-CPU tolerance of tests/test_cuda.py, and a CUDA snapshot of the loaded state
    carries the same KV rows / states (within that tolerance) into a CPU session."""
    path = _path(name, model_root)
    cpu = core.Engine(path, backend=0, n_threads=2)
    gpu = core.Engine(path, backend=1)
    toks = _toks(cpu)
    c = core.Session(cpu, 64)
    c.eval(toks[:10])
    snap = c.save_state()
    ref = _continue(c, toks[10:])
    g = core.Session(gpu, 64)
    g.load_state(snap)
    assert g.save_state() == snap  # device copies are exact
    out = _continue(g, toks[10:])
    scale = float(np.abs(ref).max())
    assert float(np.abs(out - ref).max()) <= 2e-4 * scale
    g.load_state(snap)
    g.eval(toks[10:14])
    back = core.Session(cpu, 64)
    back.load_state(g.save_state())
    assert back.pos == 14
    tail = back.eval(toks[14:], all_logits=True)
    assert float(np.abs(tail - ref[4:]).max()) <= 2e-4 * scale


@needs_gpu
def test_cuda_refusals_leave_the_session_alone(model_root):
    eng = core.Engine(_path("demo", model_root), backend=1)
    toks = _toks(eng)
    s = core.Session(eng, 32)
    s.eval(toks[:12])
    snap = s.save_state()
    t = core.Session(eng, 32)
    t.eval(toks[:5])
    ref = core.Session(eng, 32)
    ref.eval(toks[:5])
    want = ref.eval(toks[5:9], all_logits=True)
    _refused(t, snap[:-1], "truncated")
    _refused(core.Session(eng, 8), snap, "n_ctx is 8", exc=ContextFullError)
    np.testing.assert_array_equal(t.eval(toks[5:9], all_logits=True), want)


def test_format_is_documented():
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "docs", "INTERNALS.md"), encoding="utf-8").read()
    assert "fm_state.c" in text and "save_state" in text
