"""Model features as spec data (issue 12 item 4): each CPU op of csrc/fm_ops.c against a reference
nobody here wrote, the spec fields' validation (Python and C), and a whole model whose expert parts
have different formats and biases.

References: transformers' DeepSeek-V3 router (DeepseekV3TopkRouter: sigmoid scores, correction
bias, group-limited top-K, routed scaling factor), gpt-oss router (GptOssTopKRouter: logit bias,
top-K then softmax), gpt-oss experts (GptOssExperts: clamped SwiGLU with biases, interleaved
gate_up), gpt-oss eager attention (eager_attention_forward: sinks) under transformers' own
sliding-window causal mask function (masking_utils).
"""
import copy
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
core = pytest.importorskip("pyflashmoe._core")

from pyflashmoe.errors import FormatError  # noqa: E402
from pyflashmoe.models import ModelSpec, spec_from_config  # noqa: E402

if not hasattr(core, "_ref_route"):
    pytest.skip("pyflashmoe._core was built without the model-feature test entry points",
                allow_module_level=True)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


# ---------------------------------------------------------------- routing

def _deepseek_route(logits, bias, K, n_group, topk_group, norm, scale):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    E = logits.shape[1]
    cfg = transformers.DeepseekV3Config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=K,
                                        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                        routed_scaling_factor=scale)
    r = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))           # router_logits = the input rows
        r.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, w, idx = r(torch.from_numpy(logits))
    return idx.numpy(), w.numpy()


def _by_expert(idx, w):
    """(sorted ids, their weights) per row: the references return the top-K unsorted"""
    o = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, o, 1), np.take_along_axis(w, o, 1)


@pytest.mark.parametrize("E,K,n_group,topk_group,norm,scale", [
    (8, 2, 1, 1, True, 1.0),
    (16, 4, 4, 2, True, 2.5),
    (64, 6, 8, 3, False, 1.0),
    (32, 8, 4, 1, True, 1.5),
    (256, 8, 8, 4, True, 2.5),    # DeepSeek-V3's own configuration
])
def test_sigmoid_group_router_matches_deepseek_v3(E, K, n_group, topk_group, norm, scale):
    rng = np.random.default_rng(E * 100 + K)
    logits = (rng.standard_normal((24, E)) * 2).astype(np.float32)
    bias = (rng.standard_normal(E) * 0.3).astype(np.float32)
    ri, rw = _deepseek_route(logits, bias, K, n_group, topk_group, norm, scale)
    oi, ow = core._ref_route(logits, K, "sigmoid_topk", bias=bias, norm=norm, n_group=n_group,
                             topk_group=topk_group, scale=scale)
    ri, rw = _by_expert(ri, rw)
    oi2, ow2 = _by_expert(oi, ow)
    np.testing.assert_array_equal(oi2, ri)
    assert _rel(ow2, rw) < 1e-6
    # ours are in descending order of the biased selection score
    sel = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
    assert (np.diff(np.take_along_axis(sel, oi.astype(np.int64), 1), axis=1) <= 0).all()
    # the bias steers the choice only: without it other experts win, and the weights never see it
    ni, _ = core._ref_route(logits, K, "sigmoid_topk", norm=norm, n_group=n_group,
                            topk_group=topk_group, scale=scale)
    assert (np.sort(ni, 1) != oi2).any()


def test_softmax_router_with_logit_bias_matches_gpt_oss():
    """softmax over all experts + top-K + renormalisation == gpt-oss's top-K then softmax over the K"""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    E, K = 32, 4
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((16, E)) * 2).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    cfg = transformers.GptOssConfig(hidden_size=E, num_local_experts=E, num_experts_per_tok=K)
    r = GptOssTopKRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
        r.bias.copy_(torch.from_numpy(bias))
        _, rw, ri = r(torch.from_numpy(logits))
    ri, rw = _by_expert(ri.numpy(), rw.numpy())
    oi, ow = _by_expert(*core._ref_route(logits, K, "softmax_topk", bias=bias, norm=True))
    np.testing.assert_array_equal(oi, ri)
    assert _rel(ow, rw) < 1e-6


