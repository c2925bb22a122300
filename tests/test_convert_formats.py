"""Per-tensor and per-expert-part formats in `flashmoe convert` (issue 12 item 5).

* --bits N --group-size G on a tensor whose input dim G does not divide: that tensor falls back to
  the largest smaller group size that divides it (down to 32), else bf16; convert says which
  tensors it kept at what format, and the manifest records each part's format. References:
  mlx.core.quantize at the fallback group size (bytes), the source bf16 bits, and transformers'
  fp32 forward with the stored (dequantized) weights (logits).
* A checkpoint made by mlx_lm.convert with tensors mlx left unquantized (input dim not a multiple
  of the group size) or quantized at other bits / group sizes (quant_predicate, mixed recipes)
  converts as published, bit for bit. References: the MLX checkpoint's arrays and config.json,
  and mlx-lm's own forward of that checkpoint (mlx_lm.load, fp32, on the CPU).
"""
import json
import os

import numpy as np
import pytest

from pyflashmoe.convert import convert, fallback_group_size
from pyflashmoe.errors import FormatError
from pyflashmoe.format import ModelDir, read_manifest, validate, write_manifest
from pyflashmoe.models import tensor_map
from tiny_models import ARCHS, load_tiny_hf, make_mlx_quantized, make_tiny_hf

torch = pytest.importorskip("torch")
from safetensors.torch import load_file as st_load  # noqa: E402

import mlx_recipes  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")


