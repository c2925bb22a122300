"""Reliability guards of the C core (issue 9, items 3, 4 and 5).

* dense.safetensors is read into anonymous memory at open: truncating it while a model is loaded
  cannot SIGBUS the process, and the outputs stay the same;
* an expert file truncated (even to 0 bytes) after load gives ModelIOError naming the file;
* numerical guard: NaN in an expert block or in a dense tensor ends the request with NumericalError
  naming the layer (or the embedding / the logits) and the position; the session is reset, and once
  the file is restored the next request (a continued conversation included) equals a fresh model;
* the C manifest reader: file paths outside the model dir, misaligned / header-overlapping tensor
  offsets, a moved expert data_offset, absurd spec dimensions and out-of-range floats are
  FormatErrors naming the field (never an out-of-bounds read).
Models come from `pyflashmoe.synth` (preset "tiny", vocab cut to 1024: no torch needed).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

core = pytest.importorskip("pyflashmoe._core")
if not hasattr(core, "Engine"):
    pytest.skip("pyflashmoe._core was built without the engine", allow_module_level=True)

from pyflashmoe.errors import FormatError, ModelIOError, NumericalError  # noqa: E402
from pyflashmoe.generate import Model  # noqa: E402
from pyflashmoe.synth import synth  # noqa: E402

CTX = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("guards") / "tiny")
    synth(out, preset="tiny", vocab=1024, bits=4, group_size=64, progress=False)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _manifest(d):
    with open(os.path.join(d, "pyflashmoe.json")) as f:
        return json.load(f)


def _write_manifest(d, man):
    with open(os.path.join(d, "pyflashmoe.json"), "w") as f:
        json.dump(man, f)


def _greedy(m, ids, n=6):
    return [p.token for p in m.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)]


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 1000, size=n).tolist()


def _load(d, **kw):
    return Model(core.Engine(d, n_threads=2, **kw), lambda e, n: core.Session(e, n),
                 spec=_manifest(d)["spec"], context_length=CTX, path=d)


def _moe_layer(d):
    lays = _manifest(d)["experts"]["layers"]
    il = min(lays, key=int)
    return int(il), lays[il]


def _fill(path, off, nbytes, byte=0xFF):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(bytes([byte]) * nbytes)


def _spans(entry):
    """(offset, nbytes) of every data span of a manifest tensor entry (0xFF bytes there are NaN for
    f32 and bf16 data and for affine scales)."""
    if entry["dtype"] == "affine":
        return [tuple(entry[k]) for k in ("q", "scales", "biases")]
    return [(entry["offset"], entry["nbytes"])]


# ------------------------------------------------------------------------------ dense: no SIGBUS

_TRUNCATE_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import numpy as np
    from pyflashmoe import _core as core
    from pyflashmoe.generate import Model
    d = sys.argv[1]
    spec = json.load(open(os.path.join(d, "pyflashmoe.json")))["spec"]
    m = Model(core.Engine(d, n_threads=2), lambda e, n: core.Session(e, n), spec=spec,
              context_length=64, path=d)
    ids = [5, 17, 99, 3, 42, 7, 300, 12]
    gen = lambda: [p.token for p in m.generate(ids, max_tokens=6, temperature=0, ignore_eos=True)]
    a, la = gen(), m.logits(ids)
    os.truncate(os.path.join(d, "dense.safetensors"), 16)
    b, lb = gen(), m.logits(ids)
    print("SAME" if a == b and np.array_equal(la, lb) else f"DIFFERENT {a} {b}", flush=True)
""")


def test_dense_truncated_while_loaded_does_not_kill_the_process(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_SCRIPT, d], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"process died (status {r.returncode}): {r.stderr[-2000:]}"
    assert r.stdout.strip().endswith("SAME"), r.stdout + r.stderr[-2000:]
    # and a fresh load of the truncated file is a clear error naming it
    with pytest.raises(FormatError, match=r"dense\.safetensors"):
        core.Engine(d, n_threads=2)


def test_dense_weights_are_not_mapped_from_the_file(tiny):
    eng = core.Engine(tiny, n_threads=2)
    size = os.path.getsize(os.path.join(tiny, "dense.safetensors"))
    assert eng.dense_bytes == size
    with open(f"/proc/{os.getpid()}/maps") as f:
        maps = f.read()
    assert "dense.safetensors" not in maps
    del eng