def test_default_router_is_the_qwen_router():
    """the default router (softmax, no bias, scale 1) is the arithmetic the CUDA tests compare with"""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((10, 16)).astype(np.float32)
    for norm in (True, False):
        a = core._ref_route(logits, 4, "softmax_topk", norm=norm)
        b = core._kernel_route(False, logits, 4, norm)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ref_i = np.argsort(-p, axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(a[0], ref_i)
        ref_w = np.take_along_axis(p, ref_i, 1)
        if norm:
            ref_w /= ref_w.sum(1, keepdims=True)
        assert _rel(a[1], ref_w) < 1e-6


# ---------------------------------------------------------------- experts

@pytest.mark.parametrize("limit,alpha", [(7.0, 1.702), (1.5, 1.0)])
def test_clamped_swiglu_with_biases_matches_gpt_oss(limit, alpha):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    H, I, E = 48, 40, 4
    cfg = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                    swiglu_limit=limit, swiglu_alpha=alpha)
    ex = GptOssExperts(cfg)
    # older transformers hard-code alpha 1.702 / limit 7.0 instead of reading the config
    ex.alpha, ex.limit = alpha, limit
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * (3 / H ** 0.5))
        ex.gate_up_proj_bias.copy_(torch.randn(ex.gate_up_proj_bias.shape, generator=g))
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * (1 / I ** 0.5))
        ex.down_proj_bias.copy_(torch.randn(ex.down_proj_bias.shape, generator=g))
    x = torch.randn(1, H, generator=g)
    n_clamped = 0
    for e in range(E):
        with torch.no_grad():
            ref = ex(x, torch.tensor([[e]]), torch.tensor([[1.0]])).numpy()
        gu = ex.gate_up_proj[e].detach().numpy()          # [H, 2I], gate / up interleaved
        gub = ex.gate_up_proj_bias[e].detach().numpy()
        wg, wu = gu[:, ::2].T, gu[:, 1::2].T             # -> [I, H] each
        bg, bu = gub[::2], gub[1::2]
        wd = ex.down_proj[e].detach().numpy().T           # [I, H] -> [H, I]
        bd = ex.down_proj_bias[e].detach().numpy()
        xn = x.numpy()
        n_clamped += int((np.abs(xn @ wg.T + bg) > limit).sum() + (np.abs(xn @ wu.T + bu) > limit).sum())
        ours = core._ref_expert(xn, wg, wu, wd, bg, bu, bd, act="swiglu_clamp", limit=limit, alpha=alpha)
        assert _rel(ours, ref) < 1e-5, e
    assert n_clamped > 0   # the clamp was exercised


def test_swiglu_with_part_biases_matches_numpy():
    rng = np.random.default_rng(6)
    H, I = 32, 24
    x = rng.standard_normal((3, H)).astype(np.float32)
    wg, wu = (rng.standard_normal((I, H)) * 0.3).astype(np.float32), (rng.standard_normal((I, H)) * 0.3).astype(np.float32)
    wd = (rng.standard_normal((H, I)) * 0.3).astype(np.float32)
    bg, bu, bd = (rng.standard_normal(n).astype(np.float32) for n in (I, I, H))
    gt, up = x @ wg.T + bg, x @ wu.T + bu
    ref = (gt / (1 + np.exp(-gt)) * up) @ wd.T + bd
    assert _rel(core._ref_expert(x, wg, wu, wd, bg, bu, bd), ref) < 1e-5
    nob = (gt - bg) / (1 + np.exp(-(gt - bg))) * (up - bu) @ wd.T
    assert _rel(core._ref_expert(x, wg, wu, wd), nob) < 1e-5


# ---------------------------------------------------------------- attention

def _gpt_oss_attention(q, kc, vc, pos, nh, nkv, dh, window, sinks):
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    n, T = q.shape[0], kc.shape[0]
    fn = sliding_window_causal_mask_function(window) if window else causal_mask_function
    allowed = torch.tensor([[bool(fn(0, 0, torch.tensor(pos + t), torch.tensor(j))) for j in range(T)]
                            for t in range(n)])
    mask = torch.zeros(n, T)
    mask[~allowed] = torch.finfo(torch.float32).min

    class M(torch.nn.Module):
        pass
    mod = M().eval()
    mod.num_key_value_groups = nh // nkv
    mod.sinks = torch.from_numpy(sinks) if sinks is not None else torch.full((nh,), -1e30)
    Q = torch.from_numpy(q).view(1, n, nh, dh).transpose(1, 2)
    Kt = torch.from_numpy(kc).view(1, T, nkv, dh).transpose(1, 2)
    Vt = torch.from_numpy(vc).view(1, T, nkv, dh).transpose(1, 2)
    out, _ = eager_attention_forward(mod, Q, Kt, Vt, mask[None, None], dh ** -0.5)
    return out.reshape(n, nh * dh).numpy()


