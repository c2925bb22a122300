"""ModelSpec from config.json, checked against transformers' own config classes and modules."""
import json

import numpy as np
import pytest

from pyflashmoe.errors import UnsupportedModelError
from pyflashmoe.models import SUPPORTED, ModelSpec, spec_from_config, tensor_map
from tiny_models import ARCHS, load_tiny_hf, make_tiny_hf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    p, cfg = make_tiny_hf(arch, tmp_path_factory.mktemp(arch) / "hf", seed=1)
    return arch, p, cfg


def test_spec_matches_transformers_config(tiny):
    arch, p, cfg = tiny
    model = load_tiny_hf(arch, p)
    c = model.config
    s = spec_from_config(cfg)
    assert s.arch == arch
    assert s.hidden_size == c.hidden_size and s.n_layers == c.num_hidden_layers
    assert s.vocab_size == c.vocab_size and s.head_dim == c.head_dim
    assert s.n_heads == c.num_attention_heads and s.n_kv_heads == c.num_key_value_heads
    # layer kinds as the instantiated transformers layers have them
    for i, layer in enumerate(model.model.layers):
        want_attn = "linear" if hasattr(layer, "linear_attn") else "full"
        assert hasattr(layer, "self_attn") == (want_attn == "full")
        assert s.layers[i].attn == want_attn, i
        assert s.layers[i].ffn == ("moe" if hasattr(layer.mlp, "experts") else "dense")
    # rotary dim as transformers' rotary embedding computes it (inv_freq has rotary_dim/2 entries)
    inv = model.model.rotary_emb.inv_freq
    assert s.rotary_dim == 2 * inv.numel()
    np.testing.assert_allclose(inv[1].item(), s.rope_theta ** (-2 / s.rotary_dim), rtol=1e-6)
    # norm flavour: zero-centred norms are initialised to 0 by transformers' _init_weights, plain to 1
    fresh = type(model)(c)
    w = fresh.model.norm.weight.detach()
    assert s.norm_offset == (1.0 if float(w.abs().max()) == 0.0 else 0.0)
    # the tensor map names exactly the parameters transformers has (besides routed experts)
    names = {n for n, _ in model.named_parameters()} | {n for n in model.state_dict()}
    for tm in tensor_map(s):
        assert tm.src in names, tm


def test_tensor_map_covers_all_non_expert_weights(tiny):
    arch, p, cfg = tiny
    from safetensors import safe_open
    s = spec_from_config(cfg)
    mapped = {tm.src for tm in tensor_map(s)}
    with safe_open(f"{p}/model.safetensors", "np") as f:
        keys = set(f.keys())
    left = {k for k in keys - mapped if ".mlp.experts." not in k}
    assert not left, left


def test_qwen3_next_split_matches_transformers(tmp_path):
    p, cfg = make_tiny_hf("qwen3_next", tmp_path / "hf", seed=2)
    model = load_tiny_hf("qwen3_next", p)
    s = spec_from_config(cfg)
    by = {tm.name: tm for tm in tensor_map(s)}
    la = model.model.layers[0].linear_attn
    x = torch.randn(1, 3, s.hidden_size)
    with torch.no_grad():
        q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(x), la.in_proj_ba(x))
    W = la.in_proj_qkvz.weight.detach().numpy()
    Wba = la.in_proj_ba.weight.detach().numpy()
    xn = x.numpy()[0]
    qkv = xn @ W[list(by["blk.0.ssm_qkv"].rows)].T
    kd = s.linear_n_k_heads * s.linear_k_dim
    np.testing.assert_allclose(qkv[:, :kd], q.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qkv[:, kd:2 * kd], k.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qkv[:, 2 * kd:], v.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xn @ W[list(by["blk.0.ssm_z"].rows)].T, z.reshape(3, -1).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xn @ Wba[list(by["blk.0.ssm_b"].rows)].T, b.reshape(3, -1).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xn @ Wba[list(by["blk.0.ssm_a"].rows)].T, a.reshape(3, -1).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as ei:
        spec_from_config({"model_type": "llama", "hidden_size": 8})
    for t in SUPPORTED:
        assert t in str(ei.value)
    assert "llama" in str(ei.value)


def test_multimodal_config_unwraps_text_config(tmp_path):
    p, cfg = make_tiny_hf("qwen3_5_moe", tmp_path / "hf")
    outer = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
             "text_config": dict(cfg), "vision_config": {"depth": 2}, "tie_word_embeddings": False}
    outer["text_config"].pop("tie_word_embeddings")
    assert spec_from_config(outer) == spec_from_config(cfg)


def test_spec_dict_round_trip(tiny):
    arch, p, cfg = tiny
    s = spec_from_config(cfg)
    d = json.loads(json.dumps(s.to_dict()))
    assert ModelSpec.from_dict(d) == s


def test_dense_layers_from_mlp_only_layers(tmp_path):
    p, cfg = make_tiny_hf("qwen3_moe", tmp_path / "hf", mlp_only_layers=[0, 2])
    s = spec_from_config(cfg)
    model = load_tiny_hf("qwen3_moe", p)
    assert [l.ffn for l in s.layers] == ["dense", "moe", "dense", "moe"]
    assert s.intermediate_size == model.config.intermediate_size
    assert not hasattr(model.model.layers[0].mlp, "experts")
