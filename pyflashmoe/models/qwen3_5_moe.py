"""Qwen3.5-MoE (HF model_type `qwen3_5_moe`, text config `qwen3_5_moe_text`).

Follows transformers `models/qwen3_5_moe/modeling_qwen3_5_moe.py`: hybrid layers (GatedDeltaNet with
separate in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, full attention every
`full_attention_interval`-th layer with a per-head [q | gate] q_proj), zero-centred RMSNorms
(x̂*(1+w)), every layer MoE with a shared expert, router top-k always renormalized.
"""
from pyflashmoe.models import (LayerSpec, ModelSpec, TensorMap, common_tensors, eos_ids,
                               ffn_tensors, full_attn_tensors, hybrid_layer_kinds,
                               layer_norm_tensors, linear_attn_common, rope_params)


def spec_from_config(cfg, generation_config=None):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta, rdim = rope_params(cfg, hd, 0.25)
    attn = hybrid_layer_kinds(cfg)
    n_exp = cfg["num_experts"]
    return ModelSpec(
        arch="qwen3_5_moe", hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0, layers=tuple(LayerSpec(a, "moe") for a in attn),
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"], head_dim=hd,
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=True,
        linear_n_k_heads=cfg["linear_num_key_heads"], linear_n_v_heads=cfg["linear_num_value_heads"],
        linear_k_dim=cfg["linear_key_head_dim"], linear_v_dim=cfg["linear_value_head_dim"],
        linear_conv_kernel=cfg.get("linear_conv_kernel_dim", 4),
        n_experts=n_exp, n_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=True,
        shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
        intermediate_size=0, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        bos_token_id=cfg["bos_token_id"] if isinstance(cfg.get("bos_token_id"), int) else -1,
        eos_token_ids=eos_ids(cfg, generation_config))


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
