"""Model specs: HF config.json -> normalized ModelSpec, and HF tensor names -> canonical names.

Owns: the ModelSpec / LayerSpec dataclasses (the keys the manifest stores and the C core reads,
docs/INTERNALS.md section 1), the registry of model families, and the TensorMap records the
converter follows. Does not own: reading or writing tensors (pyflashmoe.convert, pyflashmoe.format).

A model family is one module `models/<model_type>.py` (its file name is the HF model_type); the
registry finds every such module of this package (pkgutil, names starting with "_" skipped), so
adding a family edits nothing here. Each family module defines
    RULES = dict(norm_offset=..., attn_output_gate=..., attn_kinds=(...), ffn_kinds=(...))
        what ModelSpec.check requires of a spec with this arch (optional key: norm_topk_prob,
        a bool the spec must have, or None for either)
    ALIASES = ("<model_type>_text", ...)            optional: other model_type names it serves
    spec_from_config(cfg: dict, generation_config: dict | None) -> ModelSpec
    tensor_map(spec: ModelSpec) -> list[TensorMap]      every dense (non-expert) tensor
and the experts of MoE layer i are read from the HF prefix `model.layers.{i}.mlp`.
SUPPORTED / ALIASES / ARCH_RULES are built from the modules on first use (registry()).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import threading
from dataclasses import dataclass, field

from pyflashmoe.errors import FlashMoEError, FormatError, UnsupportedModelError


# Bounds on every count a config or manifest may name, checked before anything is sized from it.
# They are far above every released model (Qwen3.5-397B: 60 layers, 512 experts, hidden 4096,
# vocab 248320) and far below what would exhaust memory building lists or tensor maps.
LIMITS = {
    "n_layers": 1024, "hidden_size": 65536, "vocab_size": 1 << 22, "n_heads": 1024,
    "n_kv_heads": 1024, "head_dim": 1024, "n_experts": 4096, "n_experts_per_tok": 4096,
    "moe_intermediate_size": 65536, "shared_expert_intermediate_size": 1 << 18,
    "intermediate_size": 1 << 18, "linear_n_k_heads": 1024, "linear_n_v_heads": 1024,
    "linear_k_dim": 4096, "linear_v_dim": 4096, "linear_conv_kernel": 16,
    "max_position_embeddings": 1 << 24, "rotary_dim": 1024, "token_id": (1 << 31) - 1,
    "eos_token_ids": 1024,
}
ATTN_KINDS = ("full", "linear")
FFN_KINDS = ("moe", "dense")
# model features as data (docs/INTERNALS.md section 1); the first of each is the default
ROUTERS = ("softmax_topk", "sigmoid_topk")
EXPERT_ACTS = ("swiglu", "swiglu_clamp")
SHARED_GATES = ("sigmoid", "none")
# spec keys a manifest may omit (written by older versions): their dataclass defaults apply
OPTIONAL_KEYS = ("bos_token_id", "eos_token_ids", "router", "router_bias", "router_n_group",
                 "router_topk_group", "routed_scaling_factor", "expert_act", "swiglu_limit",
                 "swiglu_alpha", "shared_gate")
# a family module's RULES: the required keys, then the optional ones
RULE_KEYS = ("norm_offset", "attn_output_gate", "attn_kinds", "ffn_kinds")
OPTIONAL_RULE_KEYS = ("norm_topk_prob",)


def is_int(v) -> bool:
    """A JSON integer: int but not bool (floats such as 1e9 are not integers here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite JSON number (int or float, not bool)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _desc(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


@dataclass(frozen=True)
class LayerSpec:
    attn: str  # "full" | "linear"
    ffn: str   # "moe" | "dense"
    sliding_window: int = 0   # full attention: keys of the last `sliding_window` positions only (0: all)
    attn_sinks: bool = False  # full attention: per-head learned logit blk.{i}.attn_sinks in the softmax

    def to_dict(self):
        return {"attn": self.attn, "ffn": self.ffn, "sliding_window": self.sliding_window,
                "attn_sinks": self.attn_sinks}


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
    # routing: "softmax_topk" (softmax over all experts, top-K, renormalised when norm_topk_prob;
    # router_bias adds blk.{i}.ffn_router_bias to the logits first) or "sigmoid_topk" (DeepSeek-V3:
    # sigmoid scores; router_bias is the selection-only correction bias; group-limited top-K over
    # router_n_group groups ranked by the sum of their top-2 biased scores, router_topk_group kept;
    # weights are the unbiased scores, renormalised when norm_topk_prob); weights times
    # routed_scaling_factor
    router: str = "softmax_topk"
    router_bias: bool = False
    router_n_group: int = 1
    router_topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # routed experts: "swiglu" silu(g) * u, or "swiglu_clamp" (gpt-oss) g' = min(g, limit),
    # u' = clamp(u, -limit, limit), (u' + 1) * g' * sigmoid(alpha * g')
    expert_act: str = "swiglu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # shared expert output scale: "sigmoid" (sigmoid(blk.{i}.shexp_router x)) or "none" (1)
    shared_gate: str = "sigmoid"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [l.to_dict() for l in self.layers]
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "ModelSpec":
        """The manifest's spec -> ModelSpec; every field type-checked and bounded (FormatError)."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        # every field to_dict writes is required (the C core reads them without defaults), except
        # the token ids only Python reads
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.name not in OPTIONAL_KEYS]
        if missing:
            raise FormatError(f"{where}: missing key(s) {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        layers = d["layers"]
        if not isinstance(layers, list) or len(layers) > LIMITS["n_layers"]:
            raise FormatError(f"{where}.layers: must be a list of at most {LIMITS['n_layers']} "
                              f"entries, got {_desc(layers) if not isinstance(layers, list) else len(layers)}")
        out = []
        for i, l in enumerate(layers):
            if not isinstance(l, dict) or l.get("attn") not in ATTN_KINDS or l.get("ffn") not in FFN_KINDS:
                raise FormatError(f"{where}.layers[{i}]: must be {{\"attn\": \"full\"|\"linear\", "
                                  f"\"ffn\": \"moe\"|\"dense\"}}, got {_desc(l)}")
            extra = sorted(set(l) - {"attn", "ffn", "sliding_window", "attn_sinks"})
            if extra:
                raise FormatError(f"{where}.layers[{i}]: unknown key(s) {extra}")
            out.append(LayerSpec(attn=l["attn"], ffn=l["ffn"], sliding_window=l.get("sliding_window", 0),
                                 attn_sinks=l.get("attn_sinks", False)))
        kw["layers"] = tuple(out)
        eos = d.get("eos_token_ids", [])
        if not isinstance(eos, list) or len(eos) > LIMITS["eos_token_ids"]:
            raise FormatError(f"{where}.eos_token_ids: must be a list of at most "
                              f"{LIMITS['eos_token_ids']} token ids, got {_desc(eos)}")
        kw["eos_token_ids"] = tuple(eos)
        spec = cls(**kw)
        spec.check(where)
        return spec

    def moe_layers(self) -> list[int]:
        return [i for i, l in enumerate(self.layers) if l.ffn == "moe"]

    def _int(self, where, k, lo, hi=None):
        v = getattr(self, k)
        hi = LIMITS.get(k) if hi is None else hi
        if not is_int(v):
            raise FormatError(f"{where}.{k}: must be an integer, got {_desc(v)}")
        if not lo <= v <= hi:
            raise FormatError(f"{where}.{k}: {v} is out of range [{lo}, {hi}]")

    def _num(self, where, k, lo, hi):
        v = getattr(self, k)
        if not is_num(v):
            raise FormatError(f"{where}.{k}: must be a finite number, got {_desc(v)}")
        if not lo <= v <= hi:
            raise FormatError(f"{where}.{k}: {v} is out of range [{lo}, {hi}]")

    def check(self, where="spec"):
        """Every field's type, its bounds (LIMITS) and the consistency between fields."""
        reg = registry()
        if not isinstance(self.arch, str) or self.arch not in reg.arch_rules:
            raise FormatError(f"{where}.arch: {_desc(self.arch)} is not one of "
                              f"{', '.join(reg.supported)}")
        for k in ("attn_output_gate", "norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, k), bool):
                raise FormatError(f"{where}.{k}: must be true or false, got {_desc(getattr(self, k))}")
        self._int(where, "n_layers", 1)
        if not isinstance(self.layers, tuple) or len(self.layers) != self.n_layers:
            raise FormatError(f"{where}.layers: {len(self.layers)} entries but n_layers={self.n_layers}")
        offset, gate, attn_ok, ffn_ok = reg.arch_rules[self.arch]
        for i, l in enumerate(self.layers):
            if not isinstance(l, LayerSpec) or l.attn not in attn_ok or l.ffn not in ffn_ok:
                raise FormatError(f"{where}.layers[{i}]: bad kind {l!r} for arch {self.arch} "
                                  f"(attn in {list(attn_ok)}, ffn in {list(ffn_ok)})")
        for k in ("hidden_size", "vocab_size", "n_heads", "n_kv_heads", "head_dim"):
            self._int(where, k, 1)
        for k in ("linear_n_k_heads", "linear_n_v_heads", "linear_k_dim", "linear_v_dim",
                  "linear_conv_kernel", "n_experts", "n_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "intermediate_size", "rotary_dim"):
            self._int(where, k, 0)
        self._int(where, "max_position_embeddings", 1)
        self._num(where, "rms_norm_eps", 1e-12, 1.0)
        self._num(where, "rope_theta", 1.0, 1e12)
        self._num(where, "norm_offset", 0.0, 1.0)
        if self.norm_offset != offset or self.attn_output_gate != gate:
            raise FormatError(f"{where}: norm_offset {self.norm_offset} / attn_output_gate "
                              f"{self.attn_output_gate} do not match arch {self.arch} "
                              f"(needs {offset} / {gate})")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"{where}.n_heads: {self.n_heads} is not a multiple of n_kv_heads "
                              f"{self.n_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise FormatError(f"{where}.rotary_dim: {self.rotary_dim} must be even and <= head_dim "
                              f"{self.head_dim}")
        if any(l.attn == "linear" for l in self.layers):
            for k in ("linear_n_k_heads", "linear_n_v_heads", "linear_k_dim", "linear_v_dim",
                      "linear_conv_kernel"):
                self._int(where, k, 1)
            if self.linear_n_v_heads % self.linear_n_k_heads:
                raise FormatError(f"{where}.linear_n_v_heads: {self.linear_n_v_heads} is not a "
                                  f"multiple of linear_n_k_heads {self.linear_n_k_heads}")
        if any(l.ffn == "moe" for l in self.layers):
            for k in ("n_experts", "n_experts_per_tok", "moe_intermediate_size"):
                self._int(where, k, 1)
            if self.n_experts_per_tok > self.n_experts:
                raise FormatError(f"{where}.n_experts_per_tok: {self.n_experts_per_tok} exceeds "
                                  f"n_experts {self.n_experts}")
        if any(l.ffn == "dense" for l in self.layers):
            self._int(where, "intermediate_size", 1)
        ntp = reg.rules[self.arch].get("norm_topk_prob")
        if ntp is not None and self.norm_topk_prob is not ntp:
            # e.g. transformers' Qwen3.5-MoE router renormalises the top-K unconditionally
            raise FormatError(f"{where}.norm_topk_prob: must be {str(ntp).lower()} for arch "
                              f"{self.arch}")
        self.check_features(where)
        if not is_int(self.bos_token_id) or not -1 <= self.bos_token_id <= LIMITS["token_id"]:
            raise FormatError(f"{where}.bos_token_id: must be -1 or a token id, got {_desc(self.bos_token_id)}")
        if (not isinstance(self.eos_token_ids, tuple) or len(self.eos_token_ids) > LIMITS["eos_token_ids"]
                or not all(is_int(t) and 0 <= t <= LIMITS["token_id"] for t in self.eos_token_ids)):
            raise FormatError(f"{where}.eos_token_ids: must be a list of at most "
                              f"{LIMITS['eos_token_ids']} token ids, got {_desc(self.eos_token_ids)}")


    def _choice(self, where, k, choices):
        v = getattr(self, k)
        if not isinstance(v, str) or v not in choices:
            raise FormatError(f"{where}.{k}: {_desc(v)} is not one of {', '.join(choices)}")

    def check_features(self, where="spec"):
        """The model-feature fields (router, expert activation, shared gate, per-layer attention
        options): types, bounds and consistency, FormatError naming the field. The C parser
        (csrc/fm_model.c parse_features) checks the same."""
        self._choice(where, "router", ROUTERS)
        self._choice(where, "expert_act", EXPERT_ACTS)
        self._choice(where, "shared_gate", SHARED_GATES)
        if not isinstance(self.router_bias, bool):
            raise FormatError(f"{where}.router_bias: must be true or false, got {_desc(self.router_bias)}")
        E = self.n_experts if any(l.ffn == "moe" for l in self.layers) else 0
        self._int(where, "router_n_group", 1, max(E, 1))
        self._int(where, "router_topk_group", 1, self.router_n_group)
        self._num(where, "routed_scaling_factor", 1e-6, 1e6)
        self._num(where, "swiglu_limit", 0.0, 1e6)
        self._num(where, "swiglu_alpha", -1e6, 1e6)
        if self.expert_act == "swiglu_clamp" and not self.swiglu_limit > 0:
            raise FormatError(f"{where}.swiglu_limit: must be > 0 with expert_act swiglu_clamp, got "
                              f"{self.swiglu_limit}")
        G, TG = self.router_n_group, self.router_topk_group
        if G > 1 or TG > 1:
            if self.router != "sigmoid_topk":
                raise FormatError(f"{where}.router_n_group: group-limited routing ({G} groups, "
                                  f"{TG} kept) needs router sigmoid_topk, not {self.router}")
            if E % G or E // G < 2:
                raise FormatError(f"{where}.router_n_group: {G} groups must divide n_experts {E} "
                                  f"into groups of at least 2 (ranked by their top-2 scores)")
            if self.n_experts_per_tok > TG * (E // G):
                raise FormatError(f"{where}.router_topk_group: {TG} groups of {E // G} experts "
                                  f"cannot hold n_experts_per_tok {self.n_experts_per_tok}")
        for i, l in enumerate(self.layers):
            sw, sk = l.sliding_window, l.attn_sinks
            if not is_int(sw) or not 0 <= sw <= LIMITS["max_position_embeddings"]:
                raise FormatError(f"{where}.layers[{i}].sliding_window: must be an integer in "
                                  f"[0, {LIMITS['max_position_embeddings']}], got {_desc(sw)}")
            if not isinstance(sk, bool):
                raise FormatError(f"{where}.layers[{i}].attn_sinks: must be true or false, got {_desc(sk)}")
            if l.attn != "full" and (sw or sk):
                raise FormatError(f"{where}.layers[{i}]: sliding_window / attn_sinks apply to full "
                                  f"attention layers only (this layer is {l.attn})")


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
    tc = config.get("text_config")
    if tc is not None and not isinstance(tc, dict):
        raise FormatError(f"config.json: field 'text_config' must be an object, got {_desc(tc)}")
    if isinstance(tc, dict):
        outer = config
        cfg = dict(tc)
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
    reg = registry()
    mt = reg.aliases.get(model_type, model_type) if isinstance(model_type, str) else model_type
    if mt not in reg.supported:   # a tuple: an unhashable model_type is just unsupported
        raise UnsupportedModelError(
            f"config.json: model_type {_desc(model_type)} is not supported; supported: "
            f"{', '.join(reg.supported)} (aliases: {', '.join(sorted(reg.aliases))})")
    return mt


def arch_module(model_type):
    return registry().modules[canonical_type(model_type)]


# ---- the family registry: built from the modules of this package ----------------------------------

@dataclass(frozen=True)
class Registry:
    supported: tuple    # model_types, sorted
    aliases: dict       # alias -> model_type, sorted by alias
    arch_rules: dict    # model_type -> (norm_offset, attn_output_gate, attn kinds, ffn kinds)
    rules: dict         # model_type -> the module's RULES (every key, optional ones None if absent)
    modules: dict       # model_type -> module


_REGISTRY = None
_BUILDING = False
_REGISTRY_LOCK = threading.RLock()
FAMILY_ATTRS = ("RULES", "spec_from_config", "tensor_map")


def _family_error(where, msg):
    return FlashMoEError(
        f"{where}: {msg} (a model family module defines RULES = dict({', '.join(RULE_KEYS)}"
        f"[, {', '.join(OPTIONAL_RULE_KEYS)}]), optional ALIASES, spec_from_config(cfg, "
        f"generation_config) and tensor_map(spec); see pyflashmoe/models/__init__.py)")


def _kinds(where, rules, key, allowed):
    v = rules[key]
    if (not isinstance(v, (tuple, list)) or not v or len(set(v)) != len(v)
            or not all(isinstance(k, str) and k in allowed for k in v)):
        raise _family_error(where, f"RULES[{key!r}] must be a non-empty tuple of distinct "
                                   f"kinds from {list(allowed)}, got {_desc(v)}")
    return tuple(v)


def _check_family(name, mod):
    """A family module's RULES / ALIASES / functions, checked; -> (arch rule tuple, rules, aliases)."""
    where = f"{getattr(mod, '__file__', None) or name} (model family {name!r})"
    missing = [a for a in FAMILY_ATTRS if not hasattr(mod, a)]
    if missing:
        raise _family_error(where, f"missing module attribute(s) {missing}")
    for a in ("spec_from_config", "tensor_map"):
        if not callable(getattr(mod, a)):
            raise _family_error(where, f"{a} must be a function")
    rules = mod.RULES
    if not isinstance(rules, dict):
        raise _family_error(where, f"RULES must be a dict, got {type(rules).__name__}")
    missing = [k for k in RULE_KEYS if k not in rules]
    extra = sorted(set(rules) - set(RULE_KEYS) - set(OPTIONAL_RULE_KEYS), key=str)
    if missing or extra:
        raise _family_error(where, f"RULES has missing key(s) {missing} / unknown key(s) {extra}")
    offset = rules["norm_offset"]
    if not is_num(offset) or not 0.0 <= offset <= 1.0:
        raise _family_error(where, f"RULES['norm_offset'] must be a number in [0, 1], got {_desc(offset)}")
    for k in ("attn_output_gate",):
        if not isinstance(rules[k], bool):
            raise _family_error(where, f"RULES[{k!r}] must be True or False, got {_desc(rules[k])}")
    ntp = rules.get("norm_topk_prob")
    if ntp is not None and not isinstance(ntp, bool):
        raise _family_error(where, f"RULES['norm_topk_prob'] must be None, True or False, got {_desc(ntp)}")
    attn, ffn = _kinds(where, rules, "attn_kinds", ATTN_KINDS), _kinds(where, rules, "ffn_kinds", FFN_KINDS)
    aliases = getattr(mod, "ALIASES", ())
    if (not isinstance(aliases, (tuple, list))
            or not all(isinstance(a, str) and a and a != name for a in aliases)):
        raise _family_error(where, f"ALIASES must be a tuple of other model_type names, got {_desc(aliases)}")
    full = {k: rules.get(k) for k in RULE_KEYS + OPTIONAL_RULE_KEYS}
    full.update(attn_kinds=attn, ffn_kinds=ffn)
    return (offset, rules["attn_output_gate"], attn, ffn), full, tuple(aliases)


def _build_registry() -> Registry:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    modules, arch_rules, rules, aliases = {}, {}, {}, {}
    for name in names:
        modules[name] = importlib.import_module(f"{__name__}.{name}")
        arch_rules[name], rules[name], al = _check_family(name, modules[name])
        for a in al:
            if a in aliases:
                raise _family_error(f"model families {aliases[a]!r} and {name!r}",
                                    f"both claim the alias {a!r}")
            aliases[a] = name
    for a, name in aliases.items():
        if a in modules:
            raise _family_error(f"model family {name!r}", f"alias {a!r} is also the name of a "
                                                        f"family module")
    if not modules:   # pragma: no cover - the package ships its families
        raise FlashMoEError(f"{__name__}: no model family modules found in {list(__path__)}")
    return Registry(tuple(names), dict(sorted(aliases.items())), arch_rules, rules, modules)


def registry(refresh: bool = False) -> Registry:
    """The model families of this package (built on first use; refresh=True scans again, e.g.
    after a module was added to the package path)."""
    global _REGISTRY, _BUILDING
    reg = _REGISTRY
    if reg is not None and not refresh:
        return reg
    with _REGISTRY_LOCK:   # re-entrant: only a family module importing it re-enters here
        if _BUILDING:
            raise FlashMoEError(f"{__name__}: a model family module read SUPPORTED / ALIASES / "
                                f"ARCH_RULES / registry() while the registry was being built")
        if _REGISTRY is None or refresh:
            _REGISTRY, _BUILDING = None, True
            try:
                _REGISTRY = _build_registry()
            finally:
                _BUILDING = False
        return _REGISTRY


def __getattr__(name):
    # SUPPORTED, ALIASES and ARCH_RULES are derived from the family modules (PEP 562)
    if name == "SUPPORTED":
        return registry().supported
    if name == "ALIASES":
        return registry().aliases
    if name == "ARCH_RULES":
        return registry().arch_rules
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MISSING = object()


class ConfigFields:
    """Typed, bounded access to config.json fields; every error is a FormatError naming the field.

    `None` counts as absent (HF configs write null for unset optional fields)."""

    def __init__(self, cfg: dict, where: str = "config.json"):
        self.cfg, self.where = cfg, where

    def _err(self, key, msg):
        return FormatError(f"{self.where}: field {key!r} {msg}")

    def raw(self, key, default=None):
        v = self.cfg.get(key)
        return default if v is None else v

    def has(self, key) -> bool:
        return self.cfg.get(key) is not None

    def int(self, key, lo, hi, default=_MISSING):
        v = self.cfg.get(key)
        if v is None:
            if default is _MISSING:
                raise self._err(key, "is missing")
            return default
        if not is_int(v):
            raise self._err(key, f"must be an integer, got {_desc(v)} ({type(v).__name__})")
        if not lo <= v <= hi:
            raise self._err(key, f"is {v}, out of range [{lo}, {hi}]")
        return v

    def num(self, key, lo, hi, default=_MISSING, src=None, label=None):
        d = self.cfg if src is None else src
        v = d.get(key)
        label = label or key
        if v is None:
            if default is _MISSING:
                raise self._err(label, "is missing")
            return default
        if not is_num(v):
            raise self._err(label, f"must be a finite number, got {_desc(v)}")
        if not lo <= v <= hi:
            raise self._err(label, f"is {v}, out of range [{lo}, {hi}]")
        return float(v)

    def bool(self, key, default):
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {_desc(v)}")
        return v

    def dict(self, key):
        v = self.cfg.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self._err(key, f"must be an object, got {_desc(v)}")
        return v

    def list(self, key, max_len):
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) > max_len:
            raise self._err(key, f"must be a list of at most {max_len} entries, got "
                                 f"{_desc(v) if not isinstance(v, list) else f'{len(v)} entries'}")
        return v


def spec_from_config(config: dict, generation_config: dict | None = None) -> ModelSpec:
    """config.json (+ generation_config.json) -> ModelSpec. Every field the arch reads is
    type-checked and bounded before anything is sized from it; errors are FormatError /
    UnsupportedModelError naming config.json and the field."""
    cfg = normalize_config(config)
    if cfg.get("model_type") is None:
        raise FormatError("config.json: missing field 'model_type'")
    mod = arch_module(cfg["model_type"])
    if generation_config is not None and not isinstance(generation_config, dict):
        generation_config = None
    try:
        spec = mod.spec_from_config(cfg, generation_config)
    except FormatError:
        raise
    except KeyError as e:   # pragma: no cover - every read goes through ConfigFields
        raise FormatError(f"config.json: missing field {e.args[0]!r} "
                          f"(model_type {cfg['model_type']})") from None
    except (TypeError, ValueError, ArithmeticError) as e:   # pragma: no cover - as above
        raise FormatError(f"config.json: bad value ({e}) (model_type {cfg['model_type']})") from None
    spec.check("config.json: spec")
    return spec


def tensor_map(spec: ModelSpec) -> list[TensorMap]:
    return arch_module(spec.arch).tensor_map(spec)


# ---- helpers shared by the architecture modules -------------------------------------------------

def common_fields(f: ConfigFields) -> dict:
    """Fields every arch reads the same way, checked and bounded (keys as in ModelSpec)."""
    L = LIMITS
    d = {"hidden_size": f.int("hidden_size", 1, L["hidden_size"]),
         "n_layers": f.int("num_hidden_layers", 1, L["n_layers"]),
         "vocab_size": f.int("vocab_size", 1, L["vocab_size"]),
         "n_heads": f.int("num_attention_heads", 1, L["n_heads"]),
         "n_kv_heads": f.int("num_key_value_heads", 1, L["n_kv_heads"]),
         "rms_norm_eps": f.num("rms_norm_eps", 1e-12, 1.0, 1e-6),
         "tie_word_embeddings": f.bool("tie_word_embeddings", False),
         "max_position_embeddings": f.int("max_position_embeddings", 1, L["max_position_embeddings"], 4096),
         "n_experts_per_tok": f.int("num_experts_per_tok", 1, L["n_experts_per_tok"])}
    hd = f.int("head_dim", 1, L["head_dim"], 0)
    if not hd:
        hd = d["hidden_size"] // d["n_heads"]
        if not 1 <= hd <= L["head_dim"]:
            raise f._err("head_dim", f"is absent and hidden_size // num_attention_heads = {hd} is out "
                                     f"of range [1, {L['head_dim']}]")
    d["head_dim"] = hd
    bos = f.raw("bos_token_id")
    d["bos_token_id"] = bos if is_int(bos) and 0 <= bos <= L["token_id"] else -1
    return d


def linear_fields(f: ConfigFields) -> dict:
    L = LIMITS
    return {"linear_n_k_heads": f.int("linear_num_key_heads", 1, L["linear_n_k_heads"]),
            "linear_n_v_heads": f.int("linear_num_value_heads", 1, L["linear_n_v_heads"]),
            "linear_k_dim": f.int("linear_key_head_dim", 1, L["linear_k_dim"]),
            "linear_v_dim": f.int("linear_value_head_dim", 1, L["linear_v_dim"]),
            "linear_conv_kernel": f.int("linear_conv_kernel_dim", 1, L["linear_conv_kernel"], 4)}


def rope_params(cfg, head_dim: int, default_partial: float):
    """(rope_theta, rotary_dim) from rope_parameters / rope_scaling or the top-level keys."""
    f = cfg if isinstance(cfg, ConfigFields) else ConfigFields(cfg)
    rk = "rope_parameters" if f.dict("rope_parameters") else "rope_scaling"
    rp = f.dict(rk)
    if rp.get("rope_theta") is not None:
        theta = f.num("rope_theta", 1.0, 1e12, src=rp, label=f"{rk}.rope_theta")
    else:
        theta = f.num("rope_theta", 1.0, 1e12, 10000.0)
    if rp.get("partial_rotary_factor") is not None:
        prf = f.num("partial_rotary_factor", 0.0, 1.0, src=rp, label=f"{rk}.partial_rotary_factor")
    else:
        prf = f.num("partial_rotary_factor", 0.0, 1.0, default_partial)
    rotary_dim = int(head_dim * prf)
    if rotary_dim % 2:
        raise f._err("partial_rotary_factor", f"{prf} gives an odd rotary dim {rotary_dim} "
                                              f"(head_dim {head_dim})")
    return float(theta), rotary_dim


def eos_ids(cfg, generation_config: dict | None):
    """EOS ids of config.json and generation_config.json (non-integer entries are ignored)."""
    f = cfg if isinstance(cfg, ConfigFields) else ConfigFields(cfg)
    gc = generation_config if isinstance(generation_config, dict) else {}
    ids = []
    for where, src in (("config.json", f.raw("eos_token_id")),
                       ("generation_config.json", gc.get("eos_token_id"))):
        if src is None:
            continue
        lst = src if isinstance(src, list) else [src]
        if len(lst) > LIMITS["eos_token_ids"]:
            raise FormatError(f"{where}: field 'eos_token_id' has {len(lst)} entries (at most "
                              f"{LIMITS['eos_token_ids']})")
        for t in lst:
            if is_int(t) and 0 <= t <= LIMITS["token_id"] and t not in ids:
                ids.append(t)
    return tuple(ids)


def hybrid_layer_kinds(cfg, n: int | None = None) -> list[str]:
    f = cfg if isinstance(cfg, ConfigFields) else ConfigFields(cfg)
    if n is None:
        n = f.int("num_hidden_layers", 1, LIMITS["n_layers"])
    lt = f.list("layer_types", LIMITS["n_layers"])
    if lt:
        if len(lt) != n:
            raise f._err("layer_types", f"has {len(lt)} entries, num_hidden_layers={n}")
        kinds = {"full_attention": "full", "linear_attention": "linear"}
        for i, t in enumerate(lt):
            if not isinstance(t, str) or t not in kinds:
                raise f._err("layer_types", f"entry {i} is {_desc(t)}; expected one of {list(kinds)}")
        return [kinds[t] for t in lt]
    every = f.int("full_attention_interval", 1, 1 << 20, 4)
    return ["linear" if (i + 1) % every else "full" for i in range(n)]


def moe_layer_kinds(cfg, n_experts: int, n: int | None = None) -> list[str]:
    f = cfg if isinstance(cfg, ConfigFields) else ConfigFields(cfg)
    if n is None:
        n = f.int("num_hidden_layers", 1, LIMITS["n_layers"])
    sparse = f.int("decoder_sparse_step", 0, 1 << 20, 1) or 1
    only = f.list("mlp_only_layers", LIMITS["n_layers"]) or []
    for i, x in enumerate(only):
        if not is_int(x) or not 0 <= x < n:
            raise f._err("mlp_only_layers", f"entry {i} is {_desc(x)}; expected a layer index in [0, {n})")
    only = set(only)
    return ["moe" if (i not in only and n_experts > 0 and (i + 1) % sparse == 0) else "dense"
            for i in range(n)]


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
    out = [TensorMap(f"blk.{i}.attn_q", f"{p}.q_proj.weight", (qrows, H)),
           TensorMap(f"blk.{i}.attn_k", f"{p}.k_proj.weight", (spec.n_kv_heads * hd, H)),
           TensorMap(f"blk.{i}.attn_v", f"{p}.v_proj.weight", (spec.n_kv_heads * hd, H)),
           TensorMap(f"blk.{i}.attn_o", f"{p}.o_proj.weight", (H, spec.n_heads * hd)),
           TensorMap(f"blk.{i}.attn_q_norm", f"{p}.q_norm.weight", (hd,), "vector", zc_norm=zc),
           TensorMap(f"blk.{i}.attn_k_norm", f"{p}.k_norm.weight", (hd,), "vector", zc_norm=zc)]
    if spec.layers[i].attn_sinks:
        out.append(TensorMap(f"blk.{i}.attn_sinks", f"{p}.sinks", (spec.n_heads,), "vector"))
    return out


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
    if spec.router_bias:
        out.append(TensorMap(f"blk.{i}.ffn_router_bias", f"{p}.gate.e_score_correction_bias",
                             (spec.n_experts,), "vector"))
    Ish = spec.shared_expert_intermediate_size
    if Ish:
        out += [TensorMap(f"blk.{i}.shexp_gate", f"{p}.shared_expert.gate_proj.weight", (Ish, H)),
                TensorMap(f"blk.{i}.shexp_up", f"{p}.shared_expert.up_proj.weight", (Ish, H)),
                TensorMap(f"blk.{i}.shexp_down", f"{p}.shared_expert.down_proj.weight", (H, Ish))]
        if spec.shared_gate == "sigmoid":
            out.append(TensorMap(f"blk.{i}.shexp_router", f"{p}.shared_expert_gate.weight", (1, H)))
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
