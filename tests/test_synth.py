"""`flashmoe synth`: random models at real dims load, run, stay finite, and are written in bounded memory.

References: the published dims (DESIGN.md section 3 table: block sizes, layer counts),
pyflashmoe.format's validator and dequantizer, the `gguf` package's reader and tensor tables, and
llama.cpp itself (through llama-cpp-python, when installed) loading and running the GGUF.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pyflashmoe import format as fmt
from pyflashmoe import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "pyflashmoe"] + args, cwd=ROOT, capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, test_data):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    r = _run(["synth", "--preset", "tiny", "--seed", "3", "-q", "--tokenizer", str(test_data.qwen35_tokenizer),
              str(out)])
    assert r.returncode == 0, r.stderr
    return out


def test_tiny_is_a_valid_model_dir(tiny):
    fmt.verify(str(tiny))              # sha256 of every file matches the manifest
    md = fmt.ModelDir(str(tiny))       # validates every tensor against the spec
    spec = md.spec
    assert spec.arch == "qwen3_5_moe" and spec.vocab_size == 248320
    # zero-centred norms are identity (stored 0), the plain gated norm is 1
    assert np.all(md.dense("blk.0.attn_norm") == 0) and np.all(md.dense("blk.0.ssm_norm") == 1)
    # expert weights: mean ~0, std ~1/sqrt(fan_in) after the format's own dequantizer
    H, I = spec.hidden_size, spec.moe_intermediate_size
    ws = [md.expert(0, e) for e in range(6)]
    for w in ws:
        assert abs(w["gate"].std() * np.sqrt(H) - 1) < 0.2
        assert abs(w["down"].std() * np.sqrt(I) - 1) < 0.2
        assert abs(w["up"].mean()) < 0.2 / np.sqrt(H) * 3
    # every expert computes a different function
    assert not np.array_equal(ws[0]["gate"], ws[4]["gate"])
    assert not np.array_equal(ws[1]["up"], ws[5]["up"])
    # dense matrix std ~1/sqrt(fan_in)
    q = md.dense("blk.3.attn_q")
    assert abs(q.std() * np.sqrt(H) - 1) < 0.1


def test_tiny_block_crc32(tiny):
    """Every expert block's zlib.crc32, as written, is in the manifest (read back here)."""
    import zlib
    m = json.loads((tiny / "pyflashmoe.json").read_text())
    spec = synth.preset_spec("tiny")
    assert sorted(int(k) for k in m["experts"]["layers"]) == spec.moe_layers()
    for k, L in m["experts"]["layers"].items():
        crcs = L["block_crc32"]
        assert isinstance(crcs, list) and len(crcs) == L["n_experts"] == spec.n_experts
        with open(tiny / L["file"], "rb") as f:
            f.seek(L["data_offset"])
            got = [zlib.crc32(f.read(L["block_bytes"])) for _ in range(L["n_experts"])]
        assert got == crcs, k
        assert len(set(crcs)) == len(crcs)


def test_tiny_runs_with_finite_logits(tiny):
    import pyflashmoe as fm
    with fm.Model.load(str(tiny), threads=2) as model:
        lg = model.logits(list(range(100, 120)))
        assert lg.shape == (20, 248320) and np.isfinite(lg).all()
        # activations neither vanish nor blow up: logits O(1)
        assert 0.1 < float(lg.std()) < 10
        pieces = list(model.generate("hi", max_tokens=8, temperature=0))
        assert sum(p.token is not None for p in pieces) >= 1
    r = _run(["run", str(tiny), "-p", "hi", "-n", "16", "--timing"])
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stderr


def test_presets_have_the_published_dims():
    # DESIGN.md section 3: 4-bit group-64 expert block sizes and totals
    for name, block, layers, n_exp in (("qwen3.5-397b-a17b", 7077888, 60, 512),
                                       ("qwen3.5-122b-a10b", 5308416, 48, 256),
                                       ("qwen3.5-35b-a3b", 1769472, 40, 256)):
        spec = synth.preset_spec(name)
        _, bb = synth._expert_layer_layout(spec, 4, 64)
        assert bb == block and spec.n_layers == layers and spec.n_experts == n_exp
        assert sum(l.attn == "full" for l in spec.layers) == layers // 4
        assert spec.rotary_dim == 64 and spec.head_dim == 256 and spec.rope_theta == 1e7
    with pytest.raises(Exception, match="--layers"):
        synth.preset_spec("qwen3.5-35b-a3b", layers=41)


