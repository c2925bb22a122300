"""`flashmoe convert` against references nobody here wrote: the source tensors as transformers saved
them (read back with the stock safetensors library), mlx_lm.convert checkpoints and mlx.core's
dequantize, torch's float8_e4m3fn."""
import json
import os
import re

import numpy as np
import pytest

from pyflashmoe.convert import convert
from pyflashmoe.format import ModelDir
from pyflashmoe.format import bf16_to_f32 as fmt_bf16_to_f32
from pyflashmoe.models import spec_from_config, tensor_map
from tiny_models import ARCHS, make_mlx_quantized, make_tiny_hf, rewrite_checkpoint

torch = pytest.importorskip("torch")
from safetensors.torch import load_file as st_load  # noqa: E402


def _src_tensors(path):
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(st_load(os.path.join(path, f)))
    return sd


def _f32(t):
    return t.float().numpy()


def _expected_dense(sd, spec, prefix=""):
    """canonical name -> float32 array, from the source state dict by the tensor map."""
    out = {}
    for tm in tensor_map(spec):
        w = _f32(sd[prefix + tm.src])
        if tm.rows is not None:
            w = w[list(tm.rows)]
        if tm.kind == "conv":
            w = w.reshape(w.shape[0], -1)
        out[tm.name] = w
    return out


def _expected_expert(sd, il, e, I):
    p = f"model.layers.{il}.mlp.experts"
    if f"{p}.{e}.gate_proj.weight" in sd:
        return {k: _f32(sd[f"{p}.{e}.{k}_proj.weight"]) for k in ("gate", "up", "down")}
    gu = _f32(sd[f"{p}.gate_up_proj"][e])
    return {"gate": gu[:I], "up": gu[I:], "down": _f32(sd[f"{p}.down_proj"][e])}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_hf(a, base / a, seed=3) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_bits16_round_trip_exact(arch, tiny_dirs, tmp_path):
    src, cfg = tiny_dirs[arch]
    dst = tmp_path / "out"
    convert(src, dst, bits=16, progress=False)
    md = ModelDir(dst)
    spec = spec_from_config(cfg)
    assert md.spec == spec
    sd = _src_tensors(src)
    for name, want in _expected_dense(sd, spec).items():
        got = md.dense(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=name)
        e = md.manifest["tensors"][name]
        assert e["dtype"] == ("f32" if want.ndim == 1 or name.endswith("ssm_conv") else "bf16"), name
    n = 0
    for il in spec.moe_layers():
        for e in range(spec.n_experts):
            got, want = md.expert(il, e), _expected_expert(sd, il, e, spec.moe_intermediate_size)
            for k in ("gate", "up", "down"):
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"layer {il} expert {e} {k}")
                n += 1
    assert n == 3 * spec.n_experts * len(spec.moe_layers())
    # expert files: one U8 tensor, data at a 4096 multiple, blocks 4096 multiples, parts 64-aligned
    from safetensors import safe_open
    for il, L in md.manifest["experts"]["layers"].items():
        with safe_open(str(dst / L["file"]), "np") as f:
            assert list(f.keys()) == ["experts"]
            assert f.get_slice("experts").get_shape() == [spec.n_experts, L["block_bytes"]]
        assert L["data_offset"] % 4096 == 0 and L["block_bytes"] % 4096 == 0
        assert all(p["data"][0] % 64 == 0 for p in L["parts"].values())
    with safe_open(str(dst / "dense.safetensors"), "np") as f:  # stock tools open the dense file
        assert "tok_embd" in f.keys()


