"""Issue 9 items 4, 5 (verify) and 7: the model-dir and config readers.

* one validate() (every offset / size / dtype against the file it lives in) that Model.load,
  `info` and `verify` go through, so a hand-moved offset is a FormatError, never garbage output;
* no path outside the model dir (`..`, absolute, symlinks) in info / verify / load;
* verify checks the manifest digest; `verify --quick` checks sampled expert block CRCs;
* config.json / manifest / safetensors / checkpoint-index readers raise only project errors that
  name the file and field, with bounds on every count before anything is allocated;
* the reproducers the fuzz harness (tools/fuzz) found.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from pyflashmoe import format as fmt
from pyflashmoe.errors import (ArgumentError, FlashMoEError, FormatError, UnsupportedModelError)
from pyflashmoe.models import ModelSpec, spec_from_config

torch = pytest.importorskip("torch")
from tiny_models import make_tiny_hf  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.convert import convert  # noqa: E402
from pyflashmoe.convert.reader import Checkpoint  # noqa: E402
from pyflashmoe.generate import Model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _add_block_crcs(d):
    """block_crc32 for every expert layer that lacks it (older writers), digest rewritten."""
    m = fmt.read_manifest(d)
    for L in m["experts"]["layers"].values():
        if "block_crc32" not in L:
            with open(os.path.join(d, L["file"]), "rb") as f:
                f.seek(L["data_offset"])
                L["block_crc32"] = [zlib.crc32(f.read(L["block_bytes"])) for _ in range(L["n_experts"])]
    fmt.write_manifest(d, m)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    base = tmp_path_factory.mktemp("mdc")
    src, cfg = make_tiny_hf("qwen3_next", base / "hf", seed=5, mlp_only_layers=[1])
    return src, cfg


@pytest.fixture(scope="module")
def model_dir(hf_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mdc_out") / "m"
    convert(hf_src[0], dst, bits=4, group_size=32, progress=False)
    _add_block_crcs(dst)
    return dst


def _copy(model_dir, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(model_dir, d, symlinks=True)
    return d


def _edit(d, fn, keep_digest=False):
    p = d / "pyflashmoe.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pyflashmoe", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def _bf16_matrix(m):
    return next(n for n, e in m["tensors"].items() if e["dtype"] == "bf16" and len(e["shape"]) == 2)


# ---- 1. one validate, called by Model.load --------------------------------------------------------

def test_model_load_rejects_moved_tensor_offset(model_dir, tmp_path):
    """Before: the C core mapped the moved (in-bounds, aligned) offset and generated garbage."""
    d = _copy(model_dir, tmp_path)
    with Model.load(d, threads=1) as m:
        ref = m.logits([1, 2, 3])
    name = _bf16_matrix(json.loads((d / "pyflashmoe.json").read_text()))
    _edit(d, lambda m: m["tensors"][name].__setitem__("offset", m["tensors"][name]["offset"] + 64))
    with pytest.raises(FormatError) as ei:
        Model.load(d, threads=1)
    assert name in str(ei.value) and "dense.safetensors" in str(ei.value)
    assert np.isfinite(ref).all()


@pytest.mark.parametrize("edit,needles", [
    # an offset moved to 4097 (the example): not 64-aligned and not where the header says
    (lambda m, n: m["tensors"][n].__setitem__("offset", 4097), ["offset"]),
    # the expert data start moved by one page: inside the file, but the header disagrees
    (lambda m, n: m["experts"]["layers"]["0"].__setitem__("data_offset",
                                                          m["experts"]["layers"]["0"]["data_offset"] + 4096),
     ["experts.layers['0']", "data_offset"]),
    # two parts of an expert block overlapping
    (lambda m, n: m["experts"]["layers"]["2"]["parts"]["up"].__setitem__(
        "q", list(m["experts"]["layers"]["2"]["parts"]["gate"]["q"])), ["overlap"]),
    # expert bits changed without the data: sizes no longer match
    (lambda m, n: m["experts"]["layers"]["0"]["parts"]["down"].__setitem__("bits", 8), ["parts.down"]),
    (lambda m, n: m["experts"]["layers"]["0"].__setitem__("block_crc32", [1, 2]), ["block_crc32"]),
    (lambda m, n: m["experts"]["layers"]["0"].__setitem__("n_experts", 8.0), ["n_experts"]),
    (lambda m, n: m["tensors"].__setitem__("blk.99.attn_q", dict(m["tensors"][n])), ["unexpected", "blk.99"]),
    # layer 3 reading layer 2's experts (same shapes, so every header check alone passes)
    (lambda m, n: m["experts"]["layers"]["3"].__setitem__("file", m["experts"]["layers"]["2"]["file"]),
     ["experts.layers['3']", "already the file of experts.layers['2']"]),
])
def test_validate_and_load_reject(model_dir, tmp_path, edit, needles):
    d = _copy(model_dir, tmp_path)
    name = _bf16_matrix(json.loads((d / "pyflashmoe.json").read_text()))
    _edit(d, lambda m: edit(m, name))
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError) as ei:
            fn(d)
        for s in needles:
            assert s in str(ei.value), (s, str(ei.value))


def test_validate_cost_is_header_reads_only(tmp_path):
    """validate() reads the manifest and the safetensors headers, never the data (Model.load runs
    it every time): bytes read (/proc/self/io rchar) stay a small fraction of the model."""
    from pyflashmoe.synth import synth
    out = tmp_path / "syn"
    synth(out, preset="tiny", vocab=1024, tokenizer="", progress=False)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    fmt.validate(out)
    try:
        def rchar():
            with open("/proc/self/io") as f:
                return int(next(l for l in f if l.startswith("rchar")).split()[1])
        a = rchar()
    except (OSError, StopIteration):
        pytest.skip("no /proc/self/io to count bytes read")
    t = time.perf_counter()
    fmt.validate(out)
    dt = time.perf_counter() - t
    read = rchar() - a
    assert read < 200_000 and read < total / 10, (read, total)
    assert dt < 1.0, dt


# ---- 2. paths outside the model dir --------------------------------------------------------------

def _listed_as(d, rel, src=None):
    """Make files[rel] describe `src` (default /etc/passwd) with its true size, as an attacker would."""
    src = src or "/etc/passwd"
    size = os.path.getsize(src)
    m = json.loads((d / "pyflashmoe.json").read_text())
    m["files"][rel] = {"size": size, "sha256": "0" * 64}
    fmt.write_manifest(d, m)             # with a matching digest: the path check must catch it


@pytest.mark.parametrize("rel", ["../../../../etc/passwd", "/etc/passwd", "experts/../../x",
                                 "./dense.safetensors", "experts//L000.safetensors", "a\\b", ""])
def test_paths_outside_the_dir_are_rejected_everywhere(model_dir, tmp_path, rel):
    d = _copy(model_dir, tmp_path)
    _listed_as(d, rel)
    for fn in (fmt.validate, fmt.info_text, fmt.verify, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError) as ei:
            fn(d)
        assert "path" in str(ei.value), str(ei.value)
    r = _cli("info", d)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "passwd" not in r.stdout, r.stdout + r.stderr


def test_expert_file_path_outside_the_dir(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    _edit(d, lambda m: m["experts"]["layers"]["0"].__setitem__("file", "../m/experts/L000.safetensors"))
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError, match=r"experts.layers\['0'\].file"):
            fn(d)


def test_symlink_leaving_the_dir_is_rejected(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(d / "experts" / "L000.safetensors", outside)
    os.symlink(outside, d / "experts" / "L000.safetensors")
    with pytest.raises(FormatError, match="outside the model dir"):
        fmt.validate(d)
    r = _cli("info", d)
    assert r.returncode == 2 and "outside the model dir" in r.stderr, r.stderr
    # a symlink that stays inside the dir is fine
    d2 = _copy(model_dir, tmp_path, "m2")
    shutil.move(d2 / "experts" / "L000.safetensors", d2 / "L000.real")
    os.symlink("../L000.real", d2 / "experts" / "L000.safetensors")
    fmt.validate(d2)


# ---- 3. the manifest digest ------------------------------------------------------------------------

def test_writers_record_the_manifest_digest(model_dir):
    m = json.loads((model_dir / "pyflashmoe.json").read_text())
    assert m["manifest_sha256"] == fmt.manifest_digest(m)
    canon = json.dumps({k: v for k, v in m.items() if k != "manifest_sha256"}, sort_keys=True,
                       separators=(",", ":")).encode()
    import hashlib
    assert m["manifest_sha256"] == hashlib.sha256(canon).hexdigest()


def test_verify_detects_hand_edited_manifest(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    assert fmt.verify(d)["mode"] == "full"
    # an edit validate cannot see (a consistent but different eps) is caught by the digest
    _edit(d, lambda m: m["spec"].__setitem__("rms_norm_eps", 1e-5))
    fmt.validate(d)
    for quick in (False, True):
        with pytest.raises(FormatError, match="manifest_sha256.*modified"):
            fmt.verify(d, quick=quick)
    r = _cli("verify", d, "-q")
    assert r.returncode == 2 and "modified" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_verify_without_digest_says_reconvert(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    _edit(d, lambda m: m.pop("manifest_sha256"))
    fmt.validate(d)                      # still loads
    with pytest.raises(FormatError, match="no field manifest_sha256.*reconvert"):
        fmt.verify(d)
    assert "no digest" in fmt.info_text(d)


# ---- 4. block checksums: verify and verify --quick -----------------------------------------------

@pytest.mark.parametrize("damage", ["zeros", "random"])
def test_verify_quick_and_full_catch_a_damaged_expert_block(model_dir, tmp_path, damage):
    d = _copy(model_dir, tmp_path)
    m = fmt.read_manifest(d)
    L = m["experts"]["layers"]["2"]
    rep = fmt.verify(d, quick=True, sample="all")
    assert rep["blocks_checked"] == sum(x["n_experts"] for x in m["experts"]["layers"].values())
    assert rep["files_hashed"] == ["dense.safetensors"]
    e = 5
    bb = L["block_bytes"]
    blob = b"\0" * bb if damage == "zeros" else np.random.default_rng(0).bytes(bb)
    with open(d / L["file"], "r+b") as f:
        f.seek(L["data_offset"] + e * bb)
        f.write(blob)
    fmt.validate(d)                       # sizes and headers are intact
    with pytest.raises(FormatError, match=r"expert 5 of layer 2.*block_crc32\[5\]"):
        fmt.verify(d, quick=True, sample="all")
    with pytest.raises(FormatError, match=r"expert 5 of layer 2"):
        fmt.verify(d)
    r = _cli("verify", d, "--quick", "--sample", "all", "-q")
    assert r.returncode == 2 and "expert 5 of layer 2" in r.stderr, r.stdout + r.stderr
    r = _cli("verify", d, "-q")
    assert r.returncode == 2 and "expert 5 of layer 2" in r.stderr, r.stdout + r.stderr


def test_verify_quick_sampling_options(model_dir):
    rep = fmt.verify(model_dir, quick=True, sample=2, seed=1)
    n_layers = len(fmt.read_manifest(model_dir)["experts"]["layers"])
    assert rep["blocks_checked"] == 2 * n_layers and rep["mode"] == "quick"
    assert fmt.verify(model_dir, quick=True, sample=0.5)["blocks_checked"] == 4 * n_layers
    assert fmt.verify(model_dir, quick=True, sample="25%")["blocks_checked"] == 2 * n_layers
    for bad in (0, -1, 1.5, "lots", True):
        with pytest.raises(ArgumentError, match="sample"):
            fmt.verify(model_dir, quick=True, sample=bad)
    r = _cli("verify", model_dir, "--quick", "--sample", "3", "--seed", "7", "-q")
    assert r.returncode == 0 and "quick check passed" in r.stdout, r.stdout + r.stderr


# ---- 5. config.json readers ------------------------------------------------------------------------

@pytest.mark.parametrize("over,needle", [
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_size": 1 << 40}, "hidden_size"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"num_experts": 1 << 20}, "num_experts"),
    ({"num_experts_per_tok": 99}, "n_experts_per_tok"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    ({"head_dim": None, "num_attention_heads": 1000}, "head_dim"),
    ({"num_attention_heads": 3}, "n_heads"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
    ({"rope_parameters": {"rope_theta": -1.0}}, "rope_theta"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 7}}, "partial_rotary_factor"),
    ({"full_attention_interval": 0, "layer_types": None}, "full_attention_interval"),
    ({"layer_types": ["sliding_attention"] * 4}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"mlp_only_layers": [99]}, "mlp_only_layers"),
    ({"mlp_only_layers": "0"}, "mlp_only_layers"),
    ({"decoder_sparse_step": 1.5}, "decoder_sparse_step"),
    ({"linear_num_value_heads": 3}, "linear_n_v_heads"),
    ({"linear_conv_kernel_dim": 1000}, "linear_conv_kernel_dim"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"eos_token_id": list(range(5000))}, "eos_token_id"),
    ({"text_config": 5}, "text_config"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
])
def test_bad_config_is_a_format_error_naming_the_field(hf_src, over, needle):
    cfg = dict(hf_src[1], **over)
    with pytest.raises(FormatError) as ei:
        spec_from_config(cfg)
    assert needle in str(ei.value) and "config.json" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("mt", [["qwen3_moe"], {"a": 1}, 5, None])
def test_bad_model_type(hf_src, mt):
    with pytest.raises((UnsupportedModelError, FormatError), match="model_type"):
        spec_from_config(dict(hf_src[1], model_type=mt))


def test_convert_with_a_billion_layers_fails_fast(hf_src, tmp_path):
    """Before: 20+ s and 3.8 GB, then a raw MemoryError."""
    src = tmp_path / "src"
    shutil.copytree(hf_src[0], src)
    cfg = dict(hf_src[1], num_hidden_layers=1e9)
    (src / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(FormatError, match=r"config.json.*num_hidden_layers"):
        convert(src, tmp_path / "out", progress=False)
    assert time.perf_counter() - t < 5
    r = _cli("convert", src, tmp_path / "out2", "-q")
    assert r.returncode == 2 and "num_hidden_layers" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("files,needle", [
    ({"model.safetensors.index.json": json.dumps({"weight_map": ["a"]})}, "weight_map"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"a": {"a": "model.safetensors"}}})},
     "weight_map"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"a": "../outside.safetensors"}})},
     "inside the checkpoint"),
    ({"model.safetensors.index.json": json.dumps({"weight_map": {"a": "/etc/passwd"}})}, "inside the checkpoint"),
    ({"model.safetensors.index.json": "[" * 100000}, "JSON"),
    ({"model.safetensors.index.json": '{"weight_map": {"a": ' + "9" * 5000 + "}}"}, "JSON"),
    ({"config.json": "[" * 100000}, "config.json"),
    ({"config.json": json.dumps({"model_type": "qwen3_moe", "quantization_config": [1]})},
     "quantization_config"),
    ({"config.json": json.dumps({"model_type": "qwen3_moe",
                                 "quantization_config": {"weight_block_size": [0, 128]}})}, "weight_block_size"),
    ({"config.json": json.dumps({"model_type": "qwen3_moe", "quantization": {"mode": ["x"]}})}, "mode"),
], ids=["weight_map-list", "weight_map-value-dict", "shard-dotdot", "shard-absolute", "index-deep-nesting",
        "index-huge-int", "config-deep-nesting", "quantization_config-list", "weight_block_size-0",
        "quantization-mode-list"])
def test_checkpoint_reader_errors(hf_src, tmp_path, files, needle):
    src = tmp_path / "src"
    shutil.copytree(hf_src[0], src)
    for n, text in files.items():
        (src / n).write_text(text)
    with pytest.raises(FormatError) as ei:
        Checkpoint(src)
    assert needle in str(ei.value), str(ei.value)


# ---- 5. manifest and safetensors header readers ---------------------------------------------------

@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["spec"].__setitem__("n_layers", 4.0), "n_layers"),
    (lambda m: m["spec"].__setitem__("n_layers", True), "n_layers"),
    (lambda m: m["spec"].__setitem__("hidden_size", 1 << 40), "hidden_size"),
    (lambda m: m["spec"].__setitem__("layers", {"a": 1}), "layers"),
    (lambda m: m["spec"].__setitem__("layers", [{"attn": "full"}] * 4), "layers[0]"),
    (lambda m: m["spec"].__setitem__("layers", [[1]] * 4), "layers[0]"),
    (lambda m: m["spec"].__setitem__("eos_token_ids", 5), "eos_token_ids"),
    (lambda m: m["spec"].__setitem__("eos_token_ids", ["x"]), "eos_token_ids"),
    (lambda m: m["spec"].__setitem__("arch", {"a": 1}), "arch"),
    (lambda m: m["spec"].__setitem__("rope_theta", 1e13), "rope_theta"),
    (lambda m: m["spec"].__setitem__("rms_norm_eps", -1), "rms_norm_eps"),
    (lambda m: m["spec"].__setitem__("norm_offset", 0.0), "norm_offset"),
    (lambda m: m["spec"].__setitem__("rotary_dim", 3), "rotary_dim"),
    (lambda m: m["spec"].__setitem__("n_experts_per_tok", 9), "n_experts_per_tok"),
    (lambda m: m["spec"].__setitem__("tie_word_embeddings", "yes"), "tie_word_embeddings"),
    (lambda m: m.__setitem__("spec", [1]), "spec"),
    (lambda m: m.__setitem__("format_version", 1.0), "format_version"),
    (lambda m: m["tensors"].__setitem__("output_norm", [1]), "output_norm"),
    (lambda m: m["tensors"]["output_norm"].__setitem__("shape", [True] * 1), "output_norm"),
    (lambda m: m["tensors"]["output_norm"].__setitem__("offset", "0"), "output_norm"),
    (lambda m: m["tensors"]["output_norm"].__setitem__("dtype", ["f32"]), "dtype"),
    (lambda m: m["tensors"]["output_norm"].__setitem__("dtype", "bf16"), "dtype"),
    (lambda m: m["experts"].__setitem__("layers", []), "experts.layers"),
    (lambda m: m["experts"]["layers"].__setitem__("x", {}), "experts.layers"),
    (lambda m: m["experts"]["layers"].__setitem__("0", 7), "experts.layers['0']"),
    (lambda m: m["experts"]["layers"]["0"].__setitem__("parts", [1]), "parts"),
    (lambda m: m["experts"]["layers"]["0"]["parts"].__setitem__("gate", "x"), "parts.gate"),
    (lambda m: m["experts"]["layers"]["0"]["parts"]["gate"].__setitem__("q", [0, True]), "parts.gate"),
    (lambda m: m["experts"]["layers"]["0"].__setitem__("file", 5), "file"),
    (lambda m: m["experts"]["layers"]["0"].__setitem__("block_bytes", 1 << 80), "block_bytes"),
    (lambda m: m["files"].__setitem__("dense.safetensors", 5), "dense.safetensors"),
    (lambda m: m["quantization"].__setitem__("experts", [4]), "quantization.experts"),
    (lambda m: m.__setitem__("manifest_sha256", 5), "manifest_sha256"),
])
def test_bad_manifest_is_a_format_error_naming_the_field(model_dir, tmp_path, edit, needle):
    d = _copy(model_dir, tmp_path)
    _edit(d, edit)
    for fn in (fmt.validate, fmt.info_text):
        with pytest.raises(FormatError) as ei:
            fn(d)
        assert needle in str(ei.value) and "pyflashmoe.json" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("text", ["[" * 200000, '{"format": ' + "1" * 5000 + "}", "\xff\xfe", "8", '"x"', "null"],
                         ids=["deep-nesting", "5000-digit-int", "not-utf8", "top-level-int", "top-level-str",
                              "top-level-null"])
def test_unparseable_manifest(model_dir, tmp_path, text):
    d = _copy(model_dir, tmp_path)
    (d / "pyflashmoe.json").write_bytes(text.encode("latin-1"))
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        # (a top-level scalar made the strict parser's depth walk raise TypeError: fuzz finding)
        with pytest.raises(FormatError, match="pyflashmoe.json.*(JSON|format|spec)"):
            fn(d)


def _st(header_obj, data=b"", raw=None):
    h = raw if raw is not None else json.dumps(header_obj).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob,needle", [
    (_st({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    (_st({"a": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 16]}}, b"\0" * 16), "shape"),
    (_st({"a": {"dtype": "F32", "shape": [2] * 40, "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    (_st({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
    (_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, True]}}, b"\0" * 8), "data_offsets"),
    (_st({"__metadata__": [1], "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}), "__metadata__"),
    (_st(None, raw=b"[" * 100000), "JSON"),
    (_st(None, raw=b'{"a": ' + b"7" * 5000 + b"}"), "JSON"),
    (_st(None, raw=b"\xff\xff"), "JSON"),
    (struct.pack("<Q", 1 << 63) + b"{}", "header length"),
], ids=["bool-dim", "overflowing-dims", "40-dims", "dtype-list", "bool-offset", "metadata-list",
        "deep-nesting", "5000-digit-int", "not-utf8", "huge-length"])
def test_safetensors_header_errors(tmp_path, blob, needle):
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    with pytest.raises(FormatError) as ei:
        fmt.read_st_header(p)
    assert needle in str(ei.value) and str(p) in str(ei.value), str(ei.value)


def test_spec_from_dict_is_the_same_check_as_the_config(hf_src):
    s = spec_from_config(hf_src[1])
    d = s.to_dict()
    assert ModelSpec.from_dict(d) == s
    for k, v in (("n_layers", 2000), ("vocab_size", 1 << 30), ("n_experts", 5000)):
        with pytest.raises(FormatError, match=k):
            ModelSpec.from_dict(dict(d, **{k: v}))


# ---- fuzz reproducers (tools/fuzz) ------------------------------------------------------------------

def test_fuzz_repro_index_weight_map_value_not_a_string(hf_src, tmp_path):
    """tools/fuzz/fuzz_st_header.py: weight_map {"a": {"a": "model.safetensors"}} raised TypeError."""
    src = tmp_path / "src"
    shutil.copytree(hf_src[0], src)
    (src / "model.safetensors.index.json").write_bytes(
        b'{"metadata":{"total_size":8},"weight_map":{"a":{"a":"model.safetensors"}}}')
    with pytest.raises(FormatError, match="weight_map"):
        Checkpoint(src)


def test_fuzz_repro_spec_arch_not_a_string(model_dir, tmp_path):
    """tools/fuzz manifest mutation: spec.arch an object raised TypeError (unhashable) in check()."""
    d = _copy(model_dir, tmp_path)
    _edit(d, lambda m: m["spec"].__setitem__("arch", {"qwen3_next": 1}))
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError, match="spec.arch"):
            fn(d)


@pytest.mark.parametrize("key", ["rope_theta", "rms_norm_eps", "norm_offset"])
def test_fuzz_repro_huge_int_in_a_float_field(model_dir, hf_src, tmp_path, key):
    """tools/fuzz/fuzz_manifest.py: spec.rope_theta = a 400-digit int raised OverflowError
    (math.isfinite on an int too large for a float)."""
    d = _copy(model_dir, tmp_path)
    spec = json.loads((d / "pyflashmoe.json").read_text())["spec"]
    with pytest.raises(FormatError, match=key):
        ModelSpec.from_dict(dict(spec, **{key: 10 ** 400}))
    _edit(d, lambda m: m["spec"].__setitem__(key, 10 ** 400))
    with pytest.raises(FormatError, match="out of range"):   # the strict manifest parser (as C)
        fmt.validate(d)
    cfg_key = {"norm_offset": "rms_norm_eps"}.get(key, key)
    with pytest.raises(FormatError, match=cfg_key):
        spec_from_config(dict(hf_src[1], **{cfg_key: 10 ** 400}, rope_parameters=None))


@pytest.mark.parametrize("key", ["shared_expert_intermediate_size", "intermediate_size",
                                 "max_position_embeddings", "n_experts"])
def test_fuzz_repro_spec_field_with_a_python_default_missing(model_dir, tmp_path, key):
    """tools/fuzz/fuzz_manifest.py: a spec without shared_expert_intermediate_size passed validate
    (the dataclass default) but the C loader needs it: validate and Model.load disagreed."""
    d = _copy(model_dir, tmp_path)
    _edit(d, lambda m: m["spec"].pop(key))
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError, match=key):
            fn(d)


@pytest.mark.parametrize("extra", ['"\\udc80"', "NaN", "1e400", "9" * 320, "[" * 255 + "1" + "]" * 255],
                         ids=["lone-surrogate", "NaN", "overflowing-float", "overflowing-int", "too-deep"])
def test_fuzz_repro_manifest_json_the_c_parser_rejects(model_dir, tmp_path, extra):
    """tools/fuzz/fuzz_manifest.py: a lone surrogate escape in an unread field passed validate
    (Python's json) but the C core's strict parser rejected it. The manifest is now read as
    strictly as csrc/fm_json.c reads it (also NaN, out-of-range numbers, nesting > 256, duplicate
    keys), so validate and Model.load agree."""
    d = _copy(model_dir, tmp_path)
    text = (d / "pyflashmoe.json").read_text().rstrip()
    (d / "pyflashmoe.json").write_text(text[:-1] + ', "note": ' + extra + "}")
    for fn in (fmt.validate, lambda p: Model.load(p, threads=1)):
        with pytest.raises(FormatError, match="invalid JSON"):
            fn(d)
    (d / "pyflashmoe.json").write_text(text[:-1] + ', "format": "pyflashmoe"}')
    with pytest.raises(FormatError, match="duplicate key"):
        fmt.validate(d)


def test_fuzz_repro_accepted_config_whose_tensor_map_failed(hf_src):
    """tools/fuzz/fuzz_config.py: a qwen3_next config with only full-attention layers
    (full_attention_interval 1) and unused linear head counts 5 / 4 was accepted by
    spec_from_config, but tensor_map then raised on the (irrelevant) head ratio."""
    from pyflashmoe.models import tensor_map
    cfg = dict(hf_src[1], layer_types=None, full_attention_interval=1, linear_num_key_heads=5,
               linear_num_value_heads=4)
    spec = spec_from_config(cfg)
    assert all(l.attn == "full" for l in spec.layers)
    names = {t.name for t in tensor_map(spec)}
    assert "blk.0.attn_q" in names and not any("ssm_" in n for n in names)


def test_only_project_errors_from_random_manifest_edits(model_dir, tmp_path):
    """A few hundred structure-aware mutations (the fuzz harness's mutator) through validate and
    Model.load: only project errors, and whatever validate accepts loads with finite logits."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "fuzz"))
    try:
        import fuzzlib
    finally:
        sys.path.pop(0)
    d = _copy(model_dir, tmp_path)
    seed = (d / "pyflashmoe.json").read_bytes()
    accepted = 0
    for i in range(150):
        (d / "pyflashmoe.json").write_bytes(fuzzlib.mutate_json_bytes(seed, 1 << 20, i, lambda b, n: b))
        try:
            fmt.validate(d)
        except FlashMoEError:
            with pytest.raises(FlashMoEError):
                Model.load(d, threads=1)
            continue
        with Model.load(d, threads=1, context_length=16) as m:
            assert np.isfinite(m.logits([1, 2, 3])).all()
        accepted += 1
    assert accepted > 0
