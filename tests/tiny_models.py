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
    rp = cfg.get("rope_parameters") or {}
    for k in ("rope_theta", "partial_rotary_factor"):
        # older releases (and mlx-lm) read these top-level keys
        if k in rp and k not in cfg:
            cfg[k] = rp[k]
    if "num_local_experts" in cfg and "num_experts" not in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]   # the key Qwen3-MoE releases use
    if "layer_types" in cfg and "full_attention_interval" not in cfg:
        # real Qwen3.5 / Qwen3-Next configs carry both; mlx-lm reads only the interval
        kinds = cfg["layer_types"]
        cfg["full_attention_interval"] = kinds.index("full_attention") + 1 if "full_attention" in kinds \
            else len(kinds) + 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return str(path), cfg


def load_tiny_hf(arch, path):
    """Load a model saved by make_tiny_hf back with transformers (fp32, eval)."""
    import transformers as tf
    cls = {"qwen3_5_moe": tf.Qwen3_5MoeForCausalLM, "qwen3_next": tf.Qwen3NextForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM}[arch]
    return cls.from_pretrained(path, dtype="float32").eval()


def rewrite_checkpoint(src, dst, layout="fused", multimodal=False, shards=1, dtype=None):
    """Rewrite a make_tiny_hf checkpoint into another on-disk layout (what real releases look like).

    layout: "fused" (experts.gate_up_proj [E, 2I, H] with gate rows first, experts.down_proj
    [E, H, I], as transformers 5 holds them and Qwen3.5 releases store them) or "per-expert".
    multimodal: wrap config.json as {"model_type": outer, "text_config": {...}} and prefix the
    text tensors with `model.language_model.` (plus a fake `model.visual.*` and `mtp.*` tensor that
    a converter must skip). shards > 1: split into several files plus model.safetensors.index.json.
    dtype: torch dtype to store floats in (default: keep).
    """
    import re
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(src, f)))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    out = {}
    experts = {}
    for k, v in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m and layout == "fused":
            experts.setdefault(int(m.group(1)), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
            continue
        out[k] = v
    for il, parts in experts.items():
        E = len(parts["gate"])
        gu = torch.stack([torch.cat([parts["gate"][e], parts["up"][e]], 0) for e in range(E)])
        out[f"model.layers.{il}.mlp.experts.gate_up_proj"] = gu.contiguous()
        out[f"model.layers.{il}.mlp.experts.down_proj"] = torch.stack(
            [parts["down"][e] for e in range(E)]).contiguous()
    if dtype is not None:
        out = {k: (v.to(dtype) if v.is_floating_point() and v.dim() > 1 else v) for k, v in out.items()}
    if multimodal:
        out = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in out.items()}
        out["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(8, 4)
        out["mtp.fc.weight"] = torch.zeros(4, 4)
        text = dict(cfg)
        outer_type = {"qwen3_5_moe_text": "qwen3_5_moe"}.get(cfg["model_type"], cfg["model_type"])
        cfg = {"model_type": outer_type, "architectures": ["Qwen3_5MoeForConditionalGeneration"],
               "text_config": text, "vision_config": {"depth": 1, "hidden_size": 8},
               "tie_word_embeddings": text.get("tie_word_embeddings", False)}
    keys = sorted(out)
    if shards <= 1:
        save_file({k: out[k] for k in keys}, os.path.join(dst, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        per = -(-len(keys) // shards)
        wm = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[s * per:(s + 1) * per]
            save_file({k: out[k] for k in part}, os.path.join(dst, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for extra in ("generation_config.json",):
        if os.path.isfile(os.path.join(src, extra)):
            shutil.copyfile(os.path.join(src, extra), os.path.join(dst, extra))
    return str(dst), cfg


def make_mlx_quantized(hf_dir, dst, bits=4, group_size=64, dtype="bfloat16", quant_predicate=None):
    """Quantize an HF checkpoint with mlx_lm.convert (its python API, no network). Qwen3.5-MoE
    sources are first rewritten into the release layout mlx-lm reads (multimodal config, fused
    experts). quant_predicate: mlx_lm.convert's (a callable (path, module) -> bool or
    {"bits", "group_size"} per layer, or a recipe name such as "mixed_2_6"). Returns the MLX
    checkpoint dir."""
    from mlx_lm import convert as mlx_convert
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    src = hf_dir
    if cfg["model_type"] == "qwen3_5_moe_text":
        src = str(dst) + ".hf-release"
        rewrite_checkpoint(hf_dir, src, layout="fused", multimodal=True)
    # dtype bfloat16: scales/biases come out bf16, as in mlx-community checkpoints
    mlx_convert(src, str(dst), quantize=True, q_group_size=group_size, q_bits=bits, dtype=dtype,
                quant_predicate=quant_predicate)
    return str(dst)
