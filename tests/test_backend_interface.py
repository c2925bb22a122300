"""Issue 12 items 1-2: the backend interface (csrc/fm_backend.h) and the one layer loop (fm_forward.c).

* a layer kind no backend knows is refused when the model is opened, with a message naming the
  file, the layer and the field (never a fall-through at eval time);
* the layer ops are called through the backend table in exactly one place (fm_forward.c's
  run_pass), and the CUDA backend has no loop of its own (cuda_forward / graph_decode /
  fm_cuda_session_eval are gone);
* the generic per-op timing charges every op once: the ms_* parts add up to no more than ms_total.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest

from pyflashmoe.errors import FormatError

core = pytest.importorskip("pyflashmoe._core")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO = os.path.join(ROOT, "pyflashmoe", "demo", "model")


def _demo_copy(tmp_path, edit):
    d = tmp_path / "m"
    shutil.copytree(DEMO, d)
    p = d / "pyflashmoe.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))
    return str(d)


@pytest.mark.parametrize("field,value", [("attn", "mamba"), ("ffn", "xyz"), ("attn", 3)])
def test_unknown_layer_kind_is_refused_at_open(tmp_path, field, value):
    d = _demo_copy(tmp_path, lambda m: m["spec"]["layers"][2].__setitem__(field, value))
    with pytest.raises(FormatError) as ei:
        core.Engine(d, n_threads=1)
    msg = str(ei.value)
    assert "pyflashmoe.json" in msg and "layers[2]" in msg and field in msg, msg


def _csrc_files():
    for dp, _, fs in os.walk(os.path.join(ROOT, "csrc")):
        for f in fs:
            if f.endswith((".c", ".h", ".cu", ".cuh")):
                yield os.path.join(dp, f)


def _code(path):
    """the file without comments (so that documentation may name the loop)"""
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_one_layer_loop():
    """Every call of a layer op through the backend table is in fm_forward.c (run_pass), once per
    kind of op; no backend keeps a forward loop of its own."""
    calls = {}
    for path in _csrc_files():
        code = _code(path)
        for op in ("embed", "mixer", "ffn", "final"):
            pat = r"\bbe->%s\s*(\[[^\]]*\])?\s*\(" % op
            for _ in re.finditer(pat, code):
                calls.setdefault(op, []).append(os.path.relpath(path, ROOT))
        for gone in ("cuda_forward", "graph_decode", "fm_cuda_session_eval", "fm_backend_ops"):
            assert not re.search(r"\b%s\b" % gone, code), f"{gone} in {path}"
    assert calls == {op: ["csrc/fm_forward.c"] for op in ("embed", "mixer", "ffn", "final")}, calls


def test_op_timing_adds_up():
    e = core.Engine(DEMO, n_threads=1)
    s = core.Session(e, 64)
    s.eval(list(range(1, 9)))
    for t in range(5):
        s.eval([10 + t])
    st = s.stats()
    parts = st["ms_attn"] + st["ms_route"] + st["ms_io_wait"] + st["ms_expert"] + st["ms_other"]
    assert st["ms_attn"] > 0 and st["ms_expert"] > 0 and st["ms_other"] > 0, st
    assert parts <= st["ms_total"] * 1.001 + 0.05, st
    assert parts >= st["ms_total"] * 0.5, st  # the loop is what takes the time


def test_trace_layer_ms_per_layer():
    e = core.Engine(DEMO, n_threads=1)
    s = core.Session(e, 64)
    s.set_trace(cap_tokens=16)
    s.eval(list(range(1, 6)))
    s.eval([7])
    tr = s.trace()
    lm = np.asarray(tr["layer_ms"]).reshape(-1, 2)
    assert lm.shape[0] == 8 and (lm > 0).all(), lm


@pytest.mark.skipif(not core.cuda_available(), reason="no usable CUDA device")
def test_cuda_releases_the_host_dense_copy():
    """The CUDA backend uploads every dense tensor at open (fm_backend.host_dense 0): the host copy
    is released (never locked) and evals, prefill and graph decode alike, do not touch it."""
    cpu = core.Engine(DEMO, backend=0, n_threads=2)
    gpu = core.Engine(DEMO, backend=1)
    assert cpu.dense_bytes == gpu.dense_bytes and not gpu.dense_locked
    toks = list(range(3, 11))
    sc, sg = core.Session(cpu, 32), core.Session(gpu, 32)
    a, b = sc.eval(toks, all_logits=True), sg.eval(toks, all_logits=True)
    tol = 2e-4 * float(np.abs(a).max())
    assert float(np.abs(a - b).max()) <= tol
    tok = int(np.argmax(a[-1]))
    for _ in range(4):
        a, b = sc.eval([tok]), sg.eval([tok])
        assert float(np.abs(a - b).max()) <= tol
        tok = int(np.argmax(a))
