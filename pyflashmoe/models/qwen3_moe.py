"""Qwen3-MoE (HF model_type `qwen3_moe`).

Follows transformers `models/qwen3_moe/modeling_qwen3_moe.py`: every layer full attention (no
output gate, q/k RMSNorm per head, full RoPE), plain RMSNorms (x̂*w), MoE layers without a shared
expert, dense MLP layers from mlp_only_layers / decoder_sparse_step. transformers names the
expert count `num_local_experts` when it writes config.json; checkpoints use `num_experts`.
"""
from pyflashmoe.models import (LayerSpec, ModelSpec, common_tensors, eos_ids, ffn_tensors,
                               full_attn_tensors, layer_norm_tensors, moe_layer_kinds, rope_params)


def spec_from_config(cfg, generation_config=None):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta, rdim = rope_params(cfg, hd, 1.0)
    n_exp = cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]
    ffn = moe_layer_kinds(cfg, n_exp)
    return ModelSpec(
        arch="qwen3_moe", hidden_size=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=0.0, layers=tuple(LayerSpec("full", f) for f in ffn),
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"], head_dim=hd,
        rope_theta=theta, rotary_dim=rdim, attn_output_gate=False,
        n_experts=n_exp, n_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=0,
        intermediate_size=(cfg.get("intermediate_size", 0) or 0) if "dense" in ffn else 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        bos_token_id=cfg["bos_token_id"] if isinstance(cfg.get("bos_token_id"), int) else -1,
        eos_token_ids=eos_ids(cfg, generation_config))


def tensor_map(spec):
    out = common_tensors(spec, zc=False)
    for i in range(spec.n_layers):
        out += layer_norm_tensors(spec, i, zc=False)
        out += full_attn_tensors(spec, i, zc=False)
        out += ffn_tensors(spec, i)
    return out
