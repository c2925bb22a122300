"""Qwen3-MoE (HF model_type `qwen3_moe`).

Follows transformers `models/qwen3_moe/modeling_qwen3_moe.py`: every layer full attention (no
output gate, q/k RMSNorm per head, full RoPE), plain RMSNorms (x̂*w), MoE layers without a shared
expert, dense MLP layers from mlp_only_layers / decoder_sparse_step. transformers names the
expert count `num_local_experts` when it writes config.json; checkpoints use `num_experts`.
"""
from pyflashmoe.models import (LIMITS, ConfigFields, LayerSpec, ModelSpec, common_fields,
                               common_tensors, eos_ids, ffn_tensors, full_attn_tensors,
                               layer_norm_tensors, moe_layer_kinds, rope_params)


# registry data (pyflashmoe/models/__init__.py): other model_type names this module serves, and
# what ModelSpec.check requires of a spec with arch qwen3_moe
ALIASES = ("qwen3_moe_text",)
RULES = {"norm_offset": 0.0, "attn_output_gate": False, "attn_kinds": ("full",),
         "ffn_kinds": ("moe", "dense")}


# model features (docs/INTERNALS.md section 1): softmax top-K routing, SwiGLU experts, sigmoid
# shared-expert gate, plain causal attention (LayerSpec defaults: no sliding window, no sinks)
FEATURES = dict(router="softmax_topk", router_bias=False, router_n_group=1, router_topk_group=1,
                routed_scaling_factor=1.0, expert_act="swiglu", shared_gate="sigmoid")


def spec_from_config(cfg, generation_config=None):
    f = ConfigFields(cfg)
    c = common_fields(f)
    theta, rdim = rope_params(f, c["head_dim"], 1.0)
    key = "num_experts" if f.has("num_experts") else "num_local_experts"
    n_exp = f.int(key, 0, LIMITS["n_experts"])
    ffn = moe_layer_kinds(f, n_exp, c["n_layers"])
    return ModelSpec(
        arch="qwen3_moe", norm_offset=0.0, layers=tuple(LayerSpec("full", x) for x in ffn),
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=False, **c,
        n_experts=n_exp,
        moe_intermediate_size=f.int("moe_intermediate_size", 0, LIMITS["moe_intermediate_size"]),
        norm_topk_prob=f.bool("norm_topk_prob", False),
        shared_expert_intermediate_size=0,
        intermediate_size=(f.int("intermediate_size", 0, LIMITS["intermediate_size"], 0)
                           if "dense" in ffn else 0),
        eos_token_ids=eos_ids(f, generation_config),
        **FEATURES)


def tensor_map(spec):
    out = common_tensors(spec, zc=False)
    for i in range(spec.n_layers):
        out += layer_norm_tensors(spec, i, zc=False)
        out += full_attn_tensors(spec, i, zc=False)
        out += ffn_tensors(spec, i)
    return out