def _close(ours, ref, rel=1e-4):
    """tests/test_engine.py's measure: max |diff| <= rel * max |ref|."""
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert np.all(np.isfinite(ours))
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def _u(t):
    """raw storage bits of a torch tensor (bf16 -> uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensors(path):
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(st_load(os.path.join(path, f)))
    return {k.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head"): v
            for k, v in sd.items()}


def _tokens(vocab, n=12, seed=1):
    return np.random.default_rng(seed).integers(3, vocab, size=n).astype(np.int32)


def _cpu_logits(d, toks):
    eng = core.Engine(str(d), backend=0, n_threads=2)
    return core.Session(eng, 64).eval(toks, all_logits=True)


def _fmt(pe):
    return "bf16" if pe["dtype"] == "bf16" else f"{pe['bits']}-bit g{pe['group_size']}"


def test_fallback_group_size():
    assert fallback_group_size(128, 64) == 64
    assert fallback_group_size(96, 64) == 32
    assert fallback_group_size(96, 128) == 32
    assert fallback_group_size(64, 128) == 64
    assert fallback_group_size(48, 64) == 0
    assert fallback_group_size(48, 32) == 0
    assert fallback_group_size(64, 32) == 32      # never a larger group than asked for


# ---- --bits fallback on an HF checkpoint -------------------------------------------------------

CASES = {
    # I, bits, group size -> expected format of (gate/up, down), and the summary lines
    "down-g32": dict(I=96, bits=4, gs=64, gu="4-bit g64", down="4-bit g32",
                     lines=["kept at 4-bit g32: blk.*.ffn_down experts (input dim 96 not a multiple of 64)",
                            "kept at bf16: blk.*.shexp_down (input dim 48 not a multiple of 64 or 32)"]),
    "down-bf16": dict(I=48, bits=2, gs=128, gu="2-bit g64", down="bf16",
                      lines=["kept at 2-bit g64: blk.*.ffn_gate experts, blk.*.ffn_up experts (input dim 64 "
                             "not a multiple of 128)",
                             "kept at bf16: blk.*.shexp_down, blk.*.ffn_down experts (input dim 48 not a "
                             "multiple of 128 or 64 or 32)",
                             "kept at 8-bit g64: output, blk.*.ssm_qkv, blk.*.ssm_z, blk.*.ssm_b, blk.*.ssm_a, "
                             "blk.*.ssm_out, blk.*.shexp_gate, blk.*.shexp_up, blk.*.attn_q, blk.*.attn_k, "
                             "blk.*.attn_v, blk.*.attn_o (input dim 64 not a multiple of 128)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bits_fallback_per_part(case, tmp_path, capfd):
    c = CASES[case]
    src, _ = make_tiny_hf("qwen3_5_moe", tmp_path / "hf", seed=11, moe_intermediate_size=c["I"],
                          shared_expert_intermediate_size=48)
    dst = tmp_path / "out"
    capfd.readouterr()
    convert(src, dst, bits=c["bits"], group_size=c["gs"], dense_bits=8, progress=True)
    err = capfd.readouterr().err
    notes = [ln.split("note: ", 1)[1] for ln in err.splitlines() if "flashmoe convert: note: " in ln]
    assert sorted(notes) == sorted(c["lines"]), err
    md = ModelDir(dst)
    man = md.manifest
    assert sorted(man["quantization"]["notes"]) == sorted(c["lines"])
    spec = md.spec
    sd = _tensors(src)
    I = spec.moe_intermediate_size
    for il in spec.moe_layers():
        parts = man["experts"]["layers"][str(il)]["parts"]
        assert list(parts) == ["gate", "up", "down"]
        assert [_fmt(parts[p]) for p in ("gate", "up", "down")] == [c["gu"], c["gu"], c["down"]]
    fm = man["quantization"]["experts"]
    assert len(fm["formats"]) == 2 and fm["bits"] == c["bits"]
    # bytes: quantized parts are mlx.core.quantize at the fallback group size; bf16 parts the source bits
    mx = pytest.importorskip("mlx.core")
    for il, e in ((0, 0), (3, 5)):
        P = f"model.layers.{il}.mlp.experts"
        if f"{P}.gate_up_proj" in sd:
            gu = sd[f"{P}.gate_up_proj"][e]
            want = {"gate": gu[:I], "up": gu[I:], "down": sd[f"{P}.down_proj"][e]}
        else:
            want = {k: sd[f"{P}.{e}.{k}_proj.weight"] for k in ("gate", "up", "down")}
        raw = md.expert_raw(il, e)
        for pn, w in want.items():
            pe = man["experts"]["layers"][str(il)]["parts"][pn]
            if pe["dtype"] == "bf16":
                np.testing.assert_array_equal(raw[pn], _u(w.bfloat16()), err_msg=(il, e, pn))
                continue
            q, s, b = mx.quantize(mx.array(w.float().numpy()).astype(mx.bfloat16),
                                  group_size=pe["group_size"], bits=pe["bits"])
            np.testing.assert_array_equal(raw[pn]["q"], np.array(q), err_msg=(il, e, pn))
            np.testing.assert_array_equal(raw[pn]["scales"], np.array(s.view(mx.uint16)), err_msg=(il, e, pn))
            np.testing.assert_array_equal(raw[pn]["biases"], np.array(b.view(mx.uint16)), err_msg=(il, e, pn))
    # dense (--dense-bits 8): shexp_down (input 48) kept bf16, bit for bit; the rest 8-bit g64 (or
    # the fallback), routers and the embedding bf16 as before
    t = man["tensors"]
    for il in spec.moe_layers():
        assert t[f"blk.{il}.shexp_down"]["dtype"] == "bf16"
        np.testing.assert_array_equal(md.dense_raw(f"blk.{il}.shexp_down"),
                                      _u(sd[f"model.layers.{il}.mlp.shared_expert.down_proj.weight"].bfloat16()))
        assert t[f"blk.{il}.shexp_gate"]["dtype"] == "affine" and t[f"blk.{il}.shexp_gate"]["bits"] == 8
        assert t[f"blk.{il}.ffn_router"]["dtype"] == "bf16"
    assert t["output"]["group_size"] == min(c["gs"], 64)
    # logits: transformers' fp32 forward with every stored weight (dequantized) in place
    ref_model = load_tiny_hf("qwen3_5_moe", src)
    params = dict(ref_model.named_parameters())
    by = {tm.name: tm for tm in tensor_map(spec)}
    with torch.no_grad():
        for name, e in t.items():
            if e["dtype"] == "affine":
                assert by[name].rows is None
                params[by[name].src].copy_(torch.from_numpy(md.dense(name)))
        for il in spec.moe_layers():
            for e in range(spec.n_experts):
                w = md.expert(il, e)
                params[f"model.layers.{il}.mlp.experts.gate_up_proj"][e].copy_(
                    torch.from_numpy(np.concatenate([w["gate"], w["up"]])))
                params[f"model.layers.{il}.mlp.experts.down_proj"][e].copy_(torch.from_numpy(w["down"]))
    toks = _tokens(spec.vocab_size)
    with torch.no_grad():
        ref = ref_model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()
    _close(_cpu_logits(dst, toks), ref)


def test_bits_fallback_every_dim_divisible_writes_no_formats(tmp_path, capfd):
    """A model every tensor of which the group size divides is stored as before: one format, no
    notes, no "formats" list."""
    src, _ = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=12)
    capfd.readouterr()
    convert(src, tmp_path / "out", bits=4, group_size=32, progress=True)
    assert "note:" not in capfd.readouterr().err
    q = read_manifest(tmp_path / "out")["quantization"]
    assert q["experts"] == {"bits": 4, "group_size": 32} and "notes" not in q


# ---- MLX checkpoints converted as published ------------------------------------------------------

def _mlx():
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    return mx


def _mlx_quant_cfg(mlxdir):
    """normalized module path -> (bits, group_size) from config.json, plus the global pair under ""."""
    q = json.loads(open(os.path.join(mlxdir, "config.json")).read())["quantization"]
    out = {"": (q["bits"], q["group_size"])}
    for k, v in q.items():
        if isinstance(v, dict):
            k = k.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")
            out[k] = (v["bits"], v["group_size"])
    return out


def _check_as_published(mlxdir, dst):
    """Every 2-D dense tensor and every expert part of the model dir is the MLX checkpoint's own
    bytes in the MLX format config.json names for that module (bf16 where mlx left it unquantized).
    Returns {format label: count} over the expert parts."""
    md = ModelDir(dst)
    m = _tensors(mlxdir)
    qc = _mlx_quant_cfg(mlxdir)
    spec = md.spec
    seen = {}
    for tm in tensor_map(spec):
        if tm.kind in ("vector", "conv"):
            continue
        e = md.manifest["tensors"][tm.name]
        base = tm.src[:-len(".weight")]
        rows = list(tm.rows) if tm.rows is not None else slice(None)
        if base + ".scales" in m:
            assert e["dtype"] == "affine", tm.name
            assert (e["bits"], e["group_size"]) == qc.get(base, qc[""]), tm.name
            raw = md.dense_raw(tm.name)
            for k, nm in (("q", tm.src), ("scales", base + ".scales"), ("biases", base + ".biases")):
                np.testing.assert_array_equal(raw[k], _u(m[nm])[rows], err_msg=f"{tm.name}.{k}")
        else:
            assert e["dtype"] == "bf16", tm.name
            assert m[tm.src].dtype == torch.bfloat16
            np.testing.assert_array_equal(md.dense_raw(tm.name), _u(m[tm.src])[rows], err_msg=tm.name)
    for il in spec.moe_layers():
        parts = md.manifest["experts"]["layers"][str(il)]["parts"]
        for pn in ("gate", "up", "down"):
            base = f"model.layers.{il}.mlp.switch_mlp.{pn}_proj"
            pe = parts[pn]
            seen[_fmt(pe)] = seen.get(_fmt(pe), 0) + 1
            if base + ".scales" in m:
                assert pe["dtype"] == "affine" and (pe["bits"], pe["group_size"]) == qc.get(base, qc[""])
            else:
                assert pe["dtype"] == "bf16" and m[base + ".weight"].dtype == torch.bfloat16
        for e in (0, spec.n_experts - 1):
            raw = md.expert_raw(il, e)
            for pn in ("gate", "up", "down"):
                base = f"model.layers.{il}.mlp.switch_mlp.{pn}_proj"
                if parts[pn]["dtype"] == "bf16":
                    np.testing.assert_array_equal(raw[pn], _u(m[base + ".weight"][e]), err_msg=(il, e, pn))
                    continue
                for k, nm in (("q", ".weight"), ("scales", ".scales"), ("biases", ".biases")):
                    np.testing.assert_array_equal(raw[pn][k], _u(m[base + nm][e]), err_msg=(il, e, pn, k))
    return seen


def _mlx_logits(mlxdir, toks):
    """mlx-lm's own forward of the MLX checkpoint, in fp32 on the CPU (quantized layers keep their
    codes; bf16 weights, scales and biases widen exactly)."""
    mx = _mlx()
    from mlx_lm import load
    mx.set_default_device(mx.cpu)
    model, _ = load(str(mlxdir))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(toks)[None]).astype(mx.float32))[0]


def _convert_and_compare(mlxdir, dst, **kw):
    convert(mlxdir, dst, progress=False, **kw)
    seen = _check_as_published(mlxdir, dst)
    spec = ModelDir(dst).spec
    toks = _tokens(spec.vocab_size)
    _close(_cpu_logits(dst, toks), _mlx_logits(mlxdir, toks))
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_unquantized_parts_as_published(arch, tmp_path):
    """moe_intermediate 96 / shared 48 with group size 64: mlx_lm leaves the routed and shared down
    projections unquantized; they convert as the bf16 mlx published (was: "--group-size 64: does
    not divide ...")."""
    _mlx()
    src, _ = make_tiny_hf(arch, tmp_path / "hf", seed=13, moe_intermediate_size=96,
                          shared_expert_intermediate_size=48)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=64)
    assert "model.layers.0.mlp.switch_mlp.down_proj.scales" not in _tensors(mlxdir)
    seen = _convert_and_compare(mlxdir, tmp_path / "out")
    assert seen == {"4-bit g64": 8, "bf16": 4}
    man = read_manifest(tmp_path / "out")
    assert any(n.startswith("kept at bf16 as published in the MLX source: ") and "blk.*.ffn_down experts" in n
               for n in man["quantization"]["notes"])
    assert man["quantization"]["experts"]["formats"] == [{"bits": 4, "group_size": 64}, {"bits": 16}]
    # --bits / --group-size do not requantize a published MLX checkpoint
    convert(mlxdir, tmp_path / "out2", bits=2, group_size=32, dense_bits=8, progress=False)
    for f in ("dense.safetensors", "experts/L001.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "out2" / f).read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_mixed_bits_as_published(arch, tmp_path):
    """quant_predicate: every down projection 8-bit g32, the rest 4-bit g64 (g32 where 64 does not
    divide): each tensor keeps its own bits / group size."""
    _mlx()
    src, _ = make_tiny_hf(arch, tmp_path / "hf", seed=14)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=32,
                                quant_predicate=mlx_recipes.down8)
    seen = _convert_and_compare(mlxdir, tmp_path / "out")
    assert seen == {"4-bit g64": 8, "8-bit g32": 4}
    t = read_manifest(tmp_path / "out")["tensors"]
    assert t["tok_embd"]["bits"] == 4 and t["tok_embd"]["group_size"] == 64


