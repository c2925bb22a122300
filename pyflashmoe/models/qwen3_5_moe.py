"""Qwen3.5-MoE (HF model_type `qwen3_5_moe`, text config `qwen3_5_moe_text`).

Follows transformers `models/qwen3_5_moe/modeling_qwen3_5_moe.py`: hybrid layers (GatedDeltaNet with
separate in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, full attention every
`full_attention_interval`-th layer with a per-head [q | gate] q_proj), zero-centred RMSNorms
(x̂*(1+w)), every layer MoE with a shared expert, router top-k always renormalized.
"""
from pyflashmoe.models import (LIMITS, ConfigFields, LayerSpec, ModelSpec, TensorMap, common_fields,
                               common_tensors, eos_ids, ffn_tensors, full_attn_tensors,
                               hybrid_layer_kinds, layer_norm_tensors, linear_attn_common,
                               linear_fields, rope_params)


# registry data (pyflashmoe/models/__init__.py): other model_type names this module serves, and
# what ModelSpec.check requires of a spec with arch qwen3_5_moe
ALIASES = ("qwen3_5_moe_text",)
RULES = {"norm_offset": 1.0, "attn_output_gate": True, "attn_kinds": ("full", "linear"),
         "ffn_kinds": ("moe",),
         "norm_topk_prob": True}  # the HF router renormalises the top-K unconditionally


# model features (docs/INTERNALS.md section 1): softmax top-K routing, SwiGLU experts, sigmoid
# shared-expert gate, plain causal attention (LayerSpec defaults: no sliding window, no sinks)
FEATURES = dict(router="softmax_topk", router_bias=False, router_n_group=1, router_topk_group=1,
                routed_scaling_factor=1.0, expert_act="swiglu", shared_gate="sigmoid")


def spec_from_config(cfg, generation_config=None):
    f = ConfigFields(cfg)
    c = common_fields(f)
    theta, rdim = rope_params(f, c["head_dim"], 0.25)
    attn = hybrid_layer_kinds(f, c["n_layers"])
    return ModelSpec(
        arch="qwen3_5_moe", norm_offset=1.0, layers=tuple(LayerSpec(a, "moe") for a in attn),
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=True, **c, **linear_fields(f),
        n_experts=f.int("num_experts", 1, LIMITS["n_experts"]),
        moe_intermediate_size=f.int("moe_intermediate_size", 1, LIMITS["moe_intermediate_size"]),
        norm_topk_prob=True,
        shared_expert_intermediate_size=f.int("shared_expert_intermediate_size", 0,
                                              LIMITS["shared_expert_intermediate_size"], 0),
        intermediate_size=0, eos_token_ids=eos_ids(f, generation_config),
        **FEATURES)


def tensor_map(spec):
    out = common_tensors(spec, zc=True)
    H = spec.hidden_size
    nk, nv, dk, dv = spec.linear_n_k_heads, spec.linear_n_v_heads, spec.linear_k_dim, spec.linear_v_dim
    for i, L in enumerate(spec.layers):
        out += layer_norm_tensors(spec, i, zc=True)
        if L.attn == "full":
            out += full_attn_tensors(spec, i, zc=True)
        else:
            p = f"model.layers.{i}.linear_attn"
            out += [TensorMap(f"blk.{i}.ssm_qkv", f"{p}.in_proj_qkv.weight", (2 * nk * dk + nv * dv, H)),
                    TensorMap(f"blk.{i}.ssm_z", f"{p}.in_proj_z.weight", (nv * dv, H)),
                    TensorMap(f"blk.{i}.ssm_b", f"{p}.in_proj_b.weight", (nv, H)),
                    TensorMap(f"blk.{i}.ssm_a", f"{p}.in_proj_a.weight", (nv, H))]
            out += linear_attn_common(spec, i)
        out += ffn_tensors(spec, i)
    return out