@pytest.mark.parametrize("nh,nkv,dh,window,pos,n,sinks", [
    (4, 2, 16, 8, 20, 5, True),
    (8, 1, 32, 4, 9, 1, True),     # decode, MQA
    (4, 4, 16, 16, 40, 3, False),  # window only
    (4, 2, 16, 0, 12, 4, True),    # sinks only
    (6, 3, 8, 1, 5, 2, True),      # a window of one key
])
def test_attention_sinks_and_sliding_window_match_gpt_oss(nh, nkv, dh, window, pos, n, sinks):
    rng = np.random.default_rng(nh * 7 + pos)
    T = pos + n
    q = rng.standard_normal((n, nh * dh)).astype(np.float32)
    kc = rng.standard_normal((T, nkv * dh)).astype(np.float32)
    vc = rng.standard_normal((T, nkv * dh)).astype(np.float32)
    s = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    ref = _gpt_oss_attention(q, kc, vc, pos, nh, nkv, dh, window, s)
    ours = core._ref_attend(q, kc, vc, pos, nh, nkv, dh, window=window, sinks=s)
    assert _rel(ours, ref) < 2e-6
    # each option changes the result (the comparison above is not vacuous)
    plain = core._ref_attend(q, kc, vc, pos, nh, nkv, dh)
    assert _rel(plain, ref) > 1e-3


def test_default_attention_is_bit_identical_to_the_plain_head():
    rng = np.random.default_rng(8)
    nh, nkv, dh, pos, n = 4, 2, 16, 6, 3
    q = rng.standard_normal((n, nh * dh)).astype(np.float32)
    k = rng.standard_normal((n, nkv * dh)).astype(np.float32)
    v = rng.standard_normal((n, nkv * dh)).astype(np.float32)
    kc = np.zeros((pos + n, nkv * dh), np.float32)
    vc = np.zeros_like(kc)
    kc[:pos] = rng.standard_normal((pos, nkv * dh))
    vc[:pos] = rng.standard_normal((pos, nkv * dh))
    # the CUDA tests' reference (q/k norm and RoPE off: rot 0, no norms) writes k, v at pos..
    out, kc2, vc2 = core._kernel_attention(False, q, k, v, None, None, kc, vc, pos, nh, nkv, dh, 0,
                                           10000.0, False, 1e-6, 0.0)
    ours = core._ref_attend(q, kc2, vc2, pos, nh, nkv, dh)
    np.testing.assert_array_equal(ours, out)
    big = core._ref_attend(q, kc2, vc2, pos, nh, nkv, dh, window=pos + n)   # a window holding every key
    np.testing.assert_array_equal(big, out)


# ---------------------------------------------------------------- spec fields and their checks

def _qwen_cfg():
    return {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}


def test_spec_defaults_are_the_qwen_features_and_round_trip():
    s = spec_from_config(_qwen_cfg())
    d = json.loads(json.dumps(s.to_dict()))
    assert d["router"] == "softmax_topk" and d["router_bias"] is False
    assert (d["router_n_group"], d["router_topk_group"], d["routed_scaling_factor"]) == (1, 1, 1.0)
    assert d["expert_act"] == "swiglu" and d["shared_gate"] == "sigmoid"
    assert d["layers"][0] == {"attn": "full", "ffn": "moe", "sliding_window": 0, "attn_sinks": False}
    assert ModelSpec.from_dict(d) == s
    # a manifest written before these keys loads with the same defaults
    old = {k: v for k, v in d.items() if k not in ("router", "router_bias", "router_n_group",
                                                   "router_topk_group", "routed_scaling_factor",
                                                   "expert_act", "swiglu_limit", "swiglu_alpha",
                                                   "shared_gate")}
    old["layers"] = [{"attn": l["attn"], "ffn": l["ffn"]} for l in d["layers"]]
    assert ModelSpec.from_dict(old) == s


