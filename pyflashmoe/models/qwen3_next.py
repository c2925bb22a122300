"""Qwen3-Next (HF model_type `qwen3_next`).

Follows transformers `models/qwen3_next/modeling_qwen3_next.py`. Same math as Qwen3.5-MoE, but the
GatedDeltaNet input projections are fused and interleaved per key-head group
(`fix_query_key_value_ordering`): in_proj_qkvz rows are, for each key head g,
[q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)] with r = nv/nk, and in_proj_ba rows are, for each g,
[b_g (r) | a_g (r)]. The converter splits them into the canonical ssm_qkv (q | k | v, heads in
order), ssm_z, ssm_b, ssm_a by row selection. Dense MLP layers (mlp_only_layers /
decoder_sparse_step) are supported; norm_topk_prob comes from the config.
"""
from pyflashmoe.models import (LayerSpec, ModelSpec, TensorMap, common_tensors, eos_ids,
                               ffn_tensors, full_attn_tensors, hybrid_layer_kinds,
                               layer_norm_tensors, linear_attn_common, moe_layer_kinds, rope_params)


def spec_from_config(cfg, generation_config=None):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta, rdim = rope_params(cfg, hd, 0.25)
    attn = hybrid_layer_kinds(cfg)
    n_exp = cfg["num_experts"]
    ffn = moe_layer_kinds(cfg, n_exp)
    return ModelSpec(
        arch="qwen3_next", hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0, layers=tuple(LayerSpec(a, f) for a, f in zip(attn, ffn)),
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"], head_dim=hd,
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=True,
        linear_n_k_heads=cfg["linear_num_key_heads"], linear_n_v_heads=cfg["linear_num_value_heads"],
        linear_k_dim=cfg["linear_key_head_dim"], linear_v_dim=cfg["linear_value_head_dim"],
        linear_conv_kernel=cfg.get("linear_conv_kernel_dim", 4),
        n_experts=n_exp, n_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
        intermediate_size=(cfg.get("intermediate_size", 0) or 0) if "dense" in ffn else 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        bos_token_id=cfg["bos_token_id"] if isinstance(cfg.get("bos_token_id"), int) else -1,
        eos_token_ids=eos_ids(cfg, generation_config))


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
    if nk and nv % nk:
        raise ValueError(f"linear_num_value_heads {nv} is not a multiple of linear_num_key_heads {nk}")
    qkv, z, b, a = split_rows(nk, nv, dk, dv) if nk else ((), (), (), ())
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