def test_layouts_fused_multimodal_sharded_bf16_same_output(tiny_dirs, tmp_path):
    """Per-expert (as transformers saves), fused 3-D + multimodal + 3 shards with an index, and a
    bf16 copy all convert to the same numbers."""
    src, cfg = tiny_dirs["qwen3_5_moe"]
    convert(src, tmp_path / "a", bits=16, progress=False)
    fused, _ = rewrite_checkpoint(src, tmp_path / "fused", layout="fused", multimodal=True, shards=3,
                                  dtype=torch.bfloat16)
    assert os.path.isfile(os.path.join(fused, "model.safetensors.index.json"))
    sd = _src_tensors(fused)
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    assert sd["model.language_model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    convert(fused, tmp_path / "b", bits=16, progress=False)
    a, b = ModelDir(tmp_path / "a"), ModelDir(tmp_path / "b")
    assert a.spec == b.spec
    assert a.manifest["tensors"].keys() == b.manifest["tensors"].keys()
    for n in a.manifest["tensors"]:
        np.testing.assert_array_equal(a.dense(n), b.dense(n), err_msg=n)
    for il in a.spec.moe_layers():
        for e in range(a.spec.n_experts):
            assert bytes(a.expert_block(il, e)) == bytes(b.expert_block(il, e)), (il, e)
    # and fused -> per-expert written by hand from the fused tensors
    pe, _ = rewrite_checkpoint(fused, tmp_path / "pe", layout="per-expert")
    assert not any("gate_up_proj" in k for k in _src_tensors(pe)) or True


def test_per_expert_written_from_fused(tiny_dirs, tmp_path):
    """A per-expert checkpoint written by hand (safetensors) from fused tensors converts exactly."""
    from safetensors.torch import save_file
    src, cfg = tiny_dirs["qwen3_next"]
    fused, _ = rewrite_checkpoint(src, tmp_path / "fused", layout="fused")
    sd = _src_tensors(fused)
    out = {}
    for k, v in sd.items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if not m:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = v[e].contiguous()
            else:
                I = v.shape[1] // 2
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = v[e, :I].contiguous()
                out[f"{m.group(1)}.{e}.up_proj.weight"] = v[e, I:].contiguous()
    d = tmp_path / "pe"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    convert(fused, tmp_path / "o1", bits=16, progress=False)
    convert(d, tmp_path / "o2", bits=16, progress=False)
    a, b = ModelDir(tmp_path / "o1"), ModelDir(tmp_path / "o2")
    spec = a.spec
    ref = _src_tensors(src)
    for il in spec.moe_layers():
        for e in range(spec.n_experts):
            assert bytes(a.expert_block(il, e)) == bytes(b.expert_block(il, e))
            want = _expected_expert(ref, il, e, spec.moe_intermediate_size)
            got = b.expert(il, e)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


# ---- MLX ---------------------------------------------------------------------------------------

mx = None


def _mlx():
    global mx
    if mx is None:
        mx = pytest.importorskip("mlx.core")
        pytest.importorskip("mlx_lm")
    return mx


def _mlx_tensors(path):
    """name (language_model. prefixes normalized) -> torch tensor, as saved by mlx_lm."""
    out = {}
    for k, v in _src_tensors(path).items():
        k = k.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")
        out[k] = v
    return out


def _u(t):
    """raw storage bits of a torch tensor as a numpy array (bf16 -> uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_mlx_4bit_repacked_bit_exact(arch, tmp_path):
    _mlx()
    src, cfg = make_tiny_hf(arch, tmp_path / "hf", seed=4, moe_intermediate_size=64,
                            shared_expert_intermediate_size=64)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=64)
    dst = tmp_path / "out"
    convert(mlxdir, dst, bits=4, progress=False)
    md = ModelDir(dst)
    assert md.manifest["source"]["kind"] == "mlx"
    m = _mlx_tensors(mlxdir)
    spec = md.spec
    # experts: the bytes of q, scales, biases are the MLX tensors' bytes
    for il in spec.moe_layers():
        for e in range(spec.n_experts):
            raw = md.expert_raw(il, e)
            for k in ("gate", "up", "down"):
                p = f"model.layers.{il}.mlp.switch_mlp.{k}_proj"
                assert raw[k]["bits"] == 4 and raw[k]["group_size"] == 64
                np.testing.assert_array_equal(raw[k]["q"], _u(m[p + ".weight"][e]))
                np.testing.assert_array_equal(raw[k]["scales"], _u(m[p + ".scales"][e]))
                np.testing.assert_array_equal(raw[k]["biases"], _u(m[p + ".biases"][e]))
    # experts dequantize exactly as mlx.core.dequantize does
    p = "model.layers.0.mlp.switch_mlp.down_proj"
    ref = mx.dequantize(mx.array(m[p + ".weight"][3].numpy()), mx.array(m[p + ".scales"][3].float().numpy()),
                        mx.array(m[p + ".biases"][3].float().numpy()), group_size=64, bits=4)
    np.testing.assert_allclose(md.expert(0, 3)["down"], np.array(ref), rtol=0, atol=0)
    # dense: quantized tensors kept affine with their own bits (routers 8-bit), rows split where fused
    by = {tm.name: tm for tm in tensor_map(spec)}
    for name, e in md.manifest["tensors"].items():
        tm = by[name]
        if e["dtype"] == "affine":
            base = tm.src[:-len(".weight")]
            raw = md.dense_raw(name)
            rows = list(tm.rows) if tm.rows is not None else slice(None)
            np.testing.assert_array_equal(raw["q"], _u(m[tm.src])[rows], err_msg=name)
            np.testing.assert_array_equal(raw["scales"], _u(m[base + ".scales"])[rows], err_msg=name)
            np.testing.assert_array_equal(raw["biases"], _u(m[base + ".biases"])[rows], err_msg=name)
            if name.endswith("ffn_router") or name.endswith("shexp_router"):
                assert e["bits"] == 8
        elif tm.kind == "vector":
            want = _f32(m[tm.src])
            if tm.zc_norm:   # mlx-lm stores zero-centred norms as 1 + w
                want = want - np.float32(1.0)
            np.testing.assert_array_equal(md.dense(name), want, err_msg=name)
        elif tm.kind == "conv":
            np.testing.assert_array_equal(md.dense(name), _f32(m[tm.src]).reshape(md.dense(name).shape))
    # norms came back to the HF values (up to the bf16 rounding mlx applied to 1 + w)
    hf = _src_tensors(src)
    np.testing.assert_allclose(md.dense("output_norm"), _f32(hf["model.norm.weight"]), atol=4e-3)
    assert md.manifest["tensors"]["blk.0.ssm_qkv"]["dtype"] == "affine"


def test_mlx_qwen3_moe(tmp_path, monkeypatch):
    import pyflashmoe.convert as conv
    _mlx()
    src, cfg = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=5, moe_intermediate_size=64)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx")
    convert(mlxdir, tmp_path / "out", progress=False)
    monkeypatch.setattr(conv, "DENSE_CHUNK", 100)   # affine copy streamed a few rows at a time
    convert(mlxdir, tmp_path / "out2", progress=False)
    assert (tmp_path / "out" / "dense.safetensors").read_bytes() == \
        (tmp_path / "out2" / "dense.safetensors").read_bytes()
    md = ModelDir(tmp_path / "out")
    m = _mlx_tensors(mlxdir)
    raw = md.expert_raw(2, 5)["up"]
    np.testing.assert_array_equal(raw["q"], _u(m["model.layers.2.mlp.switch_mlp.up_proj.weight"][5]))
    # plain norms are not shifted
    np.testing.assert_array_equal(md.dense("output_norm"), _f32(m["model.norm.weight"]))


# ---- quantizing float experts ---------------------------------------------------------------------

def _check_affine_err(got, want, bits, gs, what):
    w = want.reshape(want.shape[0], -1, gs)
    step = (w.max(-1) - w.min(-1)) / (2 ** bits - 1)       # one quantization step per group
    err = np.abs(got - want).reshape(w.shape)
    # MLX-style affine: the larger-magnitude edge is made exact (scale = edge/q0), so the grid may
    # shift by up to half a step: error <= one step, plus bf16 rounding of the bias (half an ulp of
    # |edge|, 2^-9 relative) and of the scale (2^-9 relative, times up to 2^bits-1 steps)
    bf16_slack = 2.0 ** -8 * (np.abs(w).max(-1) + (w.max(-1) - w.min(-1)))
    assert (err.max(-1) <= step * 1.02 + bf16_slack).all(), what
    # and on average it is round-to-nearest: mean |error| ~ step/4
    assert err.mean() <= 0.35 * step.mean() + bf16_slack.mean(), what


@pytest.mark.parametrize("bits,gs", [(4, 64), (2, 32), (3, 64), (8, 128)])
def test_quantized_experts_within_tolerance(bits, gs, tmp_path):
    src, cfg = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=6, moe_intermediate_size=128,
                            hidden_size=128, head_dim=32)
    dst = tmp_path / "out"
    convert(src, dst, bits=bits, group_size=gs, progress=False)
    md = ModelDir(dst)
    sd = _src_tensors(src)
    spec = md.spec
    assert md.manifest["quantization"]["experts"] == {"bits": bits, "group_size": gs}
    for il in (0, 3):
        for e in (0, 7):
            got, want = md.expert(il, e), _expected_expert(sd, il, e, spec.moe_intermediate_size)
            for k in want:
                _check_affine_err(got[k], want[k], bits, gs, (il, e, k))
                assert md.manifest["experts"]["layers"][str(il)]["parts"][k]["dtype"] == "affine"


def test_quantized_experts_match_mlx_quantize(tmp_path):
    _mlx()
    src, cfg = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=7, moe_intermediate_size=64)
    convert(src, tmp_path / "out", bits=4, group_size=64, progress=False)
    md = ModelDir(tmp_path / "out")
    w = _src_tensors(src)["model.layers.1.mlp.experts.2.gate_proj.weight"].bfloat16()
    q, s, b = mx.quantize(mx.array(w.float().numpy()).astype(mx.bfloat16), group_size=64, bits=4)
    raw = md.expert_raw(1, 2)["gate"]
    np.testing.assert_array_equal(raw["q"], np.array(q))
    np.testing.assert_array_equal(raw["scales"], np.array(s.view(mx.uint16)))
    np.testing.assert_array_equal(raw["biases"], np.array(b.view(mx.uint16)))
    deq_ref = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4))
    np.testing.assert_allclose(md.expert(1, 2)["gate"], deq_ref, rtol=1e-6, atol=1e-7)


def test_dense_bits_8(tmp_path, tiny_dirs):
    src, cfg = tiny_dirs["qwen3_5_moe"]
    convert(src, tmp_path / "out", bits=16, dense_bits=8, group_size=32, progress=False)
    md = ModelDir(tmp_path / "out")
    sd = _src_tensors(src)
    want = _expected_dense(sd, md.spec)
    t = md.manifest["tensors"]
    assert t["blk.1.attn_q"]["dtype"] == "affine" and t["blk.1.attn_q"]["bits"] == 8
    assert t["tok_embd"]["dtype"] == "bf16" and t["blk.0.ffn_router"]["dtype"] == "bf16"
    assert t["output_norm"]["dtype"] == "f32"
    for n, w in want.items():
        if t[n]["dtype"] == "affine":
            _check_affine_err(md.dense(n), w, 8, 32, n)
        else:
            np.testing.assert_array_equal(md.dense(n), w)


# ---- FP8 -----------------------------------------------------------------------------------------

def _fp8_checkpoint(src, dst, block=(16, 16)):
    from safetensors.torch import save_file
    sd = _src_tensors(src)
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith("_proj.weight") and "embed" not in k:
            o, i = v.shape
            bo, bi = block
            nbo, nbi = -(-o // bo), -(-i // bi)
            vp = torch.zeros(nbo * bo, nbi * bi)
            vp[:o, :i] = v
            blocks = vp.reshape(nbo, bo, nbi, bi)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(nbo * bo, nbi * bi)[:o, :i]
            out[k] = q.to(torch.float8_e4m3fn).contiguous()
            out[k + "_scale_inv"] = scale.float().contiguous()
        else:
            out[k] = v.bfloat16() if v.dim() > 1 else v
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def test_fp8_source(tmp_path, tiny_dirs):
    src, cfg = tiny_dirs["qwen3_moe"]
    fp8 = _fp8_checkpoint(src, tmp_path / "fp8")
    convert(tmp_path / "fp8", tmp_path / "out", bits=16, progress=False)
    convert(src, tmp_path / "ref", bits=16, progress=False)
    md, ref = ModelDir(tmp_path / "out"), ModelDir(tmp_path / "ref")
    assert md.manifest["source"]["kind"] == "fp8"
    # exact: torch's own fp8 decode times the block scale, rounded to bf16 by torch
    k = "model.layers.1.mlp.experts.4.down_proj.weight"
    w = fp8[k].float()
    s = fp8[k + "_scale_inv"]
    want = (w * s.repeat_interleave(16, 0)[:w.shape[0]].repeat_interleave(16, 1)[:, :w.shape[1]])
    np.testing.assert_array_equal(md.expert(1, 4)["down"], want.bfloat16().float().numpy())
    # close to the bf16 original: fp8 e4m3 has a 3-bit mantissa (relative error <= 2^-4)
    for il in md.spec.moe_layers():
        a, b = md.expert(il, 0), ref.expert(il, 0)
        for p in a:
            blockmax = np.abs(b[p]).max()
            assert np.abs(a[p] - b[p]).max() <= blockmax * 2 ** -4 + 1e-6
    a, b = md.dense("blk.2.attn_q"), ref.dense("blk.2.attn_q")
    assert np.abs(a - b).max() <= np.abs(b).max() * 2 ** -4


def test_fp8_decode_table_matches_torch():
    from pyflashmoe.convert.reader import fp8_to_f32
    allb = torch.arange(256, dtype=torch.uint8)
    want = allb.view(torch.float8_e4m3fn).float().numpy()
    got = fp8_to_f32(allb.numpy(), "F8_E4M3")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    want = allb.view(torch.float8_e5m2).float().numpy()
    got = fp8_to_f32(allb.numpy(), "F8_E5M2")
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])


# ---- a multi-GB checkpoint converts in bounded memory -------------------------------------------

def _write_st_repeated(path, tensors, block):
    """Write a safetensors file by hand: tensors = [(name, dtype, shape)], data = `block` bytes
    repeated (so multi-GB files are written quickly without holding them in memory)."""
    hdr, pos = {}, 0
    for name, dt, shape in tensors:
        nb = int(np.prod(shape)) * {"BF16": 2, "F32": 4}[dt]
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = pos
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def _big_checkpoint(d, n_layers=5, E=128, H=1024, I=1024, vocab=256, big_vocab=0):
    """qwen3_moe, fused bf16 experts, E*3*H*I*2 bytes per layer (768 MiB at the defaults)."""
    from safetensors.numpy import save_file
    os.makedirs(d, exist_ok=True)
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": H,
           "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "vocab_size": vocab, "num_experts": E, "num_experts_per_tok": 8,
           "moe_intermediate_size": I, "intermediate_size": 2048, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "norm_topk_prob": True, "tie_word_embeddings": True,
           "max_position_embeddings": 4096}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    dense = {"model.norm.weight": np.ones(H, np.float32)}
    fblock = None
    if big_vocab:   # a vocab-sized F32 embedding (GBs): the converter must stream it in row chunks
        cfg["vocab_size"] = big_vocab
        fblock = rng.standard_normal(1 << 20).astype(np.float32)
        fblock = (fblock.view(np.uint32) & 0xFFFF0000).view(np.float32).tobytes()
        _write_st_repeated(os.path.join(d, "model-embed.safetensors"),
                           [("model.embed_tokens.weight", "F32", (big_vocab, H))], fblock)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
    else:
        dense["model.embed_tokens.weight"] = rng.standard_normal((vocab, H), np.float32)
    for i in range(n_layers):
        p = f"model.layers.{i}"
        dense.update({f"{p}.input_layernorm.weight": np.ones(H, np.float32),
                      f"{p}.post_attention_layernorm.weight": np.ones(H, np.float32),
                      f"{p}.self_attn.q_proj.weight": rng.standard_normal((256, H), np.float32),
                      f"{p}.self_attn.k_proj.weight": rng.standard_normal((128, H), np.float32),
                      f"{p}.self_attn.v_proj.weight": rng.standard_normal((128, H), np.float32),
                      f"{p}.self_attn.o_proj.weight": rng.standard_normal((H, 256), np.float32),
                      f"{p}.self_attn.q_norm.weight": np.ones(64, np.float32),
                      f"{p}.self_attn.k_norm.weight": np.ones(64, np.float32),
                      f"{p}.mlp.gate.weight": rng.standard_normal((E, H), np.float32)})
    save_file(dense, os.path.join(d, "model-dense.safetensors"))
    block = np.ascontiguousarray(
        (rng.standard_normal(1 << 20).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)).tobytes()
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp.experts"
        _write_st_repeated(os.path.join(d, f"model-experts-{i:02d}.safetensors"),
                           [(f"{p}.gate_up_proj", "BF16", (E, 2 * I, H)),
                            (f"{p}.down_proj", "BF16", (E, H, I))], block)
    return cfg, block, fblock


@pytest.mark.slow
def test_multi_gb_checkpoint_bounded_rss(tmp_path):
    import shutil
    import tempfile
    # source and output live in RAM (tmpfs) when there is room: the shared dev disk writes ~100-200
    # MB/s, which would make this test take minutes. pread/write into tmpfs do not count toward the
    # converter's RSS (the pages are not mapped into the process), so the measurement is the same.
    shm = "/dev/shm"
    use_shm = os.path.isdir(shm) and shutil.disk_usage(shm).free > 14 * 2 ** 30
    base = tempfile.mkdtemp(dir=shm) if use_shm else str(tmp_path)
    try:
        _run_big(base, tmp_path.__class__(base))
    finally:
        if use_shm:
            shutil.rmtree(base, ignore_errors=True)


def _run_big(base, tmp_path):
    import subprocess
    import sys
    src = tmp_path.__class__(base) / "big"
    cfg, block, fblock = _big_checkpoint(src, n_layers=4, big_vocab=1 << 18)   # 3 GiB experts + 1 GiB embedding
    total = sum(os.path.getsize(src / f) for f in os.listdir(src))
    assert total >= 4e9, total
    dst = tmp_path / "out"
    code = ("import resource, sys; from pyflashmoe.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], bits=16, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                       timeout=170)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kib = int(r.stdout.strip().splitlines()[-1])
    assert peak_kib * 1024 < 1.5 * 2 ** 30, f"peak RSS {peak_kib / 1024:.0f} MiB"
    md = ModelDir(dst)
    # spot-check: expert e of layer 0 is the repeated block at the right offsets
    I, H, E = cfg["moe_intermediate_size"], cfg["hidden_size"], cfg["num_experts"]
    blk = np.frombuffer(block, np.uint16)
    per = 2 * I * H
    for e in (0, E - 1):
        idx = (np.arange(per) + e * per) % blk.size
        want = blk[idx].reshape(2 * I, H)
        raw = md.expert_raw(0, e)
        np.testing.assert_array_equal(raw["gate"], want[:I])
        np.testing.assert_array_equal(raw["up"], want[I:])
    emb = md.dense_raw("tok_embd")             # bf16 bits of the F32 source (bf16-exact values)
    fb = np.frombuffer(fblock, np.float32)
    for r in (0, 12345, (1 << 18) - 1):
        want = fb[(np.arange(H) + r * H) % fb.size]
        np.testing.assert_array_equal(fmt_bf16_to_f32(emb[r]), want)
    for f in os.listdir(src):   # free the disk early
        os.remove(src / f)


# ---- bad input through the CLI: exit non-zero, one line naming file and field, no traceback ------

def _cli(*args, timeout=120):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "pyflashmoe", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _assert_clean_error(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert str(n) in r.stderr, (n, r.stderr)


@pytest.fixture()
def qmoe_src(tiny_dirs, tmp_path):
    import shutil
    src, cfg = tiny_dirs["qwen3_moe"]
    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def test_cli_missing_config(qmoe_src, tmp_path):
    os.remove(qmoe_src / "config.json")
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o", "--bits", "16"), "config.json", "missing")
    assert not (tmp_path / "o").exists()


def test_cli_unsupported_model_type(qmoe_src, tmp_path):
    cfg = json.loads((qmoe_src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (qmoe_src / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o"), "config.json", "model_type",
                        "gpt_neox", "qwen3_5_moe", "qwen3_next", "qwen3_moe")


def _rewrite_tensors(d, fn):
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_cli_missing_tensor(qmoe_src, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite_tensors(qmoe_src, lambda sd: sd.pop(name))
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o", "--bits", "16"), name, "not found")
    assert not (tmp_path / "o").exists()


def test_cli_wrong_shape(qmoe_src, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_tensors(qmoe_src, lambda sd: sd.__setitem__(name, np.zeros((30, 64), np.float32)))
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o", "--bits", "16"),
                        "model.safetensors", name, "shape", "[30, 64]", "[32, 64]")


def test_cli_truncated_safetensors(qmoe_src, tmp_path):
    p = qmoe_src / "model.safetensors"
    os.truncate(p, os.path.getsize(p) // 2)
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o", "--bits", "16"), p, "truncated")


@pytest.mark.parametrize("how", ["json", "length"])
def test_cli_corrupt_header(qmoe_src, tmp_path, how):
    p = qmoe_src / "model.safetensors"
    with open(p, "r+b") as f:
        if how == "json":
            f.seek(8)
            f.write(b"#garbage")
        else:
            f.write((2 ** 40).to_bytes(8, "little"))
    _assert_clean_error(_cli("convert", qmoe_src, tmp_path / "o", "--bits", "16"), p, "header")


def test_cli_unwritable_destination(qmoe_src, tmp_path):
    if os.geteuid() == 0:
        dst = "/sys/pyflashmoe-test-out"          # read-only even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        dst = ro / "out"
    _assert_clean_error(_cli("convert", qmoe_src, dst, "--bits", "16"), dst)
    assert not os.path.exists(dst)


def test_cli_existing_destination_needs_force(qmoe_src, tmp_path):
    dst = tmp_path / "o"
    r = _cli("convert", qmoe_src, dst, "--bits", "16", "-q")
    assert r.returncode == 0, r.stderr
    before = (dst / "pyflashmoe.json").read_bytes()
    _assert_clean_error(_cli("convert", qmoe_src, dst, "--bits", "16", "-q"), dst, "--force")
    assert (dst / "pyflashmoe.json").read_bytes() == before
    r = _cli("convert", qmoe_src, dst, "--bits", "8", "--group-size", "32", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "pyflashmoe.json").read_text())["quantization"]["experts"]["bits"] == 8
    # a non-empty directory that is not a model dir is never replaced, even with --force
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    _assert_clean_error(_cli("convert", qmoe_src, other, "--bits", "16", "--force"), other)
    assert (other / "keep.txt").exists()


def test_cli_killed_midway_leaves_nothing_loadable(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pyflashmoe.errors import FormatError
    src = tmp_path / "mid"
    _big_checkpoint(src, n_layers=4, E=64, H=512, I=512)[0]
    dst = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "pyflashmoe", "convert", str(src), str(dst), "--bits", "4",
                          "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmpdir = None
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        c = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
        if c and os.path.exists(tmp_path / c[0] / "experts" / "L001.safetensors"):
            tmpdir = tmp_path / c[0]
            break
        time.sleep(0.02)
    assert p.poll() is None and tmpdir is not None, "convert finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not dst.exists()
    assert not (tmpdir / "pyflashmoe.json").exists()
    with pytest.raises(FormatError):
        ModelDir(tmpdir)
    _assert_clean_error(_cli("info", dst), dst)
    r = _cli("convert", src, dst, "--bits", "16", "-q")
    assert r.returncode == 0, r.stderr
    ModelDir(dst)
    assert not tmpdir.exists()          # the dead process's temp dir was cleaned up


def test_cli_info_and_verify(qmoe_src, tmp_path):
    dst = tmp_path / "o"
    assert _cli("convert", qmoe_src, dst, "--bits", "16", "-q").returncode == 0
    r = _cli("info", dst)
    assert r.returncode == 0, r.stderr
    assert "qwen3_moe" in r.stdout and "8 per layer" in r.stdout
    r = _cli("verify", dst, "-q")
    assert r.returncode == 0 and "match" in r.stdout, r.stderr
    f = dst / "experts" / "L002.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(5000)
        b = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([b[0] ^ 0x40]))
    r = _cli("verify", dst, "-q")
    _assert_clean_error(r, "experts/L002.safetensors")
    # the block's crc32 (block_crc32) names the damaged expert; the file's sha256 catches it too
    assert "crc32" in r.stderr or "sha256" in r.stderr, r.stderr
    # a truncated data file is caught by the size check already (info and verify)
    os.truncate(f, os.path.getsize(f) - 1)
    _assert_clean_error(_cli("info", dst), "L002.safetensors", "size")


def test_dense_row_chunking_gives_identical_files(tiny_dirs, tmp_path, monkeypatch):
    """Big dense matrices are streamed in row chunks; tiny chunks must give the same bytes."""
    import pyflashmoe.convert as conv
    src, cfg = tiny_dirs["qwen3_moe"]
    _fp8_checkpoint(src, tmp_path / "fp8")
    cases = [(src, dict(bits=16, dense_bits=8, group_size=32)), (src, dict(bits=16)),
             (tmp_path / "fp8", dict(bits=16)), (tmp_path / "fp8", dict(bits=16, dense_bits=8, group_size=32))]
    for i, (s, kw) in enumerate(cases):
        convert(s, tmp_path / f"big{i}", progress=False, **kw)
        monkeypatch.setattr(conv, "DENSE_CHUNK", 700)      # a few rows per chunk
        convert(s, tmp_path / f"small{i}", progress=False, **kw)
        monkeypatch.setattr(conv, "DENSE_CHUNK", 32 << 20)
        a = (tmp_path / f"big{i}" / "dense.safetensors").read_bytes()
        b = (tmp_path / f"small{i}" / "dense.safetensors").read_bytes()
        assert a == b, (s, kw)


# ---- per-block checksums (manifest experts.layers[il].block_crc32) ------------------------------

def _check_block_crcs(d):
    import zlib
    md = ModelDir(d)
    layers = md.manifest["experts"]["layers"]
    assert layers
    for k, L in layers.items():
        crcs = L["block_crc32"]
        assert isinstance(crcs, list) and len(crcs) == L["n_experts"] == md.spec.n_experts, k
        assert all(isinstance(c, int) and 0 <= c < 2 ** 32 for c in crcs), k
        with open(os.path.join(d, L["file"]), "rb") as f:
            f.seek(L["data_offset"])
            for e in range(L["n_experts"]):
                blk = f.read(L["block_bytes"])
                assert len(blk) == L["block_bytes"]
                assert zlib.crc32(blk) == crcs[e], (k, e)
    return layers


@pytest.mark.parametrize("kw", [dict(bits=16), dict(bits=4, group_size=32)])
def test_block_crc32_recorded(tiny_dirs, tmp_path, kw):
    src, _ = tiny_dirs["qwen3_5_moe"]
    fused, _ = rewrite_checkpoint(src, tmp_path / "fused", layout="fused")
    for s in (src, fused):
        d = tmp_path / f"o-{os.path.basename(s)}"
        convert(s, d, progress=False, **kw)
        layers = _check_block_crcs(d)
        assert len(set(layers["0"]["block_crc32"])) == len(layers["0"]["block_crc32"])   # distinct experts


def test_block_crc32_mlx_repacked(tmp_path):
    pytest.importorskip("mlx_lm")
    src, _ = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=2)
    mlx = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=32)
    convert(mlx, tmp_path / "o", progress=False)
    _check_block_crcs(tmp_path / "o")


# ---- counts checked before anything is sized from them ---------------------------------------

@pytest.mark.parametrize("value", [1e9, 10 ** 9, 1024, 5, "4", 0])
def test_huge_layer_count_fails_fast(qmoe_src, tmp_path, value):
    import time
    import tracemalloc
    from pyflashmoe.errors import FormatError
    cfg = json.loads((qmoe_src / "config.json").read_text())
    cfg["num_hidden_layers"] = value
    cfg.pop("layer_types", None)
    (qmoe_src / "config.json").write_text(json.dumps(cfg))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="num_hidden_layers|config.json"):
        convert(qmoe_src, tmp_path / "o", bits=16, progress=False)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dt < 5 and peak < 256 << 20, (dt, peak)     # the bug: 20+ s and 3.8 GB
    assert os.listdir(tmp_path) == ["src"]          # nothing created beside the destination