@pytest.mark.parametrize("change,field", [
    ({"router": "softmax"}, "router"),
    ({"router": 3}, "router"),
    ({"expert_act": "gelu"}, "expert_act"),
    ({"shared_gate": "tanh"}, "shared_gate"),
    ({"router_bias": 1}, "router_bias"),
    ({"router_n_group": 3, "router": "sigmoid_topk"}, "router_n_group"),      # 8 % 3
    ({"router_n_group": 4}, "router_n_group"),                                # softmax + groups
    ({"router_n_group": 4, "router_topk_group": 5, "router": "sigmoid_topk"}, "router_topk_group"),
    ({"router_n_group": 4, "router_topk_group": 0, "router": "sigmoid_topk"}, "router_topk_group"),
    ({"router_n_group": 1.5}, "router_n_group"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"routed_scaling_factor": "2"}, "routed_scaling_factor"),
    ({"expert_act": "swiglu_clamp", "swiglu_limit": 0}, "swiglu_limit"),
    ({"swiglu_limit": -1}, "swiglu_limit"),
    ({"swiglu_alpha": True}, "swiglu_alpha"),
])
def test_bad_feature_fields_raise_format_error_naming_the_field(change, field):
    d = spec_from_config(_qwen_cfg()).to_dict()
    d.update(change)
    with pytest.raises(FormatError, match=field):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize("change,field", [
    ({"sliding_window": -1}, "sliding_window"),
    ({"sliding_window": 2.5}, "sliding_window"),
    ({"attn_sinks": "yes"}, "attn_sinks"),
    ({"window": 4}, "window"),
])
def test_bad_layer_feature_fields_raise_format_error(change, field):
    d = spec_from_config(_qwen_cfg()).to_dict()
    d["layers"][1].update(change)
    with pytest.raises(FormatError, match=field):
        ModelSpec.from_dict(d)


def test_layer_options_only_on_full_attention():
    cfg = dict(_qwen_cfg(), model_type="qwen3_next", linear_num_key_heads=2, linear_num_value_heads=2,
               linear_key_head_dim=16, linear_value_head_dim=16, full_attention_interval=2,
               shared_expert_intermediate_size=32)
    d = spec_from_config(cfg).to_dict()
    assert d["layers"][0]["attn"] == "linear"
    d["layers"][0]["sliding_window"] = 8
    with pytest.raises(FormatError, match=r"layers\[0\].*full attention"):
        ModelSpec.from_dict(d)


def test_feature_tensors_are_in_the_tensor_map():
    from pyflashmoe.models import tensor_map
    d = spec_from_config(_qwen_cfg()).to_dict()
    d.update(router="sigmoid_topk", router_bias=True)
    d["layers"][1]["attn_sinks"] = True
    names = {t.name: t for t in tensor_map(ModelSpec.from_dict(d))}
    assert names["blk.0.ffn_router_bias"].shape == (8,) and names["blk.0.ffn_router_bias"].kind == "vector"
    assert names["blk.1.attn_sinks"].shape == (4,) and "blk.0.attn_sinks" not in names



# ---------------------------------------------------------------- whole models (CPU backend)

from feature_models import rebuild  # noqa: E402
from tiny_models import load_tiny_hf, make_tiny_hf  # noqa: E402

N_TOK = 14


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from pyflashmoe.convert import convert
    root = tmp_path_factory.mktemp("features")
    hf, _ = make_tiny_hf("qwen3_moe", str(root / "hf"), seed=3)
    return {"root": root, "hf": hf, "fm16": convert(hf, str(root / "fm16"), bits=16, progress=False)}


def _engine_logits(d, toks, n_prefill):
    """prefill n_prefill tokens, then decode the rest one at a time: logits of every position"""
    from pyflashmoe import format as fmt
    fmt.validate(d)
    ses = core.Session(core.Engine(d, n_threads=2), 64)
    out = [ses.eval(toks[:n_prefill], all_logits=True)]
    for t in toks[n_prefill:]:
        out.append(ses.eval(np.array([t], np.int32), all_logits=True))
    return np.concatenate(out)


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()


def _close(ours, ref, rel=1e-4):
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


MIXED = {0: {"gate": ("affine", 2, 32), "up": ("affine", 4, 64), "down": ("bf16",)},
         1: {"gate": ("f32",), "up": ("affine", 8, 32), "down": ("affine", 3, 32)},
         2: {"gate": ("affine", 6, 64), "up": ("f32",), "down": ("affine", 2, 32)},
         3: {"gate": ("bf16",), "up": ("affine", 5, 64), "down": ("f32",)}}


