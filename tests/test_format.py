"""The model-dir format: files stock tools open, bf16 / affine helpers vs torch and mlx, validation
errors that name the file and field, atomic writes."""
import json
import os

import numpy as np
import pytest

from pyflashmoe import format as fmt
from pyflashmoe.convert import convert
from pyflashmoe.errors import ArgumentError, FormatError
from tiny_models import make_tiny_hf

torch = pytest.importorskip("torch")


def test_f32_to_bf16_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-40, 3.4e38, 1.0 + 2 ** -8,
                                  1.0 + 3 * 2 ** -8], np.float32)]).astype(np.float32)
    want = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(fmt.f32_to_bf16(x), want)
    np.testing.assert_array_equal(fmt.bf16_to_f32(want), torch.from_numpy(x).bfloat16().float().numpy())
    assert np.isnan(fmt.bf16_to_f32(fmt.f32_to_bf16(np.array([np.nan], np.float32)))).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_dequantize_affine_matches_mlx(bits, gs):
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits * gs)
    w = mx.array(rng.standard_normal((16, 256)).astype(np.float32)).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    want = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits))
    got = fmt.dequantize_affine(np.array(q), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16)), bits, gs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert fmt.affine_sizes((16, 256), bits, gs) == {"q": q.nbytes, "scales": s.nbytes,
                                                     "biases": b.nbytes}


def test_safetensors_writer_is_stock_readable(tmp_path):
    from safetensors.torch import load_file
    rng = np.random.default_rng(1)
    arrs = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.uint16),
            "c.q": np.arange(12, dtype=np.uint32).reshape(3, 4), "d": rng.standard_normal(1).astype(np.float32)}
    dts = {"a": "F32", "b": "BF16", "c.q": "U32", "d": "F32"}
    w = fmt.SafetensorsWriter(tmp_path / "x.safetensors",
                              [(n, dts[n], a.shape, a.nbytes) for n, a in arrs.items()])
    for n, a in arrs.items():
        w.write(n, a)
    info = w.close()
    assert info["size"] == os.path.getsize(tmp_path / "x.safetensors")
    got = load_file(str(tmp_path / "x.safetensors"))
    for n in ("a", "c.q", "d"):
        np.testing.assert_array_equal(got[n].numpy(), arrs[n])
    np.testing.assert_array_equal(got["b"].view(torch.int16).numpy().view(np.uint16), arrs["b"])
    for n, off in w.offsets.items():
        assert (off - w.data_start) % 64 == 0, n
    st, _ = fmt.read_st_header(tmp_path / "x.safetensors")
    assert st["a"][2] == w.offsets["a"]


def test_expert_header_and_layout_alignment(tmp_path):
    h = fmt.expert_file_header(256, 1769472)
    assert len(h) % 4096 == 0
    layout, bb = fmt.expert_block_layout([
        ("gate", {"dtype": "affine", "shape": [512, 2048], "bits": 4, "group_size": 64}),
        ("up", {"dtype": "affine", "shape": [512, 2048], "bits": 4, "group_size": 64}),
        ("down", {"dtype": "affine", "shape": [2048, 512], "bits": 4, "group_size": 64})])
    assert bb == 1769472                      # DESIGN.md: 4-bit qwen3.5-35b-a3b expert
    assert layout["gate"]["q"] == [0, 524288]
    ends = []
    for p in layout.values():
        for k in ("q", "scales", "biases"):
            assert p[k][0] % 64 == 0
            ends.append(p[k])
    ends.sort()
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ends, ends[1:]))   # no overlap


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("fmt")
    src, _ = make_tiny_hf("qwen3_next", base / "hf", seed=9)
    dst = base / "out"
    convert(src, dst, bits=16, progress=False)
    return dst


def _copy(model_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


def _edit_manifest(d, fn):
    p = d / "pyflashmoe.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def test_validate_ok(model_dir):
    m = fmt.validate(model_dir)
    assert m["format_version"] == fmt.FORMAT_VERSION
    assert fmt.verify(model_dir)
    assert "qwen3_next" in fmt.info_text(model_dir)


@pytest.mark.parametrize("edit,needles", [
    (lambda m: m.__setitem__("format_version", 99), ["pyflashmoe.json", "format_version", "99"]),
    (lambda m: m.__setitem__("format", "gguf"), ["pyflashmoe.json", "format"]),
    (lambda m: m["tensors"]["blk.1.attn_q"].__setitem__("shape", [64, 64]), ["blk.1.attn_q", "shape"]),
    (lambda m: m["tensors"]["blk.1.attn_q"].__setitem__("dtype", "f16"), ["blk.1.attn_q", "dtype"]),
    (lambda m: m["tensors"]["blk.0.ssm_conv"].__setitem__("offset", 10 ** 9), ["blk.0.ssm_conv", "offset"]),
    (lambda m: m["tensors"].pop("output_norm"), ["tensors", "output_norm"]),
    (lambda m: m["experts"]["layers"]["1"].__setitem__("block_bytes", 5000), ["layers['1']", "block_bytes"]),
    (lambda m: m["experts"]["layers"]["2"]["parts"]["up"].__setitem__("data", [8, 4096]), ["parts.up", "data"]),
    (lambda m: m["experts"]["layers"]["0"]["parts"]["down"].__setitem__("shape", [32, 64]),
     ["parts.down", "shape"]),
    (lambda m: m["spec"].pop("hidden_size"), ["spec", "hidden_size"]),
    (lambda m: m["files"]["dense.safetensors"].__setitem__("size", 5), ["dense.safetensors", "size"]),
])
def test_validate_errors_name_file_and_field(model_dir, tmp_path, edit, needles):
    d = _copy(model_dir, tmp_path)
    _edit_manifest(d, edit)
    with pytest.raises(FormatError) as ei:
        fmt.validate(d)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_validate_missing_and_truncated_files(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    os.remove(d / "experts" / "L003.safetensors")
    with pytest.raises(FormatError, match="L003.safetensors.*missing"):
        fmt.validate(d)
    d2 = tmp_path / "x"
    import shutil
    shutil.copytree(model_dir, d2)
    os.truncate(d2 / "dense.safetensors", 100)
    with pytest.raises(FormatError, match="dense.safetensors.*size"):
        fmt.validate(d2)
    (d2 / "pyflashmoe.json").write_text("{not json")
    with pytest.raises(FormatError, match="pyflashmoe.json.*JSON"):
        fmt.validate(d2)
    os.remove(d2 / "pyflashmoe.json")
    with pytest.raises(FormatError, match="pyflashmoe.json.*missing"):
        fmt.validate(d2)


def test_verify_detects_one_flipped_byte(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    p = d / "dense.safetensors"
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) - 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    fmt.validate(d)     # sizes and shapes still fine
    with pytest.raises(FormatError, match="dense.safetensors.*sha256"):
        fmt.verify(d)


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fmt.AtomicDir(dst) as t:
            open(os.path.join(t, "dense.safetensors"), "wb").write(b"x")
            raise RuntimeError("boom")
    assert not dst.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replace_needs_force(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    with pytest.raises(ArgumentError, match="--force"):
        with fmt.AtomicDir(d):
            pass
    with fmt.AtomicDir(d, force=True) as t:
        fmt.write_manifest(t, {"format": "x"})
    got = json.loads((d / "pyflashmoe.json").read_text())
    assert got.pop("manifest_sha256") == fmt.manifest_digest({"format": "x"})
    assert got == {"format": "x"}
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_model_dir_reader_bad_expert_index(model_dir):
    md = fmt.ModelDir(model_dir)
    with pytest.raises(ArgumentError):
        md.expert_block(0, md.spec.n_experts)
