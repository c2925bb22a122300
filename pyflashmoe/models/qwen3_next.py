"""Qwen3-Next (HF model_type `qwen3_next`).

Follows transformers `models/qwen3_next/modeling_qwen3_next.py`. Same math as Qwen3.5-MoE, but the
GatedDeltaNet input projections are fused and interleaved per key-head group
(`fix_query_key_value_ordering`): in_proj_qkvz rows are, for each key head g,
[q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)] with r = nv/nk, and in_proj_ba rows are, for each g,
[b_g (r) | a_g (r)]. The converter splits them into the canonical ssm_qkv (q | k | v, heads in
order), ssm_z, ssm_b, ssm_a by row selection. Dense MLP layers (mlp_only_layers /
decoder_sparse_step) are supported; norm_topk_prob comes from the config.
"""
from pyflashmoe.errors import FormatError
from pyflashmoe.models import (LIMITS, ConfigFields, LayerSpec, ModelSpec, TensorMap, common_fields,
                               common_tensors, eos_ids, ffn_tensors, full_attn_tensors,
                               hybrid_layer_kinds, layer_norm_tensors, linear_attn_common,
                               linear_fields, moe_layer_kinds, rope_params)


# registry data (pyflashmoe/models/__init__.py): other model_type names this module serves, and
# what ModelSpec.check requires of a spec with arch qwen3_next
ALIASES = ("qwen3_next_text",)
RULES = {"norm_offset": 1.0, "attn_output_gate": True, "attn_kinds": ("full", "linear"),
         "ffn_kinds": ("moe", "dense")}


# model features (docs/INTERNALS.md section 1): softmax top-K routing, SwiGLU experts, sigmoid
# shared-expert gate, plain causal attention (LayerSpec defaults: no sliding window, no sinks)
FEATURES = dict(router="softmax_topk", router_bias=False, router_n_group=1, router_topk_group=1,
                routed_scaling_factor=1.0, expert_act="swiglu", shared_gate="sigmoid")


def spec_from_config(cfg, generation_config=None):
    f = ConfigFields(cfg)
    c = common_fields(f)
    theta, rdim = rope_params(f, c["head_dim"], 0.25)
    attn = hybrid_layer_kinds(f, c["n_layers"])
    n_exp = f.int("num_experts", 0, LIMITS["n_experts"])
    ffn = moe_layer_kinds(f, n_exp, c["n_layers"])
    return ModelSpec(
        arch="qwen3_next", norm_offset=1.0, layers=tuple(LayerSpec(a, x) for a, x in zip(attn, ffn)),
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=True, **c, **linear_fields(f),
        n_experts=n_exp,
        moe_intermediate_size=f.int("moe_intermediate_size", 0, LIMITS["moe_intermediate_size"]),
        norm_topk_prob=f.bool("norm_topk_prob", True),
        shared_expert_intermediate_size=f.int("shared_expert_intermediate_size", 0,
                                              LIMITS["shared_expert_intermediate_size"], 0),
        intermediate_size=(f.int("intermediate_size", 0, LIMITS["intermediate_size"], 0)
                           if "dense" in ffn else 0),
        eos_token_ids=eos_ids(f, generation_config),
        **FEATURES)


def split_rows(nk, nv, dk, dv):
    """Row indices of in_proj_qkvz giving (q, k, v, z) and of in_proj_ba giving (b, a)."""
    r = nv // nk
    per = 2 * dk + 2 * r * dv
    q, k, v, z, b, a = [], [], [], [], [], []
    for g in range(nk):
        base = g * per
        q += range(base, base + dk)
        k += range(base + dk, base + 2 * dk)
        v += range(base + 2 * dk, base + 2 * dk + r * dv)
        z += range(base + 2 * dk + r * dv, base + per)
        b += range(g * 2 * r, g * 2 * r + r)
        a += range(g * 2 * r + r, g * 2 * r + 2 * r)
    return tuple(q + k + v), tuple(z), tuple(b), tuple(a)


def tensor_map(spec):
    out = common_tensors(spec, zc=True)
    H = spec.hidden_size
    nk, nv, dk, dv = spec.linear_n_k_heads, spec.linear_n_v_heads, spec.linear_k_dim, spec.linear_v_dim
    # the GatedDeltaNet row split only matters (and ModelSpec.check only requires nv % nk == 0)
    # when the model has linear-attention layers
    has_linear = any(L.attn == "linear" for L in spec.layers)
    if has_linear and nk and nv % nk:
        raise FormatError(f"spec.linear_n_v_heads: {nv} is not a multiple of linear_n_k_heads {nk}")
    qkv, z, b, a = split_rows(nk, nv, dk, dv) if has_linear and nk else ((), (), (), ())
    for i, L in enumerate(spec.layers):
        out += layer_norm_tensors(spec, i, zc=True)
        if L.attn == "full":
            out += full_attn_tensors(spec, i, zc=True)
        else:
            p = f"model.layers.{i}.linear_attn"
            out += [TensorMap(f"blk.{i}.ssm_qkv", f"{p}.in_proj_qkvz.weight", (len(qkv), H), rows=qkv),
                    TensorMap(f"blk.{i}.ssm_z", f"{p}.in_proj_qkvz.weight", (len(z), H), rows=z),
                    TensorMap(f"blk.{i}.ssm_b", f"{p}.in_proj_ba.weight", (len(b), H), rows=b),
                    TensorMap(f"blk.{i}.ssm_a", f"{p}.in_proj_ba.weight", (len(a), H), rows=a)]
            out += linear_attn_common(spec, i)
        out += ffn_tensors(spec, i)
    return out