def test_mixed_part_formats_match_the_dequantized_model(tiny_moe):
    """gate / up / down of different formats (2..8-bit affine with their own group sizes, bf16,
    f32) evaluate as the same model with those weights dequantized (transformers, fp32)"""
    d = str(tiny_moe["root"] / "mixed")
    seen = rebuild(tiny_moe["fm16"], d, parts=lambda il: MIXED[il])
    m = json.load(open(os.path.join(d, "pyflashmoe.json")))
    assert m["experts"]["layers"]["0"]["parts"]["gate"]["bits"] == 2
    assert m["experts"]["layers"]["1"]["parts"]["gate"]["dtype"] == "f32"
    assert len(m["quantization"]["experts"]["formats"]) == 8
    ref_model = load_tiny_hf("qwen3_moe", tiny_moe["hf"])
    with torch.no_grad():
        for il, layer in enumerate(ref_model.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                p = seen[(il, e)]
                ex.gate_up_proj[e].copy_(torch.from_numpy(np.concatenate([p["gate"][0], p["up"][0]])))
                ex.down_proj[e].copy_(torch.from_numpy(p["down"][0]))
    toks = np.random.default_rng(1).integers(3, 512, N_TOK).astype(np.int32)
    ref = _hf_logits(ref_model, toks)
    ours = _engine_logits(d, toks, 9)
    _close(ours, ref)
    # the quantization is not vacuous: the bf16 model differs
    assert np.abs(_engine_logits(tiny_moe["fm16"], toks, 9) - ref).max() > 1e-2 * np.abs(ref).max()


def _all_features(tiny_moe, W=5, limit=0.8, alpha=1.702, scale=2.0):
    """the tiny Qwen3-MoE with every non-default feature: sigmoid router with a correction bias, 4
    groups of 2 with 2 kept, routed scale; clamped SwiGLU; biases on every expert part; a sliding
    window and sinks on every layer; mixed part formats"""
    rng = np.random.default_rng(11)
    spec = json.load(open(os.path.join(tiny_moe["fm16"], "pyflashmoe.json")))["spec"]
    L, E, nh = spec["n_layers"], spec["n_experts"], spec["n_heads"]
    rbias = {i: (rng.standard_normal(E) * 0.3).astype(np.float32) for i in range(L)}
    sinks = {i: (rng.standard_normal(nh) * 1.5).astype(np.float32) for i in range(L)}
    pb = {}

    def part_bias(il, e, pn, rows):
        return pb.setdefault((il, e, pn), (rng.standard_normal(rows) * 0.5).astype(np.float32))
    dense = {f"blk.{i}.ffn_router_bias": rbias[i] for i in range(L)}
    dense.update({f"blk.{i}.attn_sinks": sinks[i] for i in range(L)})
    d = str(tiny_moe["root"] / "features")
    feats = dict(router="sigmoid_topk", router_bias=True, router_n_group=4, router_topk_group=2,
                 routed_scaling_factor=scale, expert_act="swiglu_clamp", swiglu_limit=limit,
                 swiglu_alpha=alpha)
    seen = rebuild(tiny_moe["fm16"], d, spec=feats, layers={"sliding_window": W, "attn_sinks": True},
                   dense=dense, parts=lambda il: MIXED[il], part_bias=part_bias)
    return d, seen, rbias, sinks, feats


def _featured_reference(hf, seen, rbias, sinks, feats, W, monkeypatch):
    """transformers' Qwen3-MoE with DeepSeek-V3's router, gpt-oss's experts and gpt-oss's eager
    attention (sinks) under a sliding-window causal mask"""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    model = load_tiny_hf("qwen3_moe", hf)
    c = model.config
    E, K, H, I = c.num_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size
    dcfg = transformers.DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K,
                                         n_group=feats["router_n_group"],
                                         topk_group=feats["router_topk_group"], norm_topk_prob=True,
                                         routed_scaling_factor=feats["routed_scaling_factor"])
    gcfg = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                     swiglu_limit=feats["swiglu_limit"], swiglu_alpha=feats["swiglu_alpha"])
    monkeypatch.setattr(modeling_qwen3_moe, "eager_attention_forward", modeling_gpt_oss.eager_attention_forward)
    model.set_attn_implementation("eager")
    c.sliding_window = W
    with torch.no_grad():
        for il, layer in enumerate(model.model.layers):
            r = DeepseekV3TopkRouter(dcfg)
            r.weight.copy_(layer.mlp.gate.weight)
            r.e_score_correction_bias.copy_(torch.from_numpy(rbias[il]))
            layer.mlp.gate = r
            ex = modeling_gpt_oss.GptOssExperts(gcfg)
            ex.alpha, ex.limit = feats["swiglu_alpha"], feats["swiglu_limit"]  # older transformers ignore gcfg's
            for e in range(E):
                p = seen[(il, e)]
                gu = np.empty((H, 2 * I), np.float32)
                gu[:, ::2], gu[:, 1::2] = p["gate"][0].T, p["up"][0].T
                gub = np.empty(2 * I, np.float32)
                gub[::2], gub[1::2] = p["gate"][1], p["up"][1]
                ex.gate_up_proj[e].copy_(torch.from_numpy(gu))
                ex.gate_up_proj_bias[e].copy_(torch.from_numpy(gub))
                ex.down_proj[e].copy_(torch.from_numpy(np.ascontiguousarray(p["down"][0].T)))
                ex.down_proj_bias[e].copy_(torch.from_numpy(p["down"][1]))
            layer.mlp.experts = ex
            layer.self_attn.sinks = torch.nn.Parameter(torch.from_numpy(sinks[il]))
            layer.self_attn.sliding_window = W
    return model


