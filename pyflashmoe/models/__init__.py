"""Model specs: HF config.json -> normalized ModelSpec, and HF tensor names -> canonical names.

Owns: the ModelSpec / LayerSpec dataclasses (the keys the manifest stores and the C core reads,
docs/INTERNALS.md section 1), the registry (`models/<model_type>.py`, imported by name, plus an
alias dict), and the TensorMap records the converter follows. Does not own: reading or writing
tensors (pyflashmoe.convert, pyflashmoe.format).

Each architecture module defines
    spec_from_config(cfg: dict, generation_config: dict | None) -> ModelSpec
    tensor_map(spec: ModelSpec) -> list[TensorMap]      every dense (non-expert) tensor
and the experts of MoE layer i are read from the HF prefix `model.layers.{i}.mlp`.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

from pyflashmoe.errors import FormatError, UnsupportedModelError

SUPPORTED = ("qwen3_5_moe", "qwen3_next", "qwen3_moe")
ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next_text": "qwen3_next",
           "qwen3_moe_text": "qwen3_moe"}


@dataclass(frozen=True)
class LayerSpec:
    attn: str  # "full" | "linear"
    ffn: str   # "moe" | "dense"

    def to_dict(self):
        return {"attn": self.attn, "ffn": self.ffn}


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    hidden_size: int
    n_layers: int
    vocab_size: int
    rms_norm_eps: float
    norm_offset: float
    layers: tuple
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dim: int
    attn_output_gate: bool
    linear_n_k_heads: int = 0
    linear_n_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv_kernel: int = 0
    n_experts: int = 0
    n_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    intermediate_size: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int = -1
    eos_token_ids: tuple = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [l.to_dict() for l in self.layers]
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise FormatError(f"{where}: missing key(s) {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            kw["layers"] = tuple(LayerSpec(attn=l["attn"], ffn=l["ffn"]) for l in d["layers"])
        except (TypeError, KeyError) as e:
            raise FormatError(f"{where}.layers: malformed entry ({e})") from None
        kw["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        spec = cls(**kw)
        spec.check(where)
        return spec

    def moe_layers(self) -> list[int]:
        return [i for i, l in enumerate(self.layers) if l.ffn == "moe"]

    def check(self, where="spec"):
        if len(self.layers) != self.n_layers:
            raise FormatError(f"{where}.layers: {len(self.layers)} entries but n_layers={self.n_layers}")
        for i, l in enumerate(self.layers):
            if l.attn not in ("full", "linear") or l.ffn not in ("moe", "dense"):
                raise FormatError(f"{where}.layers[{i}]: bad kind {l}")
        for k in ("hidden_size", "n_layers", "vocab_size", "n_heads", "n_kv_heads", "head_dim"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise FormatError(f"{where}.{k}: must be a positive integer, got {getattr(self, k)!r}")
        if any(l.ffn == "moe" for l in self.layers) and (self.n_experts <= 0 or self.n_experts_per_tok <= 0
                                                          or self.moe_intermediate_size <= 0):
            raise FormatError(f"{where}: MoE layers need n_experts, n_experts_per_tok, moe_intermediate_size > 0")
        if any(l.ffn == "dense" for l in self.layers) and self.intermediate_size <= 0:
            raise FormatError(f"{where}.intermediate_size: dense MLP layers need intermediate_size > 0")


@dataclass(frozen=True)
class TensorMap:
    """One canonical dense tensor and where it comes from in an HF checkpoint.

    src: the HF tensor name (after prefix normalization, see pyflashmoe.convert.reader).
    rows: None, or a tuple of row indices of `src` that make up this tensor (fused projections).
    kind: "matrix" (2-D Linear weight, stored bf16 or affine), "vector" (1-D, F32), "conv"
          (conv1d weight [C, 1, K] or MLX [C, K, 1] -> [C, K], F32), "embedding" (tok_embd).
    shape: the canonical shape.
    zc_norm: a zero-centred norm weight that mlx-lm stores as (w + 1) in converted checkpoints.
    """
    name: str
    src: str
    shape: tuple
    kind: str = "matrix"
    rows: tuple | None = None
    zc_norm: bool = False


def normalize_config(config: dict) -> dict:
    """Unwrap a multimodal config (text_config) into a flat text config with a model_type."""
    if not isinstance(config, dict):
        raise FormatError("config.json: top level is not a JSON object")
    if isinstance(config.get("text_config"), dict):
        outer = config
        cfg = dict(config["text_config"])
        for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "quantization",
                  "quantization_config"):
            if k not in cfg and k in outer:
                cfg[k] = outer[k]
        mt = cfg.get("model_type") or outer.get("model_type")
        cfg["model_type"] = mt
        cfg["_outer_model_type"] = outer.get("model_type")
        return cfg
    return dict(config)


def canonical_type(model_type) -> str:
    mt = ALIASES.get(model_type, model_type)
    if mt not in SUPPORTED:
        raise UnsupportedModelError(
            f"config.json: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)} (aliases: {', '.join(sorted(ALIASES))})")
    return mt


def arch_module(model_type):
    return importlib.import_module(f"pyflashmoe.models.{canonical_type(model_type)}")


def spec_from_config(config: dict, generation_config: dict | None = None) -> ModelSpec:
    cfg = normalize_config(config)
    if "model_type" not in cfg or cfg["model_type"] is None:
        raise FormatError("config.json: missing field 'model_type'")
    mod = arch_module(cfg["model_type"])
    try:
        spec = mod.spec_from_config(cfg, generation_config)
    except KeyError as e:
        raise FormatError(f"config.json: missing field {e.args[0]!r} "
                          f"(model_type {cfg['model_type']})") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"config.json: bad value ({e}) (model_type {cfg['model_type']})") from None
    spec.check("config.json")
    return spec


def tensor_map(spec: ModelSpec) -> list[TensorMap]:
    return arch_module(spec.arch).tensor_map(spec)


# ---- helpers shared by the architecture modules -------------------------------------------------

def rope_params(cfg: dict, head_dim: int, default_partial: float):
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    rotary_dim = int(head_dim * prf)
    return float(theta), rotary_dim


def eos_ids(cfg: dict, generation_config: dict | None):
    ids = []
    for src in (cfg.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
        if src is None:
            continue
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return tuple(ids)


def hybrid_layer_kinds(cfg: dict) -> list[str]:
    n = cfg["num_hidden_layers"]
    lt = cfg.get("layer_types")
    if lt:
        if len(lt) != n:
            raise ValueError(f"layer_types has {len(lt)} entries, num_hidden_layers={n}")
        return ["full" if t == "full_attention" else "linear" for t in lt]
    every = cfg.get("full_attention_interval", 4)
    return ["linear" if (i + 1) % every else "full" for i in range(n)]


def moe_layer_kinds(cfg: dict, n_experts: int) -> list[str]:
    sparse = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or [])
    return ["moe" if (i not in only and n_experts > 0 and (i + 1) % sparse == 0) else "dense"
            for i in range(cfg["num_hidden_layers"])]


def common_tensors(spec: ModelSpec, zc: bool) -> list[TensorMap]:
    H, V = spec.hidden_size, spec.vocab_size
    out = [TensorMap("tok_embd", "model.embed_tokens.weight", (V, H), "embedding"),
           TensorMap("output_norm", "model.norm.weight", (H,), "vector", zc_norm=zc)]
    if not spec.tie_word_embeddings:
        out.append(TensorMap("output", "lm_head.weight", (V, H)))
    return out


def full_attn_tensors(spec: ModelSpec, i: int, zc: bool) -> list[TensorMap]:
    p, H, hd = f"model.layers.{i}.self_attn", spec.hidden_size, spec.head_dim
    qrows = spec.n_heads * hd * (2 if spec.attn_output_gate else 1)
    return [TensorMap(f"blk.{i}.attn_q", f"{p}.q_proj.weight", (qrows, H)),
            TensorMap(f"blk.{i}.attn_k", f"{p}.k_proj.weight", (spec.n_kv_heads * hd, H)),
            TensorMap(f"blk.{i}.attn_v", f"{p}.v_proj.weight", (spec.n_kv_heads * hd, H)),
            TensorMap(f"blk.{i}.attn_o", f"{p}.o_proj.weight", (H, spec.n_heads * hd)),
            TensorMap(f"blk.{i}.attn_q_norm", f"{p}.q_norm.weight", (hd,), "vector", zc_norm=zc),
            TensorMap(f"blk.{i}.attn_k_norm", f"{p}.k_norm.weight", (hd,), "vector", zc_norm=zc)]


def layer_norm_tensors(spec: ModelSpec, i: int, zc: bool) -> list[TensorMap]:
    p, H = f"model.layers.{i}", spec.hidden_size
    return [TensorMap(f"blk.{i}.attn_norm", f"{p}.input_layernorm.weight", (H,), "vector", zc_norm=zc),
            TensorMap(f"blk.{i}.ffn_norm", f"{p}.post_attention_layernorm.weight", (H,), "vector",
                      zc_norm=zc)]


def ffn_tensors(spec: ModelSpec, i: int) -> list[TensorMap]:
    p, H = f"model.layers.{i}.mlp", spec.hidden_size
    if spec.layers[i].ffn == "dense":
        I = spec.intermediate_size
        return [TensorMap(f"blk.{i}.ffn_gate", f"{p}.gate_proj.weight", (I, H)),
                TensorMap(f"blk.{i}.ffn_up", f"{p}.up_proj.weight", (I, H)),
                TensorMap(f"blk.{i}.ffn_down", f"{p}.down_proj.weight", (H, I))]
    out = [TensorMap(f"blk.{i}.ffn_router", f"{p}.gate.weight", (spec.n_experts, H))]
    Ish = spec.shared_expert_intermediate_size
    if Ish:
        out += [TensorMap(f"blk.{i}.shexp_gate", f"{p}.shared_expert.gate_proj.weight", (Ish, H)),
                TensorMap(f"blk.{i}.shexp_up", f"{p}.shared_expert.up_proj.weight", (Ish, H)),
                TensorMap(f"blk.{i}.shexp_down", f"{p}.shared_expert.down_proj.weight", (H, Ish)),
                TensorMap(f"blk.{i}.shexp_router", f"{p}.shared_expert_gate.weight", (1, H))]
    return out


def linear_attn_common(spec: ModelSpec, i: int) -> list[TensorMap]:
    """GatedDeltaNet tensors that every hybrid arch stores the same way."""
    p, H = f"model.layers.{i}.linear_attn", spec.hidden_size
    nk, nv, dk, dv = spec.linear_n_k_heads, spec.linear_n_v_heads, spec.linear_k_dim, spec.linear_v_dim
    C = 2 * nk * dk + nv * dv
    return [TensorMap(f"blk.{i}.ssm_conv", f"{p}.conv1d.weight", (C, spec.linear_conv_kernel), "conv"),
            TensorMap(f"blk.{i}.ssm_dt_bias", f"{p}.dt_bias", (nv,), "vector"),
            TensorMap(f"blk.{i}.ssm_A_log", f"{p}.A_log", (nv,), "vector"),
            TensorMap(f"blk.{i}.ssm_norm", f"{p}.norm.weight", (dv,), "vector"),
            TensorMap(f"blk.{i}.ssm_out", f"{p}.out_proj.weight", (H, nv * dv))]


def expert_prefix(i: int) -> str:
    return f"model.layers.{i}.mlp"
