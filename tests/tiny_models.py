"""Tiny random Hugging Face checkpoints for tests, built with transformers' own model classes.

`make_tiny_hf(arch, path, seed=0, **config_overrides) -> (path, config_dict)` writes a model with
`save_pretrained` (fp32 safetensors) whose every parameter is exactly representable in bf16, so a
bf16 model directory holds the same numbers. Parameters are re-initialised with a spread large
enough that the logits of a few tokens are far from constant (the default init zeroes norm weights
and uses std 0.02, which makes a 64-wide model almost linear and its outputs almost flat).

Architectures: "qwen3_5_moe" (Qwen3_5MoeForCausalLM on a Qwen3_5MoeTextConfig), "qwen3_next",
"qwen3_moe". Defaults: hidden 64, 4 layers, full attention every 2nd layer (hybrid archs), 8 experts,
top-2, moe_intermediate 32, shared expert 48, vocab 512, 4 heads / 2 KV heads of 16, partial rotary
0.25 (rotary_dim 4) on the hybrid archs.
"""
import json
import math
import os

ARCHS = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")

_COMMON = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_HYBRID = dict(
    full_attention_interval=2, linear_conv_kernel_dim=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    shared_expert_intermediate_size=48, partial_rotary_factor=0.25,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)


def _build(arch, kw):
    import transformers as tf
    if arch == "qwen3_5_moe":
        c = dict(_COMMON, **_HYBRID)
        c.update(kw)
        return tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**c))
    if arch == "qwen3_next":
        c = dict(_COMMON, **_HYBRID, intermediate_size=96, norm_topk_prob=True)
        c.update(kw)
        return tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**c))
    if arch == "qwen3_moe":
        c = dict(_COMMON, intermediate_size=96, norm_topk_prob=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        c.update(kw)
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**c))
    raise ValueError(f"make_tiny_hf: unknown arch {arch!r}; expected one of {ARCHS}")


def reinit_(model, seed=0):
    """Random, bf16-exact parameters with a useful spread (in place)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                v = torch.empty(p.shape).uniform_(1.0, 8.0, generator=g).log()
            elif leaf == "dt_bias":
                v = torch.randn(p.shape, generator=g) * 0.5
            elif p.dim() == 1:
                # norm weight: identity value (0 for zero-centred 1+w norms, 1 for plain) + noise
                base = float(p.data.mean().round())
                v = base + torch.randn(p.shape, generator=g) * 0.1
            elif "conv1d" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            else:
                fan_in = p.shape[-1]
                std = min(0.1, max(0.02, 0.6 / math.sqrt(fan_in)))
                if "embed_tokens" in name:
                    std = 0.5
                v = torch.randn(p.shape, generator=g) * std
            p.data.copy_(v.to(p.dtype))
            p.data = p.data.bfloat16().float()


def make_tiny_hf(arch, path, seed=0, **config_overrides):
    """Build, randomise and save a tiny `arch` model to `path`; return (path, config.json dict)."""
    import torch
    torch.manual_seed(seed)
    model = _build(arch, config_overrides).float().eval()
    reinit_(model, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return str(path), cfg


def load_tiny_hf(arch, path):
    """Load a model saved by make_tiny_hf back with transformers (fp32, eval)."""
    import transformers as tf
    cls = {"qwen3_5_moe": tf.Qwen3_5MoeForCausalLM, "qwen3_next": tf.Qwen3NextForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM}[arch]
    return cls.from_pretrained(path, dtype="float32").eval()