def test_all_features_match_transformers(tiny_moe, monkeypatch):
    W = 5
    d, seen, rbias, sinks, feats = _all_features(tiny_moe, W=W)
    ref_model = _featured_reference(tiny_moe["hf"], seen, rbias, sinks, feats, W, monkeypatch)
    toks = np.random.default_rng(2).integers(3, 512, N_TOK).astype(np.int32)
    ref = _hf_logits(ref_model, toks)
    for n_prefill in (N_TOK, 8, 1):    # prefill only; prefill past the window then decode; decode only
        _close(_engine_logits(d, toks, n_prefill), ref)
    # every feature is live: switching any one off (in the manifest) changes the logits
    m = json.load(open(os.path.join(d, "pyflashmoe.json")))
    for what, change in (("window", lambda s: [l.update(sliding_window=0) for l in s["layers"]]),
                         ("groups", lambda s: s.update(router_n_group=1, router_topk_group=1)),
                         ("scale", lambda s: s.update(routed_scaling_factor=1.0)),
                         ("clamp", lambda s: s.update(swiglu_limit=1e6))):
        d2 = str(tiny_moe["root"] / f"off-{what}")
        shutil.copytree(d, d2)
        m2 = copy.deepcopy(m)
        change(m2["spec"])
        from pyflashmoe import format as fmt
        fmt.write_manifest(d2, m2)
        got = _engine_logits(d2, toks, N_TOK)
        assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max(), what


def test_shared_gate_none_matches_transformers_with_the_gate_at_one(tmp_path):
    from pyflashmoe.convert import convert
    hf, cfg = make_tiny_hf("qwen3_next", str(tmp_path / "hf"), seed=4)
    fm16 = convert(hf, str(tmp_path / "fm16"), bits=16, progress=False)
    spec = json.load(open(os.path.join(fm16, "pyflashmoe.json")))["spec"]
    moe = [i for i, l in enumerate(spec["layers"]) if l["ffn"] == "moe"]
    d = str(tmp_path / "nogate")
    rebuild(fm16, d, spec={"shared_gate": "none"}, drop=[f"blk.{i}.shexp_router" for i in moe])

    class One(torch.nn.Module):   # sigmoid(100) == 1.0 in fp32: the shared expert unscaled
        def forward(self, x):
            return torch.full((*x.shape[:-1], 1), 100.0)
    ref_model = load_tiny_hf("qwen3_next", hf)
    for i in moe:
        ref_model.model.layers[i].mlp.shared_expert_gate = One()
    toks = np.random.default_rng(3).integers(3, 512, N_TOK).astype(np.int32)
    ref = _hf_logits(ref_model, toks)
    _close(_engine_logits(d, toks, 9), ref)
    assert np.abs(_engine_logits(fm16, toks, 9) - ref).max() > 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("change,field", [
    ({"router": "softmax"}, "spec.router"),
    ({"router": 7}, "spec.router"),
    ({"expert_act": "gelu"}, "spec.expert_act"),
    ({"shared_gate": "tanh"}, "spec.shared_gate"),
    ({"router_bias": "yes"}, "spec.router_bias"),
    ({"router_n_group": 3, "router": "sigmoid_topk"}, "spec.router_n_group"),
    ({"router_n_group": 4}, "spec.router_n_group"),
    ({"router_n_group": 4, "router_topk_group": 5, "router": "sigmoid_topk"}, "spec.router_topk_group"),
    ({"router_n_group": 1.5}, "spec.router_n_group"),
    ({"routed_scaling_factor": 0}, "spec.routed_scaling_factor"),
    ({"expert_act": "swiglu_clamp", "swiglu_limit": 0}, "spec.swiglu_limit"),
    ({"swiglu_alpha": "x"}, "spec.swiglu_alpha"),
    ({"router_bias": True}, "ffn_router_bias"),            # the bias tensor is missing
    ({"layers": {"sliding_window": -3}}, r"spec.layers\[0\].sliding_window"),
    ({"layers": {"attn_sinks": 1}}, r"spec.layers\[0\].attn_sinks"),
    ({"layers": {"attn_sinks": True}}, "attn_sinks"),       # the sinks tensor is missing
])
def test_bad_features_fail_at_load_naming_the_field(tiny_moe, tmp_path, change, field):
    """both readers refuse: Python's validate (Model.load) and the C parser (embedders)"""
    from pyflashmoe import format as fmt
    d = str(tmp_path / "bad")
    shutil.copytree(tiny_moe["fm16"], d)
    m = json.load(open(os.path.join(d, "pyflashmoe.json")))
    change = dict(change)
    for L in m["spec"]["layers"]:
        L.update(change.pop("layers", None) or {})
    m["spec"].update(change)
    fmt.write_manifest(d, m)
    with pytest.raises(FormatError, match=field):
        fmt.validate(d)
    with pytest.raises(FormatError, match=field):
        core.Engine(d, n_threads=1)