def test_bounded_rss_on_a_cut_preset(tmp_path):
    """35B dims, one layer, cut vocab: ~530 MB written, peak RSS well below the largest file."""
    out = tmp_path / "m"
    # VmHWM (not ru_maxrss, which keeps the forking parent's peak across exec)
    code = ("from pyflashmoe.synth import synth; "
            f"synth({str(out)!r}, preset='qwen3.5-35b-a3b', layers=1, vocab=4096, progress=False); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1]) * 1024
    sizes = {p: os.path.getsize(out / p) for p in ("dense.safetensors", "experts/L000.safetensors")}
    assert sizes["experts/L000.safetensors"] == 4096 + 256 * 1769472
    assert peak < 0.6 * sizes["experts/L000.safetensors"], (peak, sizes)
    import pyflashmoe as fm
    with fm.Model.load(str(out), threads=2) as model:
        assert np.isfinite(model.logits([1, 2, 3])).all()


def test_interrupted_synth_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    code = ("import os, signal, threading; from pyflashmoe import synth as s\n"
            "orig = s._write_expert_file\n"
            "def boom(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "s._write_expert_file = boom\n"
            f"s.synth({str(out)!r}, preset='tiny', progress=False)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert not out.exists()
    with pytest.raises(Exception):
        fmt.validate(str(out))


def test_force_replaces_through_the_atomic_exchange(tmp_path, monkeypatch):
    """synth --force goes through format.AtomicDir like convert (tests/test_convert_kill.py): the
    old model stays complete at DST until the one call that swaps in the new one."""
    out = tmp_path / "m"
    synth.synth(str(out), preset="tiny", vocab=4096, seed=1, tokenizer="", progress=False)
    old = (out / "pyflashmoe.json").read_bytes()
    real, seen = fmt.exchange_dirs, []

    def spy(a, b):
        assert (out / "pyflashmoe.json").read_bytes() == old       # still the old, complete model
        fmt.verify(str(out))
        seen.append(real(a, b))
        return seen[-1]
    monkeypatch.setattr(fmt, "exchange_dirs", spy)
    with pytest.raises(Exception, match="--force"):
        synth.synth(str(out), preset="tiny", vocab=4096, seed=2, tokenizer="", progress=False)
    synth.synth(str(out), preset="tiny", vocab=4096, seed=2, tokenizer="", progress=False, force=True)
    assert len(seen) == 1
    m = json.loads((out / "pyflashmoe.json").read_text())
    assert m["source"]["seed"] == 2 and (out / "pyflashmoe.json").read_bytes() != old
    fmt.verify(str(out))
    assert os.listdir(tmp_path) == ["m"]


def test_tiny_gguf(tmp_path, test_data):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "tiny.gguf"
    # cut vocabulary: the test stays fast (the full one is 248k strings to write and parse)
    synth.write_gguf(str(p), preset="tiny", progress=False, vocab=4096,
                     tokenizer=str(test_data.qwen35_tokenizer))
    rd = gguf.GGUFReader(str(p))
    arch = rd.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen35moe"
    t = {x.name: x for x in rd.tensors}
    spec = synth.preset_spec("tiny")
    assert list(t["token_embd.weight"].shape) == [spec.hidden_size, 4096]
    g = t["blk.0.ffn_gate_exps.weight"]
    assert g.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert list(g.shape) == [spec.hidden_size, spec.moe_intermediate_size, spec.n_experts]
    # every tensor llama.cpp's qwen35moe loader asks for is present (names from gguf-py's tables)
    names = {gguf.TENSOR_NAMES[x] for x in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35MOE]}
    for n in t:
        base = n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n
        assert base.replace("blk.0.", "blk.{bid}.").replace("blk.3.", "blk.{bid}.").replace(
            "blk.1.", "blk.{bid}.").replace("blk.2.", "blk.{bid}.") in names, n
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=64, n_threads=2, verbose=False, logits_all=False)
    llm.eval([100, 101, 102])  # token ids < 4096
    lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    assert llm.n_vocab() == 4096
    assert np.isfinite(lg).all() and lg.std() > 0