def test_dense_file_shorter_than_manifest_without_size_check_is_an_error(tiny, tmp_path):
    # the manifest size check is on by default; even a file cut after a matching size entry is read
    # whole, so a short file is a FormatError/ModelIOError at open, never a later fault
    d = _copy(tiny, tmp_path / "m")
    p = os.path.join(d, "dense.safetensors")
    man = _manifest(d)
    os.truncate(p, os.path.getsize(p) // 2)
    man["files"]["dense.safetensors"]["size"] = os.path.getsize(p)
    _write_manifest(d, man)
    with pytest.raises(FormatError, match=r"dense\.safetensors.*beyond the end"):
        core.Engine(d, n_threads=2)


# ------------------------------------------------------------------------------ expert files

def test_expert_file_truncated_to_zero_after_load(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    il, lay = _moe_layer(d)
    path = os.path.join(d, lay["file"])
    good = open(path, "rb").read()
    m = _load(d)
    ids = _ids(12, 1)
    ref = _greedy(m, ids)
    os.truncate(path, 0)
    with pytest.raises(ModelIOError, match=lay["file"].replace(".", r"\.") + r".*short read"):
        _greedy(m, ids)
    assert m.session.pos == 0
    with open(path, "wb") as f:
        f.write(good)
    assert _greedy(m, ids) == ref


# ------------------------------------------------------------------------------ numerical guard

def test_nan_expert_block_raises_numerical_error_and_state_is_not_reused(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    il, lay = _moe_layer(d)
    path = os.path.join(d, lay["file"])
    good = open(path, "rb").read()
    fresh = _load(tiny)
    m = _load(d)
    turn1 = _ids(20, 2)
    reply1 = _greedy(m, turn1)
    assert reply1 == _greedy(fresh, turn1)
    turn2 = turn1 + reply1 + _ids(10, 3)
    want2 = _greedy(fresh, turn2)
    # NaN (0xFF bytes: bf16 NaN scales) over every expert block of the first MoE layer
    _fill(path, lay["data_offset"], lay["n_experts"] * lay["block_bytes"])
    layer_re = rf"layer {il} \((linear|full) attention \+ moe\): non-finite hidden state at position \d+"
    with pytest.raises(NumericalError, match=layer_re + r".*flashmoe verify"):
        _greedy(m, turn2)  # a continued conversation: only the new tokens are evaluated
    assert m.session.pos == 0 and m._held == []
    with pytest.raises(NumericalError, match=layer_re):
        m.logits(turn1)
    with pytest.raises(NumericalError, match=layer_re):
        _greedy(m, turn1)  # prefill from scratch
    # restored: the next request is evaluated from scratch and equals a fresh model
    with open(path, "wb") as f:
        f.write(good)
    assert _greedy(m, turn2) == want2
    # nothing of the poisoned session is reused; the state of turn1's prompt that the pool saved
    # before the damage (pyflashmoe/prefix.py) may be
    assert m.stats["cached_tokens"] in (0, len(turn1))
    turn3 = turn2 + want2 + _ids(5, 4)
    assert _greedy(m, turn3) == _greedy(fresh, turn3)
    np.testing.assert_array_equal(m.logits(turn1), fresh.logits(turn1))


def test_nan_in_one_expert_block_mid_decode(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    il, lay = _moe_layer(d)
    path = os.path.join(d, lay["file"])
    m = _load(d)
    ids = _ids(24, 5)
    gen = m.generate(ids, max_tokens=40, temperature=0, ignore_eos=True)
    next(gen)  # prefill done
    for e in range(lay["n_experts"]):  # one block at a time: the decode steps will route to one
        _fill(path, lay["data_offset"] + e * lay["block_bytes"], lay["block_bytes"])
    with pytest.raises(NumericalError, match=rf"layer {il} \("):
        for _ in gen:
            pass
    assert m.session.pos == 0


@pytest.mark.parametrize("tensor,where", [
    ("blk.2.attn_norm", r"layer 2 \((linear|full) attention \+ moe\): non-finite hidden state at position 0"),
    ("blk.1.ffn_router", r"layer 1 \((linear|full) attention \+ moe\): non-finite hidden state at position 0"),
    ("output_norm", r"logits \(final norm \+ lm_head\): non-finite value at position \d+"),
    ("tok_embd", r"token embedding: non-finite hidden state at position 0"),
])
def test_nan_in_dense_tensor_names_the_stage(tiny, tmp_path, tensor, where):
    d = _copy(tiny, tmp_path / "m")
    dense = os.path.join(d, "dense.safetensors")
    good = open(dense, "rb").read()
    for off, nb in _spans(_manifest(d)["tensors"][tensor]):
        _fill(dense, off, nb)
    m = _load(d)
    ids = _ids(16, 6)
    with pytest.raises(NumericalError, match=where):
        _greedy(m, ids)
    assert m.session.pos == 0 and m._held == []
    with pytest.raises(NumericalError, match=where):
        m.logits(ids)
    with pytest.raises(NumericalError, match=where):
        m.session.eval(ids[:1])  # decode-sized call
    # restored and reloaded (dense weights are read at open): the same as a fresh model
    with open(dense, "wb") as f:
        f.write(good)
    assert _greedy(_load(d), ids) == _greedy(_load(tiny), ids)


def test_nan_embedding_row_reports_the_position(tiny, tmp_path):
    """Only token `bad`'s embedding row is NaN: the error names the position where it is fed."""
    d = _copy(tiny, tmp_path / "m")
    man = _manifest(d)
    e = man["tensors"]["tok_embd"]
    if e["dtype"] != "bf16":
        pytest.skip(f"tok_embd is {e['dtype']} in this synth model")
    H = man["spec"]["hidden_size"]
    bad = 777
    _fill(os.path.join(d, "dense.safetensors"), e["offset"] + bad * H * 2, H * 2)
    ses = core.Session(core.Engine(d, n_threads=2), CTX)
    ids = [t if t != bad else 3 for t in _ids(60, 9)]
    emb = r"token embedding: non-finite hidden state at position "
    for at in (0, 9, 50):
        with pytest.raises(NumericalError, match=emb + rf"{at}\b"):
            ses.eval(ids[:at] + [bad] + ids[at:at + 5])
        assert ses.pos == 0
    for t in ids[:4]:
        ses.eval([t])
    with pytest.raises(NumericalError, match=emb + r"4\b"):
        ses.eval([bad])
    assert ses.pos == 0


def test_session_reset_after_numerical_error_leaves_nothing(tiny, tmp_path):
    """After a NumericalError in the middle of a long prefill the C session is back at position 0
    and its KV rows / recurrent state are clean: the same Session then gives bit-identical logits."""
    d = _copy(tiny, tmp_path / "m")
    il, lay = _moe_layer(d)
    path = os.path.join(d, lay["file"])
    good = open(path, "rb").read()
    eng = core.Engine(d, n_threads=2)
    ses = core.Session(eng, CTX)
    ids = np.array(_ids(40, 7), dtype=np.int32)
    ref = core.Session(core.Engine(tiny, n_threads=2), CTX).eval(ids, all_logits=True)
    ses.eval(ids[:30])
    _fill(path, lay["data_offset"], lay["n_experts"] * lay["block_bytes"])
    with pytest.raises(NumericalError, match=r"position (3\d)\b.*reset to position 0"):
        ses.eval(ids[30:])
    assert ses.pos == 0
    with open(path, "wb") as f:
        f.write(good)
    np.testing.assert_array_equal(ses.eval(ids, all_logits=True), ref)


# ------------------------------------------------------------------------------ manifest reader

@pytest.mark.parametrize("name", ["../L000.safetensors", "/etc/passwd", "experts/../../x.safetensors",
                                  "experts/..", ""])
def test_expert_path_outside_model_dir_rejected(tiny, tmp_path, name):
    d = _copy(tiny, tmp_path / "m")
    man = _manifest(d)
    il = min(man["experts"]["layers"], key=int)
    man["experts"]["layers"][il]["file"] = name
    _write_manifest(d, man)
    with pytest.raises(FormatError, match=rf'experts\.layers\["{il}"\]\.file'):
        core.Engine(d, n_threads=2)


def test_dotted_but_inside_path_still_loads(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    man = _manifest(d)
    il = min(man["experts"]["layers"], key=int)
    lay = man["experts"]["layers"][il]
    os.rename(os.path.join(d, lay["file"]), os.path.join(d, "experts", "a..b.safetensors"))
    lay["file"] = "./experts/a..b.safetensors"
    _write_manifest(d, man)
    eng = core.Engine(d, n_threads=2)
    core.Session(eng, 8).eval([1, 2, 3])


def _mutate(tiny, tmp_path, fn):
    d = _copy(tiny, tmp_path / "m")
    man = _manifest(d)
    fn(man)
    _write_manifest(d, man)
    return d


@pytest.mark.parametrize("mut,msg", [
    # a dense offset moved by one byte (issue 9 item 4: it used to load and give garbage)
    (lambda m: m["tensors"]["blk.0.attn_norm"].__setitem__("offset", m["tensors"]["blk.0.attn_norm"]["offset"] + 1),
     r'tensors\["blk\.0\.attn_norm"\]\.nbytes offset \d+ is not a multiple of 64'),
    (lambda m: m["tensors"]["output_norm"].__setitem__("offset", 0),
     r'tensors\["output_norm"\]\.nbytes offset 0 is inside the safetensors header'),
    (lambda m: m["tensors"]["output_norm"].__setitem__("offset", 2 ** 53),
     r'tensors\["output_norm"\].*(beyond the end|invalid)'),
    # an expert data_offset moved by a page: blocks would be read shifted
    (lambda m: m["experts"]["layers"][min(m["experts"]["layers"], key=int)].__setitem__(
        "data_offset", m["experts"]["layers"][min(m["experts"]["layers"], key=int)]["data_offset"] + 4096),
     r"safetensors data starts at byte 4096 but pyflashmoe\.json experts\.layers"),
    (lambda m: m["experts"]["layers"][min(m["experts"]["layers"], key=int)].__setitem__("block_bytes", 2 ** 52),
     r"block_bytes"),
    (lambda m: m["experts"]["layers"][min(m["experts"]["layers"], key=int)]["parts"]["up"]["q"].__setitem__(0, 4),
     r"parts\.up\.q must be \[offset, \d+\] inside the \d+-byte block, 64-byte aligned"),
    (lambda m: m["spec"].__setitem__("hidden_size", 10 ** 9), r"spec\.hidden_size = 1e\+09 is not an integer in"),
    (lambda m: m["spec"].__setitem__("n_layers", 2 ** 31 - 1), r"spec\.n_layers"),
    (lambda m: m["spec"].__setitem__("vocab_size", 2 ** 30), r"spec\.vocab_size"),
    (lambda m: m["spec"].__setitem__("n_experts", 10 ** 7), r"spec\.n_experts"),
    (lambda m: m["spec"].__setitem__("rms_norm_eps", 1e300), r"spec\.rms_norm_eps = 1e\+300 is out of range"),
    (lambda m: m["spec"].__setitem__("rope_theta", -1e39), r"spec\.rope_theta"),
])
def test_manifest_reader_rejects(tiny, tmp_path, mut, msg):
    d = _mutate(tiny, tmp_path, mut)
    with pytest.raises(FormatError, match=msg):
        core.Engine(d, n_threads=2)


def test_dense_header_length_beyond_file(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    _fill(os.path.join(d, "dense.safetensors"), 0, 8)  # header length 2^64 - 1
    with pytest.raises(FormatError, match=r"dense\.safetensors: safetensors header length \d+ exceeds"):
        core.Engine(d, n_threads=2)


def test_dense_not_a_regular_file(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "m")
    p = os.path.join(d, "dense.safetensors")
    os.unlink(p)
    os.mkfifo(p)  # would block a plain open() forever
    with pytest.raises(FormatError, match=r"dense\.safetensors: .*not a regular file"):
        core.Engine(d, n_threads=2)


# ------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0.7), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.0, top_p=0.5, min_p=0.1, repetition_penalty=1.3)])
def test_sampler_rejects_unsamplable_rows(kw):
    from pyflashmoe.sampling import Sampler, SamplingParams
    s = Sampler(SamplingParams(seed=0, **kw))
    s.add_seen([1, 2])
    with pytest.raises(NumericalError, match="every logit is -inf"):
        s.sample(np.full(50, -np.inf, dtype=np.float32))
    with pytest.raises(NumericalError, match="NaN"):
        s.sample(np.array([0.5, np.nan, 1.0], dtype=np.float32))
    assert s.sample(np.array([-np.inf, 2.0, -np.inf], dtype=np.float32)) == 1


def test_processor_masking_every_token_is_a_clear_error(tiny):
    m = _load(tiny)
    ids = _ids(10, 8)
    ref = _greedy(m, ids)
    mask_all = lambda generated, logits: np.full_like(logits, -np.inf)  # noqa: E731
    for temp in (0, 0.8):
        with pytest.raises(NumericalError, match="all tokens are masked"):
            list(m.generate(ids, max_tokens=4, temperature=temp, logits_processor=mask_all))
    assert _greedy(m, ids) == ref