def test_bad_part_bias_fails_at_load(tiny_moe, tmp_path):
    from pyflashmoe import format as fmt
    d = str(tmp_path / "bias")
    rebuild(tiny_moe["fm16"], d, part_bias=lambda il, e, pn, rows: np.ones(rows, np.float32))
    m = json.load(open(os.path.join(d, "pyflashmoe.json")))
    good = copy.deepcopy(m)
    m["experts"]["layers"]["1"]["parts"]["up"]["bias"][1] += 4      # not f32 [rows]
    fmt.write_manifest(d, m)
    for load in (fmt.validate, lambda p: core.Engine(p, n_threads=1)):
        with pytest.raises(FormatError, match=r"parts.*up.*bias"):
            load(d)
    m = copy.deepcopy(good)
    m["experts"]["layers"]["0"]["parts"]["gate"]["bias"][0] = 64      # inside the gate data
    fmt.write_manifest(d, m)
    with pytest.raises(FormatError, match="overlap"):
        fmt.validate(d)


GPU = hasattr(core, "cuda_available") and core.cuda_available()


@pytest.mark.skipif(not GPU, reason="no usable CUDA device (the CUDA backend's refusals need one)")
def test_cuda_backend_refuses_the_features_it_does_not_implement(tiny_moe, tmp_path):
    """each non-default feature the CUDA kernels lack: BackendError at load naming it (and the layer
    for per-layer ones)"""
    from pyflashmoe.errors import BackendError
    spec = json.load(open(os.path.join(tiny_moe["fm16"], "pyflashmoe.json")))["spec"]
    L, nh = spec["n_layers"], spec["n_heads"]
    # (spec.router sigmoid_topk, router_bias, routed_scaling_factor and shared_gate none run on CUDA:
    # test_cuda_routing_features_match_the_cpu_backend)
    cases = [
        ("act", dict(spec={"expert_act": "swiglu_clamp"}), "expert_act"),
        ("window", dict(layers={"sliding_window": 4}), r"layer 0 .*sliding_window"),
        ("sinks", dict(layers={"attn_sinks": True},
                       dense={f"blk.{i}.attn_sinks": np.zeros(nh, np.float32) for i in range(L)}),
         r"layer 0 .*attn_sinks"),
        ("pbias", dict(part_bias=lambda il, e, pn, rows: np.zeros(rows, np.float32)), r"layer 0 .*part biases"),
    ]
    for name, kw, field in cases:
        d = str(tmp_path / name)
        rebuild(tiny_moe["fm16"], d, **kw)
        core.Engine(d, n_threads=1)                       # the CPU backend runs it
        with pytest.raises(BackendError, match=field):
            core.Engine(d, backend=1, n_threads=1)


@pytest.fixture(scope="module")
def cuda_feature_dirs(tiny_moe, tmp_path_factory):
    """tiny models with the routing features the CUDA backend runs: (a) the sigmoid router with a
    correction bias, 4 groups of 2 with 2 kept, renormalised, routed scale 2.5; (b) the softmax
    router with a logit bias and routed scale 2.0; (c) a Qwen3-Next (shared experts) with
    shared_gate none. "defaults": the models they were made from."""
    from pyflashmoe.convert import convert
    root = tmp_path_factory.mktemp("cuda_features")
    rng = np.random.default_rng(21)
    spec = json.load(open(os.path.join(tiny_moe["fm16"], "pyflashmoe.json")))["spec"]
    L, E = spec["n_layers"], spec["n_experts"]
    dense = {f"blk.{i}.ffn_router_bias": (rng.standard_normal(E) * 0.3).astype(np.float32) for i in range(L)}
    dirs = {k: str(root / k) for k in ("sigmoid_groups", "softmax_bias_scale", "shared_gate_none")}
    rebuild(tiny_moe["fm16"], dirs["sigmoid_groups"], dense=dense,
            spec=dict(router="sigmoid_topk", router_bias=True, router_n_group=4, router_topk_group=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5))
    rebuild(tiny_moe["fm16"], dirs["softmax_bias_scale"], dense=dense,
            spec=dict(router_bias=True, routed_scaling_factor=2.0))
    hf, _ = make_tiny_hf("qwen3_next", str(root / "hf_next"), seed=4)
    fm16 = convert(hf, str(root / "fm16_next"), bits=16, progress=False)
    nspec = json.load(open(os.path.join(fm16, "pyflashmoe.json")))["spec"]
    moe = [i for i, l in enumerate(nspec["layers"]) if l["ffn"] == "moe"]
    rebuild(fm16, dirs["shared_gate_none"], spec={"shared_gate": "none"},
            drop=[f"blk.{i}.shexp_router" for i in moe])
    dirs["defaults"] = {"sigmoid_groups": tiny_moe["fm16"], "softmax_bias_scale": tiny_moe["fm16"],
                        "shared_gate_none": fm16}
    return dirs