@pytest.mark.parametrize("pred,want", [
    ("mixed", {"2-bit g32": 4, "4-bit g64": 4, "bf16": 1, "8-bit g32": 3}),
    ("gate_up_kinds", {"2-bit g32": 4, "4-bit g64": 4, "bf16": 4}),
    ("gate_up_groups", {"4-bit g32": 8, "4-bit g64": 4}),     # shared expert gate g32, up g64 too
    ("mixed_2_6", {"2-bit g32": 10, "6-bit g32": 2}),      # mlx_lm's own recipe (--quant-predicate)
])
def test_mlx_per_layer_recipes_as_published(pred, want, tmp_path):
    _mlx()
    src, _ = make_tiny_hf("qwen3_5_moe", tmp_path / "hf", seed=15)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=32,
                                quant_predicate=getattr(mlx_recipes, pred, pred))
    assert _convert_and_compare(mlxdir, tmp_path / "out") == want


def _mlx_src(tmp_path):
    src, _ = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=16)
    return make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=32,
                              quant_predicate=mlx_recipes.down8)


@pytest.mark.parametrize("edit,match", [
    (lambda q: q["model.layers.1.mlp.switch_mlp.down_proj"].update(bits=4),
     r"shapes give 8-bit group 32 but config.json quantization\['model.layers.1.mlp.switch_mlp.down_proj'\]"),
    (lambda q: q["model.layers.0.self_attn.q_proj"].update(group_size=32),
     r"shapes give 4-bit group 64 but config.json quantization\['model.layers.0.self_attn.q_proj'\]"),
    (lambda q: q["model.layers.0.self_attn.q_proj"].update(mode="mxfp4"),
     r"quantization\['model.layers.0.self_attn.q_proj'\].mode 'mxfp4' is not supported"),
    (lambda q: q["model.layers.0.self_attn.q_proj"].update(bits="4"), "must have integer bits"),
    (lambda q: [q.pop(k) for k in list(q) if k.endswith("self_attn.q_proj")] and q.update(bits=8),
     r"shapes give 4-bit group 64 but config.json quantization says bits 8"),
])
def test_mlx_config_disagreeing_with_shapes_fails(tmp_path, edit, match):
    """The bits / group size read from the arrays' shapes must be what config.json says for that
    module (its own entry, else the global pair): mlx_lm.load would build that layer differently."""
    _mlx()
    mlxdir = _mlx_src(tmp_path)
    p = os.path.join(mlxdir, "config.json")
    cfg = json.loads(open(p).read())
    edit(cfg["quantization"])
    open(p, "w").write(json.dumps(cfg))
    with pytest.raises(FormatError, match=match):
        convert(mlxdir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- the manifest's per-part formats (format.validate) -------------------------------------------

@pytest.fixture(scope="module")
def fallback_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    src, _ = make_tiny_hf("qwen3_moe", root / "hf", seed=17, moe_intermediate_size=96, num_hidden_layers=2)
    return convert(src, root / "out", bits=4, group_size=64, progress=False)


def _edited(src, dst, fn):
    import shutil
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    fn(m)
    write_manifest(dst, m)
    return dst


@pytest.mark.parametrize("fn,match", [
    (lambda m: m["quantization"]["experts"].__setitem__("formats", [{"bits": 4, "group_size": 64}]),
     r"parts.down is \{'bits': 4, 'group_size': 32\} but .*quantization.experts.formats"),
    (lambda m: m["quantization"]["experts"].__setitem__("formats", [{"bits": 4}]), "quantization.experts.formats"),
    (lambda m: m["quantization"]["experts"].__setitem__("formats", "4"), "quantization.experts.formats"),
    (lambda m: m["quantization"]["experts"].__setitem__("formats", []), "quantization.experts.formats"),
    (lambda m: m["quantization"].__setitem__("notes", [1]), "quantization.notes"),
])
def test_manifest_part_formats_checked(fallback_dir, tmp_path, fn, match):
    validate(fallback_dir)
    d = _edited(fallback_dir, tmp_path / "bad", fn)
    with pytest.raises(FormatError, match=match):
        validate(d)


def test_manifest_without_formats_checks_the_gate(fallback_dir, tmp_path):
    """Without "formats" (a manifest whose parts were all written alike), the one
    quantization.experts format must be the gate's, as before."""
    def fn(m):
        m["quantization"]["experts"] = {"bits": 8, "group_size": 64}
    d = _edited(fallback_dir, tmp_path / "bad", fn)
    with pytest.raises(FormatError, match=r"parts.gate is affine bits 4 but .*quantization.experts"):
        validate(d)


def test_experts_of_one_layer_must_share_a_part_format(tmp_path):
    """Per-expert source tensors where one expert's gate is MLX-quantized and the others are float:
    one layer's experts share each part's layout in the block, so convert refuses, naming it."""
    mx = _mlx()
    from safetensors.torch import save_file
    src, _ = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=18, num_hidden_layers=1)
    sd = _tensors(src)
    nm = "model.layers.0.mlp.experts.1.gate_proj"
    assert nm + ".weight" in sd
    q, s, b = mx.quantize(mx.array(sd[nm + ".weight"].float().numpy()), group_size=32, bits=4)
    sd[nm + ".weight"] = torch.from_numpy(np.array(q).astype(np.uint32))
    sd[nm + ".scales"] = torch.from_numpy(np.array(s.astype(mx.float32))).bfloat16()
    sd[nm + ".biases"] = torch.from_numpy(np.array(b.astype(mx.float32))).bfloat16()
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(src, f))
    save_file(sd, os.path.join(src, "model.safetensors"))
    with pytest.raises(FormatError, match=r"layer 0 expert 1 gate is stored 4-bit g32 but expert 0 float"):
        convert(src, tmp_path / "out", bits=16, progress=False)