def _cuda_tier_kwargs(tier, bb):
    return {"resident": {}, "vram_lru": {"vram_budget": 3 * bb},
            "vram_lru+ram_split": {"vram_budget": 3 * bb, "ram_budget": 1 << 30, "debug": {"cpu_split": 0.5}}}[tier]


@pytest.mark.skipif(not GPU, reason="no usable CUDA device (CUDA against CPU logits need one)")
@pytest.mark.parametrize("which", ["sigmoid_groups", "softmax_bias_scale", "shared_gate_none"])
@pytest.mark.parametrize("tier", ["resident", "vram_lru", "vram_lru+ram_split"])
def test_cuda_routing_features_match_the_cpu_backend(cuda_feature_dirs, which, tier):
    """the CUDA backend runs the sigmoid router (bias, groups, scale), the softmax router with a
    logit bias and a routed scale, and shared_gate none: its logits match the CPU backend's (which
    test_all_features_match_transformers / test_shared_gate_none_... pin against transformers),
    prefill then decode, with every expert resident, with a 3-slot VRAM cache, and with the decode's
    CPU split (the host computes RAM-cached misses with the routing weights the GPU made)"""
    d = cuda_feature_dirs[which]
    cpu = core.Engine(d, backend=0, n_threads=2)
    bb = max(cpu.expert_block_bytes(i) for i in range(cpu.n_layers))
    gpu = core.Engine(d, backend=1, n_threads=2, **_cuda_tier_kwargs(tier, bb))
    toks = np.random.default_rng(7).integers(3, cpu.n_vocab, size=12).astype(np.int32)
    sc, sg = core.Session(cpu, 64), core.Session(gpu, 64)
    lc = sc.eval(toks, all_logits=True)
    _close(sg.eval(toks, all_logits=True), lc, rel=2e-4)
    tok = int(np.argmax(lc[-1]))
    for _ in range(8):
        a = sc.eval(np.array([tok], np.int32))
        _close(sg.eval(np.array([tok], np.int32)), a, rel=2e-4)
        tok = int(np.argmax(a))
    assert bool(core.cuda_counters(sg)["resident"]) == (tier == "resident")
    # the feature changes the logits (CUDA ignoring it would fail above)
    ref = core.Session(core.Engine(cuda_feature_dirs["defaults"][which], backend=0, n_threads=2), 64)
    assert np.abs(ref.eval(toks, all_logits=True) - lc).max() > 1e-3 * np.abs(lc).max()


def test_decode_prefetch_predicts_with_the_routers_selection_scores(tiny_moe, tmp_path):
    """the decode prefetch ranks experts as the router chooses them (sigmoid + correction bias):
    with a bias that makes experts 3 and 6 win every choice, every prefetched block is used"""
    spec = json.load(open(os.path.join(tiny_moe["fm16"], "pyflashmoe.json")))["spec"]
    L, E = spec["n_layers"], spec["n_experts"]
    bias = np.zeros(E, np.float32)
    bias[[3, 6]] = 5.0
    d = str(tmp_path / "biased")
    rebuild(tiny_moe["fm16"], d, spec={"router": "sigmoid_topk", "router_bias": True},
            dense={f"blk.{i}.ffn_router_bias": bias for i in range(L)})
    ses = core.Session(core.Engine(d, n_threads=1, prefetch=2), 32)
    toks = np.random.default_rng(5).integers(3, 512, 10).astype(np.int32)
    ses.eval(toks[:2])
    for t in toks[2:]:
        ses.eval(np.array([t], np.int32))
    st = ses.stats()
    assert st["prefetch_blocks"] > 0
    assert st["prefetch_used"] == st["prefetch_blocks"], st
