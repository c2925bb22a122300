"""`flashmoe convert`: HF (bf16/fp16/fp32), FP8 block-scaled, or MLX affine checkpoint -> model dir.

Owns: planning (every source tensor located and shape-checked before anything is written),
streaming conversion tensor by tensor / expert by expert (peak memory is one expert or one dense
tensor, never a shard), repacking MLX-quantized tensors without requantizing, quantizing float
experts through pyflashmoe.quant.quantize, and the manifest. The directory layout itself is
pyflashmoe.format's.

Formats are chosen per dense tensor and per expert part (docs/INTERNALS.md section 3): an MLX-
quantized source keeps every tensor as published (its own bits / group size, bf16 where mlx left
it unquantized); otherwise --bits / --dense-bits 8 at --group-size, falling back per tensor to a
smaller group size or bf16 where the group size does not divide the input dim (noted on stderr
and in the manifest's quantization.notes).

Source layouts of routed experts (prefix `model.layers.{i}.mlp`):
  per-expert  experts.{e}.{gate,up,down}_proj.weight       [I, H] / [H, I]
  fused 3-D   experts.gate_up_proj [E, 2I, H] (gate rows first), experts.down_proj [E, H, I]
  MLX stacks  switch_mlp.{gate,up,down}_proj.{weight,scales,biases}   [E, out, …]
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np

from pyflashmoe.errors import ArgumentError, BackendError, FlashMoEError, FormatError, ModelIOError
from pyflashmoe import format as fmt
from pyflashmoe.convert.reader import Checkpoint, to_f32
from pyflashmoe.convert.recipes import RECIPES, matches, parse_rule, recipe_rules
from pyflashmoe.models import (TensorMap, canonical_type, expert_prefix, normalize_config,
                               spec_from_config, tensor_map)

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "config.json", "special_tokens_map.json")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
DENSE_CHUNK = 32 << 20   # bytes of float32 per row chunk when streaming a big dense matrix
GROUP_SIZES = (32, 64, 128)
# Dense matrices quantized by --dense-bits 8: every 2-D Linear weight except the token embedding
# (a row gather, kept bf16) and the two routers (expert choice is sensitive; they are tiny).
DENSE_Q_EXCLUDE = ("ffn_router", "shexp_router")


def fallback_group_size(inn, group_size):
    """The group size a tensor with `inn` inputs is quantized at under --group-size `group_size`:
    that one when it divides inn, else the largest smaller one of GROUP_SIZES that does (down to
    32), else 0 (the tensor stays bf16)."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if inn % g == 0:
            return g
    return 0


def format_label(dtype, bits=0, group_size=0):
    """"bf16" or "4-bit g64": how summaries and the manifest name a tensor's storage."""
    return f"{bits}-bit g{group_size}" if dtype == "affine" else dtype


def _collapse(names, all_layers):
    """["blk.0.ffn_down experts", "blk.2.ffn_down experts"] -> "blk.*.ffn_down experts" (every
    layer that has the tensor) or "blk.{0,2}.ffn_down experts"; names without a layer kept."""
    by = {}
    for n in names:
        m = re.match(r"blk\.(\d+)\.(.*)$", n)
        key, il = (m.group(2), int(m.group(1))) if m else (n, None)
        by.setdefault(key, []).append(il)
    out = []
    for key, ils in by.items():
        if ils == [None]:
            out.append(key)
        elif set(ils) == all_layers.get(key, set()):
            out.append(f"blk.*.{key}")
        else:
            ils = sorted(ils)
            shown = ",".join(str(i) for i in ils[:12]) + (",..." if len(ils) > 12 else "")
            out.append(f"blk.{{{shown}}}.{key}")
    return ", ".join(out)


def _quantize(w, bits, group_size):
    try:
        from pyflashmoe.quant import quantize
    except ImportError as e:
        raise BackendError(f"quantizing to {bits} bits needs pyflashmoe.quant ({e}); "
                           f"use --bits 16 or an MLX-quantized source") from None
    w = np.ascontiguousarray(w, dtype=np.float32)
    # big matrices (real experts: millions of weights) are quantized on all cores
    q, s, b = quantize(w, bits, group_size, n_threads=0 if w.size >= (1 << 20) else 1)
    return (np.ascontiguousarray(q, dtype="<u4"), np.ascontiguousarray(s, dtype="<u2"),
            np.ascontiguousarray(b, dtype="<u2"))


@dataclass
class Src:
    """Where one logical matrix comes from in the checkpoint."""
    name: str                     # normalized tensor name of the weight
    index0: int | None = None     # slice of a stacked tensor
    rows: tuple | slice | None = None
    qbits: int = 0                # >0: MLX affine source (name is the U32 weight; .scales/.biases)
    qgs: int = 0
    fp8_scale: str | None = None  # FP8: name of weight_scale_inv
    fp8_block: tuple = (128, 128)


@dataclass
class DenseOut:
    tm: TensorMap
    src: Src
    dtype: str                    # "bf16" | "f32" | "affine"
    bits: int = 0
    group_size: int = 0
    shift_norm: bool = False


@dataclass
class PartOut:
    name: str
    shape: tuple
    dtype: str                    # "bf16" | "affine"
    bits: int = 0
    group_size: int = 0
    srcs: list = field(default_factory=list)   # per expert: Src
    copy_q: bool = False


class Converter:
    def __init__(self, src, dst, bits=4, group_size=64, dense_bits=16, force=False, progress=True,
                 recipe=None, quant=()):
        if bits not in QUANT_BITS + (16,):
            raise ArgumentError(f"--bits {bits}: must be one of 2, 3, 4, 5, 6, 8, 16")
        if group_size not in GROUP_SIZES:
            raise ArgumentError(f"--group-size {group_size}: must be one of 32, 64, 128")
        if dense_bits not in (8, 16):
            raise ArgumentError(f"--dense-bits {dense_bits}: must be 8 or 16")
        self.src_path, self.dst = os.fspath(src), os.fspath(dst)
        self.bits, self.gs, self.dense_bits = bits, group_size, dense_bits
        self.force, self.progress = force, progress
        # --recipe's rules, then each --quant: per tensor the last matching rule wins (recipes.py)
        self.recipe = recipe
        if isinstance(quant, str):
            quant = [quant]
        self.overrides = list(quant or ())
        self.rules = (recipe_rules(recipe) if recipe else []) + [parse_rule(q) for q in self.overrides]
        self._rule_hits = [0] * len(self.rules)
        self.notes = []
        # (format label, why) -> [tensor names] of every tensor not stored at the requested format
        self.kept = {}
        self._all_layers = {}     # tensor name without "blk.N." -> {N}: what "blk.*" covers

    # ---- planning ----------------------------------------------------------------------------

    def plan(self):
        ck = self.ck = Checkpoint(self.src_path)
        cfg = self.cfg = normalize_config(ck.config)
        try:
            canonical_type(cfg.get("model_type"))
            self._check_layer_count(cfg)
            self.spec = spec_from_config(ck.config, ck.generation_config)
        except FlashMoEError as e:
            msg = str(e)
            if msg.startswith("config.json:"):
                msg = os.path.join(ck.path, "config.json") + msg[len("config.json"):]
            raise type(e)(msg) from None
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        if isinstance(q, dict) and q.get("mode") not in (None, "affine"):
            raise FormatError(f"{ck.path}/config.json: field quantization.mode {q.get('mode')!r} is not "
                              f"supported (only MLX affine)")
        qc = cfg.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))
        has_mlx = any(".switch_mlp." in n for n in ck.tensors) or "quantization" in cfg
        has_fp8 = any(ck.dtype(n).startswith("F8_") for n in ck.tensors)
        self.kind = "mlx" if has_mlx else ("fp8" if has_fp8 else "hf")
        # an MLX-quantized checkpoint (mlx_lm.convert -q) converts as published: every tensor keeps
        # its own bits / group size, and what mlx left unquantized stays bf16
        self.mlx_quant = isinstance(cfg.get("quantization"), dict)
        self.mlx_qcfg = self._mlx_module_quant(cfg.get("quantization")) if self.mlx_quant else {}
        # mlx-lm stores zero-centred norm weights as (w + 1) once it has moved conv1d to [C, K, 1]
        self.mlx_shifted = any(n.endswith("conv1d.weight") and len(ck.shape(n)) == 3
                               and ck.shape(n)[2] == 1 and ck.shape(n)[1] > 1 for n in ck.tensors)
        if self.rules and self.mlx_quant:
            raise ArgumentError(f"{ck.path}: an MLX-quantized checkpoint converts as published; "
                                f"--recipe / --quant need a float (HF or FP8) source")
        self.dense = self._plan_dense()
        self.experts = {il: self._plan_experts(il) for il in self.spec.moe_layers()}
        for r, n in zip(self.rules, self._rule_hits):
            if n == 0 and r.source == "--quant":
                raise ArgumentError(f"--quant {r.text!r}: matches no weight matrix of {ck.path} "
                                    f"(names: tok_embd, output, blk.N.attn_q, blk.N.ssm_qkv, "
                                    f"blk.N.shexp_gate, blk.N.ffn_router, blk.N.experts.down, ...; "
                                    f"norms and ssm_conv stay f32)")
        self._summarize()

    def _mlx_module_quant(self, q):
        """config.json "quantization" -> {normalized module path: (bits, group_size)}: the global
        pair under "" and one entry per module mlx_lm recorded (quant_predicate, mixed recipes)."""
        from pyflashmoe.convert.reader import normalize_name
        where = os.path.join(self.ck.path, "config.json")
        out = {}

        def pair(k, e):
            field = f"quantization[{k!r}]" if k else "quantization"
            mode = e.get("mode")
            if mode not in (None, "affine"):
                raise FormatError(f"{where}: field {field}.mode {mode!r} is not supported "
                                  f"(only MLX affine)"[:300])
            b, g = e.get("bits"), e.get("group_size")
            if b is None and g is None:
                return None
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (b, g)):
                raise FormatError(f"{where}: field {field} must have integer bits and "
                                  f"group_size, got bits={b!r} group_size={g!r}"[:300])
            return (b, g)

        out[""] = pair("", q)
        for k, e in q.items():
            if isinstance(e, dict):
                n = normalize_name(k + ".weight")
                if n is not None:
                    out[n[:-len(".weight")]] = pair(k, e)
        return out

    def _check_mlx_pair(self, base, s):
        """A quantized MLX tensor's bits / group size (from its shapes) against config.json: its
        own quantization entry, else the global one (what mlx_lm.load would build it with)."""
        want = self.mlx_qcfg.get(base, self.mlx_qcfg.get(""))
        if want is not None and want != (s.qbits, s.qgs):
            key = "quantization" + (f"[{base!r}]" if base in self.mlx_qcfg else "")
            raise FormatError(f"{self.ck.where(base + '.weight')}: shapes give {s.qbits}-bit group "
                              f"{s.qgs} but config.json {key} says bits {want[0]} group_size "
                              f"{want[1]} (inconsistent MLX checkpoint)")

    def _why(self, inn, g):
        tried = [x for x in sorted(GROUP_SIZES, reverse=True) if x <= self.gs and (not g or x > g)]
        return f"input dim {inn} not a multiple of {' or '.join(map(str, tried))}"

    def _keep(self, name, label, why):
        self.kept.setdefault((label, why), []).append(name)

    def _summarize(self):
        """One note per distinct (format, reason) of the tensors not stored at the requested format."""
        for (label, why), names in self.kept.items():
            if why == "as published":
                self.notes.append(f"kept at {label} as published in the MLX source: "
                                  f"{_collapse(names, self._all_layers)}")
            else:
                self.notes.append(f"kept at {label}: {_collapse(names, self._all_layers)} ({why})")

    def _check_layer_count(self, cfg):
        """num_hidden_layers against the checkpoint before anything is sized from it: no more layers
        than it holds tensors for (the type and the bounds are spec_from_config's checks)."""
        n = cfg.get("num_hidden_layers")
        if isinstance(n, bool) or not isinstance(n, int):
            return
        have = set()
        for name in self.ck.tensors:
            if name.startswith("model.layers."):
                i = name[len("model.layers."):].split(".", 1)[0]
                if i.isdigit():
                    have.add(int(i))
        if n > len(have):
            raise FormatError(f"config.json: field num_hidden_layers is {n} but the checkpoint has "
                              f"tensors for {len(have)} layers (model.layers.N)")

    def _src_for(self, name, needed_for, out_shape, rows=None, index0=None):
        """Locate `name` (a `.weight` or plain tensor) and work out its storage: float, MLX affine, FP8."""
        ck = self.ck
        ck.require(name, needed_for)
        s = Src(name, index0=index0, rows=rows)
        base = name[:-len(".weight")] if name.endswith(".weight") else None
        dt = ck.dtype(name)
        shp = ck.shape(name)
        lead = tuple(shp[:1]) if index0 is not None else ()
        if base and ck.has(base + ".scales"):
            ck.require(base + ".biases", needed_for)
            if dt != "U32":
                raise FormatError(f"{ck.where(name)}: quantized weight must be U32, got {dt}")
            out, inn = out_shape
            src_rows = (self._src_rows(name, rows, out) if rows is not None else out)
            wq = shp[-1] * 32
            if wq % inn or (wq // inn) not in (2, 3, 4, 5, 6, 8):
                raise FormatError(f"{ck.where(name)}: field shape {list(shp)}: {shp[-1]} words per row "
                                  f"do not pack {inn} inputs at 2..8 bits")
            s.qbits = wq // inn
            sshape = ck.shape(base + ".scales")
            if sshape[-1] == 0 or inn % sshape[-1]:
                raise FormatError(f"{ck.where(base + '.scales')}: field shape {list(sshape)} does not divide "
                                  f"{inn} inputs into groups")
            s.qgs = inn // sshape[-1]
            if s.qgs not in GROUP_SIZES or (inn * s.qbits) % 32:
                raise FormatError(f"{ck.where(base + '.scales')}: field shape {list(sshape)}: group size "
                                  f"{s.qgs} ({s.qbits}-bit) is not one of 32, 64, 128")
            if self.mlx_quant:
                self._check_mlx_pair(base, s)
            for k, last in (("", shp[-1]), (".scales", sshape[-1]), (".biases", sshape[-1])):
                nm = name if not k else base + k
                ck.check_shape(nm, lead + (src_rows, last), f"needed for {needed_for}")
            return s
        if dt.startswith("F8_"):
            sc = (base or name) + ".weight_scale_inv"
            if not ck.has(sc):
                raise FormatError(f"{ck.where(name)}: FP8 weight without {sc!r} (needed for {needed_for})")
            s.fp8_scale, s.fp8_block = sc, self.fp8_block
        elif dt not in ("BF16", "F16", "F32", "F64"):
            raise FormatError(f"{ck.where(name)}: field dtype {dt} is not a float dtype "
                              f"(needed for {needed_for})")
        if len(out_shape) == 2 and rows is None:
            ck.check_shape(name, lead + tuple(out_shape), f"needed for {needed_for}")
        elif rows is not None:
            ck.check_shape(name, lead + (self._src_rows(name, rows, out_shape[0]), out_shape[1]),
                           f"needed for {needed_for}")
        if s.fp8_scale:
            o, i = out_shape if rows is None else (self._src_rows(name, rows, out_shape[0]), out_shape[1])
            bo, bi = s.fp8_block
            ck.check_shape(s.fp8_scale, lead + (-(-o // bo), -(-i // bi)), f"FP8 block {bo}x{bi}")
        return s

    def _src_rows(self, name, rows, out):
        if isinstance(rows, slice):
            return self.ck.shape(name)[-2]
        return self._fused_rows.get(name, out)

    def _plan_dense(self):
        spec, ck = self.spec, self.ck
        tms = tensor_map(spec)
        self._fused_rows = {}
        for tm in tms:
            if tm.rows is not None:
                self._fused_rows[tm.src] = self._fused_rows.get(tm.src, 0) + len(tm.rows)
        out = []
        for tm in tms:
            need = f"{tm.name} {list(tm.shape)}"
            if tm.kind in ("vector", "conv"):
                ck.require(tm.src, need)
                shp = tuple(ck.shape(tm.src))
                if tm.kind == "vector":
                    ok = shp == tuple(tm.shape)
                else:
                    C, K = tm.shape
                    ok = shp in ((C, 1, K), (C, K, 1), (C, K))
                if not ok:
                    raise FormatError(f"{ck.where(tm.src)}: field shape {list(shp)}, expected "
                                      f"{list(tm.shape)} for {tm.name}")
                if ck.dtype(tm.src) not in ("BF16", "F16", "F32", "F64"):
                    raise FormatError(f"{ck.where(tm.src)}: field dtype {ck.dtype(tm.src)} is not a float "
                                      f"dtype (needed for {tm.name})")
                out.append(DenseOut(tm, Src(tm.src), "f32",
                                    shift_norm=tm.zc_norm and self.mlx_shifted))
                continue
            s = self._src_for(tm.src, need, tm.shape, rows=tm.rows)
            out.append(self._dense_format(tm, s))
        return out

    def _dense_format(self, tm, s):
        """How one 2-D dense tensor is stored: an MLX source's own format (quantized or not);
        --dense-bits 8 on the Linear weights at --group-size or, where that does not divide the
        input dim, the fallback group size or bf16; else bf16."""
        m = re.match(r"blk\.(\d+)\.(.*)$", tm.name)
        if m:
            self._all_layers.setdefault(m.group(2), set()).add(int(m.group(1)))
        rule = None if self.mlx_quant else self._rule_for(tm.name)
        if rule is not None:
            dt, b, g = self._rule_format(rule, tm.name, tm.shape)
            return DenseOut(tm, s, dt, b, g)
        if s.qbits:
            d = DenseOut(tm, s, "affine", s.qbits, s.qgs)
        elif self.mlx_quant:
            d = DenseOut(tm, s, "bf16")
        elif (self.dense_bits == 8 and tm.kind == "matrix"
              and not any(tm.name.endswith(x) for x in DENSE_Q_EXCLUDE)):
            g = fallback_group_size(tm.shape[1], self.gs)
            d = DenseOut(tm, s, "affine", 8, g) if g else DenseOut(tm, s, "bf16")
            if g != self.gs:
                self._keep(tm.name, format_label(d.dtype, d.bits, d.group_size),
                           self._why(tm.shape[1], g))
            return d
        else:
            return DenseOut(tm, s, "bf16")
        if self.mlx_quant and (d.dtype, d.bits, d.group_size) != self._mlx_main():
            self._keep(tm.name, format_label(d.dtype, d.bits, d.group_size), "as published")
        return d

    def _rule_for(self, name):
        """The last rule matching the weight `name` (counted, for the unmatched-rule check)."""
        hit = None
        for i, r in enumerate(self.rules):
            if matches(r, name):
                self._rule_hits[i] += 1
                hit = r
        return hit

    def _rule_format(self, rule, name, shape):
        """(dtype, bits, group size) of a tensor under `rule`: its group size where that divides
        the input dim; else, without an explicit :g, the fallback (noted) as --bits does; an
        explicit :g that does not divide is refused."""
        dt, b, want = rule.fmt(self.gs)
        if dt == "bf16":
            return dt, 0, 0
        inn = shape[1]
        if inn % want == 0:
            return dt, b, want
        if rule.group_size:
            raise ArgumentError(f"{rule.source} {rule.text!r}: {name} has input dim {inn}, not a "
                                f"multiple of group size {want}; give a group size that divides it "
                                f"(32, 64, 128) or none to fall back")
        g = fallback_group_size(inn, want)
        tried = [x for x in sorted(GROUP_SIZES, reverse=True) if x <= want and (not g or x > g)]
        why = f"input dim {inn} not a multiple of {' or '.join(map(str, tried))}"
        if g:
            self._keep(name, format_label("affine", b, g), why)
            return dt, b, g
        self._keep(name, "bf16", why)
        return "bf16", 0, 0

    def _quant_summary(self, fmts):
        """{(dtype, bits, gs): n weights} -> {"bits", "group_size"} of the largest, plus "formats"
        when there are several."""
        d = lambda k: {"bits": 16} if k[0] == "bf16" else {"bits": k[1], "group_size": k[2]}  # noqa: E731
        order = sorted(fmts, key=lambda k: (-fmts[k], d(k)["bits"], k[2]))
        out = d(order[0])
        if len(order) > 1:
            out["formats"] = sorted((d(k) for k in order), key=lambda x: (x["bits"], x.get("group_size", 0)))
        return out

    def _mlx_main(self):
        g = self.mlx_qcfg.get("")
        return ("affine",) + g if g else (None, 0, 0)

    def _plan_experts(self, il):
        spec, ck = self.spec, self.ck
        P, E, I, H = expert_prefix(il), spec.n_experts, spec.moe_intermediate_size, spec.hidden_size
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        parts = {}
        if ck.has(f"{P}.switch_mlp.gate_proj.weight"):
            layout = "mlx"
        elif ck.has(f"{P}.experts.gate_up_proj") or ck.has(f"{P}.experts.gate_up_proj.weight"):
            layout = "fused"
        elif ck.has(f"{P}.experts.0.gate_proj.weight"):
            layout = "per-expert"
        else:
            raise FormatError(f"{ck.path}: layer {il}: no routed-expert tensors (looked for "
                              f"{P}.experts.0.gate_proj.weight, {P}.experts.gate_up_proj, "
                              f"{P}.switch_mlp.gate_proj.weight)")
        for pn in ("gate", "up", "down"):
            need = f"layer {il} expert {pn} {list(shapes[pn])}"
            srcs = []
            if layout == "mlx":
                nm = f"{P}.switch_mlp.{pn}_proj.weight"
                ck.require(nm, need)
                if ck.shape(nm)[0] != E:
                    raise FormatError(f"{ck.where(nm)}: field shape {list(ck.shape(nm))}: first dim must be "
                                      f"n_experts={E}")
                s0 = self._src_for(nm, need, shapes[pn], index0=0)
                srcs = [Src(nm, index0=e, qbits=s0.qbits, qgs=s0.qgs, fp8_scale=s0.fp8_scale,
                            fp8_block=s0.fp8_block) for e in range(E)]
            elif layout == "fused":
                if pn == "down":
                    nm = f"{P}.experts.down_proj"
                    nm = nm if ck.has(nm) else nm + ".weight"
                    rows = None
                else:
                    nm = f"{P}.experts.gate_up_proj"
                    nm = nm if ck.has(nm) else nm + ".weight"
                    rows = slice(0, I) if pn == "gate" else slice(I, 2 * I)
                ck.require(nm, need)
                full = (2 * I, H) if pn != "down" else (H, I)
                ck.check_shape(nm, (E,) + full, f"fused experts, needed for {need}")
                if ck.dtype(nm) not in ("BF16", "F16", "F32", "F64"):
                    raise FormatError(f"{ck.where(nm)}: field dtype {ck.dtype(nm)} is not supported for "
                                      f"fused experts")
                srcs = [Src(nm, index0=e, rows=rows) for e in range(E)]
            else:
                for e in range(E):
                    srcs.append(self._src_for(f"{P}.experts.{e}.{pn}_proj.weight", need, shapes[pn]))
            parts[pn] = self._part_format(il, pn, shapes[pn], srcs)
        qs = {(p.dtype, p.bits, p.group_size) for p in parts.values()}
        if self.mlx_quant and (self.bits, self.gs) not in {(p.bits, p.group_size) for p in parts.values()}:
            note = ("source is MLX-quantized: every tensor keeps its published format "
                    "(--bits/--group-size/--dense-bits ignored)")
            if note not in self.notes:
                self.notes.append(note)
        return parts, layout, qs

    def _part_format(self, il, pn, shape, srcs):
        """How one expert part (gate / up / down) of layer il is stored: an MLX source's own format
        (quantized: repacked byte for byte; unquantized: bf16); else --bits at --group-size or,
        where that does not divide the input dim, the fallback group size or bf16."""
        s0 = srcs[0]
        for e, s in enumerate(srcs):
            if (s.qbits, s.qgs) != (s0.qbits, s0.qgs):
                raise FormatError(f"{self.ck.where(s.name)}: layer {il} expert {e} {pn} is stored "
                                  f"{format_label('affine' if s.qbits else 'float', s.qbits, s.qgs)} but "
                                  f"expert 0 {format_label('affine' if s0.qbits else 'float', s0.qbits, s0.qgs)}; "
                                  f"the experts of one layer must share each part's format")
        name = f"blk.{il}.ffn_{pn} experts"
        self._all_layers.setdefault(f"ffn_{pn} experts", set()).add(il)
        rule = None if (self.mlx_quant or s0.qbits) else self._rule_for(f"blk.{il}.experts.{pn}")
        if rule is not None:
            dt, b, g = self._rule_format(rule, name, shape)
            return PartOut(pn, shape, dt, b, g, srcs)
        if s0.qbits:
            po = PartOut(pn, shape, "affine", s0.qbits, s0.qgs, srcs, copy_q=True)
        elif self.mlx_quant or self.bits == 16:
            po = PartOut(pn, shape, "bf16", srcs=srcs)
        else:
            g = fallback_group_size(shape[1], self.gs)
            po = (PartOut(pn, shape, "affine", self.bits, g, srcs) if g
                  else PartOut(pn, shape, "bf16", srcs=srcs))
            if g != self.gs:
                self._keep(name, format_label(po.dtype, po.bits, po.group_size), self._why(shape[1], g))
            return po
        if self.mlx_quant and (po.dtype, po.bits, po.group_size) != self._mlx_main():
            self._keep(name, format_label(po.dtype, po.bits, po.group_size), "as published")
        return po

    def _experts_quant(self):
        """quantization.experts of the manifest: the format holding most expert weights, and
        when the parts are not all stored alike, every format present ("formats", as
        {"bits": 16} or {"bits", "group_size"}; each part's own format is in its parts entry)."""
        weight = {}
        for parts, _, _ in self.experts.values():
            for p in parts.values():
                k = (16, 0) if p.dtype == "bf16" else (p.bits, p.group_size)
                weight[k] = weight.get(k, 0) + p.shape[0] * p.shape[1]
        if not weight:
            return None
        order = sorted(weight, key=lambda k: (-weight[k], k))
        d = lambda k: {"bits": 16} if k[0] == 16 else {"bits": k[0], "group_size": k[1]}  # noqa: E731
        eq = d(order[0])
        if len(order) > 1:
            eq["formats"] = [d(k) for k in sorted(order)]
        return eq

    # ---- reading values ----------------------------------------------------------------------

    def _float(self, s: Src, shape):
        """float32 matrix for a non-quantized source (fp8 dequantized), rows selected."""
        ck = self.ck
        w = ck.read_f32(s.name, s.index0)
        if s.fp8_scale:
            sc = ck.read_f32(s.fp8_scale, s.index0)
            bo, bi = s.fp8_block
            o, i = w.shape
            w = w * np.repeat(np.repeat(sc, bo, axis=0)[:o], bi, axis=1)[:, :i]
        if s.rows is not None:
            w = w[s.rows] if isinstance(s.rows, slice) else w[np.asarray(s.rows)]
        return np.ascontiguousarray(w.reshape(shape), dtype=np.float32)

    def _bf16(self, s: Src, shape):
        ck = self.ck
        if ck.dtype(s.name) == "BF16" and not s.fp8_scale:
            raw = ck.read_raw(s.name) if s.index0 is None else ck.read_index0(s.name, s.index0)
            if s.rows is not None:
                raw = raw[s.rows] if isinstance(s.rows, slice) else raw[np.asarray(s.rows)]
            return np.ascontiguousarray(raw.reshape(shape))
        return fmt.f32_to_bf16(self._float(s, shape))

    def _affine_copy(self, s: Src):
        ck = self.ck
        base = s.name[:-len(".weight")]
        out = []
        for nm in (s.name, base + ".scales", base + ".biases"):
            raw = ck.read_raw(nm) if s.index0 is None else ck.read_index0(nm, s.index0)
            if s.rows is not None:
                raw = raw[s.rows] if isinstance(s.rows, slice) else raw[np.asarray(s.rows)]
            if nm != s.name and ck.dtype(nm) != "BF16":
                raw = fmt.f32_to_bf16(to_f32(raw, ck.dtype(nm), ck.where(nm)))
            out.append(np.ascontiguousarray(raw))
        return out

    def _affine(self, s: Src, shape, bits, gs):
        if s.qbits:
            return self._affine_copy(s)
        return _quantize(self._float(s, shape), bits, gs)

    # ---- writing -----------------------------------------------------------------------------

    def _dense_entries(self):
        ents = []
        for d in self.dense:
            n, shp = d.tm.name, d.tm.shape
            if d.dtype == "affine":
                sz = fmt.affine_sizes(shp, d.bits, d.group_size)
                ents += [(n + ".q", "U32", (shp[0], shp[1] * d.bits // 32), sz["q"]),
                         (n + ".scales", "BF16", (shp[0], shp[1] // d.group_size), sz["scales"]),
                         (n + ".biases", "BF16", (shp[0], shp[1] // d.group_size), sz["biases"])]
            else:
                nb = int(np.prod(shp)) * (2 if d.dtype == "bf16" else 4)
                ents.append((n, "BF16" if d.dtype == "bf16" else "F32", shp, nb))
        return ents

    def _row_chunks(self, s: Src, rows_total, row_bytes):
        """[r0, r1) ranges of about DENSE_CHUNK bytes (a multiple of the FP8 block rows)."""
        step = max(1, DENSE_CHUNK // max(1, row_bytes))
        if s.fp8_scale:
            bo = s.fp8_block[0]
            step = max(bo, step // bo * bo)
        return [(r0, min(rows_total, r0 + step)) for r0 in range(0, rows_total, step)]

    def _float_rows(self, s: Src, r0, r1):
        ck = self.ck
        w = to_f32(ck.read_rows(s.name, r0, r1, s.index0), ck.dtype(s.name), ck.where(s.name))
        if s.fp8_scale:
            bo, bi = s.fp8_block
            sc = ck.read_f32(s.fp8_scale, s.index0)[r0 // bo: -(-r1 // bo)]
            w = w * np.repeat(np.repeat(sc, bo, axis=0)[:r1 - r0], bi, axis=1)[:, :w.shape[1]]
        return np.ascontiguousarray(w, dtype=np.float32)

    def _dense_matrix_stream(self, w, d):
        """Write a 2-D dense tensor in row chunks (bounded memory for vocab-sized matrices)."""
        n, shp, s, ck = d.tm.name, d.tm.shape, d.src, self.ck
        if s.rows is not None:        # small fused projections: whole tensor, rows gathered
            if d.dtype == "bf16":
                w.write(n, self._bf16(s, shp))
                return
            q, sc, b = self._affine(s, shp, d.bits, d.group_size)
            for k, arr in (("q", q), ("scales", sc), ("biases", b)):
                w.write(f"{n}.{k}", arr)
            return
        R = shp[0]
        if d.dtype == "bf16":
            raw_bf16 = ck.dtype(s.name) == "BF16" and not s.fp8_scale

            def gen():
                for r0, r1 in self._row_chunks(s, R, shp[1] * 4):
                    if raw_bf16:
                        yield ck.read_rows(s.name, r0, r1)
                    else:
                        yield fmt.f32_to_bf16(self._float_rows(s, r0, r1))
            w.write_chunks(n, gen())
            return
        if s.qbits:                   # MLX affine: copy q, scales, biases in row chunks
            base = s.name[:-len(".weight")]
            for k, nm in (("q", s.name), ("scales", base + ".scales"), ("biases", base + ".biases")):
                def gen(nm=nm):
                    rb = int(np.prod(ck.shape(nm)[1:])) * 4
                    for r0, r1 in self._row_chunks(Src(nm), R, rb):
                        raw = ck.read_rows(nm, r0, r1)
                        if nm != s.name and ck.dtype(nm) != "BF16":
                            raw = fmt.f32_to_bf16(to_f32(raw, ck.dtype(nm), ck.where(nm)))
                        yield raw
                w.write_chunks(f"{n}.{k}", gen())
            return
        scales, biases = [], []       # quantize row chunks; q streamed, scales/biases kept (small)

        def genq():
            for r0, r1 in self._row_chunks(s, R, shp[1] * 4):
                q, sc, b = _quantize(self._float_rows(s, r0, r1), d.bits, d.group_size)
                scales.append(sc)
                biases.append(b)
                yield q
        w.write_chunks(f"{n}.q", genq())
        w.write(f"{n}.scales", np.concatenate(scales))
        w.write(f"{n}.biases", np.concatenate(biases))

    def _write_dense(self, tmp, bar):
        w = fmt.SafetensorsWriter(os.path.join(tmp, fmt.DENSE_FILE), self._dense_entries(),
                                  metadata={"format": fmt.FORMAT_NAME})
        table = {}
        try:
            for d in self.dense:
                n, shp = d.tm.name, d.tm.shape
                if d.dtype == "f32":
                    v = self.ck.read_f32(d.src.name).reshape(shp).astype(np.float32)
                    if d.shift_norm:
                        v = v - np.float32(1.0)
                    w.write(n, v)
                    table[n] = {"dtype": "f32", "shape": list(shp), "offset": w.offsets[n], "nbytes": w.sizes[n]}
                    bar.update(1)
                    continue
                self._dense_matrix_stream(w, d)
                if d.dtype == "bf16":
                    table[n] = {"dtype": "bf16", "shape": list(shp), "offset": w.offsets[n], "nbytes": w.sizes[n]}
                else:
                    e = {"dtype": "affine", "shape": list(shp), "bits": d.bits, "group_size": d.group_size}
                    for k in ("q", "scales", "biases"):
                        e[k] = [w.offsets[f"{n}.{k}"], w.sizes[f"{n}.{k}"]]
                    table[n] = e
                bar.update(1)
        except BaseException:
            w.abort()
            raise
        return table, w.close()

    def _write_experts(self, tmp, il, parts, bar):
        desc = []
        for pn in ("gate", "up", "down"):
            p = parts[pn]
            d = {"dtype": p.dtype, "shape": list(p.shape)}
            if p.dtype == "affine":
                d.update(bits=p.bits, group_size=p.group_size)
            desc.append((pn, d))
        layout, bb = fmt.expert_block_layout(desc)
        E = self.spec.n_experts
        rel = f"experts/L{il:03d}.safetensors"
        f = fmt.HashingFile(os.path.join(tmp, rel))
        hdr = fmt.expert_file_header(E, bb)
        f.write(hdr)
        crcs = []
        try:
            fused_cache = {}
            for e in range(E):
                blk = np.zeros(bb, dtype=np.uint8)
                for pn in ("gate", "up", "down"):
                    p, L = parts[pn], layout[pn]
                    s = p.srcs[e]
                    if p.dtype == "bf16":
                        arr = self._bf16_cached(s, p.shape, fused_cache)
                        o, n = L["data"]
                        blk[o:o + n] = arr.view(np.uint8).reshape(-1)
                    else:
                        if p.copy_q:
                            arrs = self._affine_copy(s)
                        else:
                            arrs = _quantize(self._float_cached(s, p.shape, fused_cache), p.bits, p.group_size)
                        for k, arr in zip(("q", "scales", "biases"), arrs):
                            o, n = L[k]
                            b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
                            if b.nbytes != n:
                                raise FormatError(f"{self.ck.where(s.name)}: expert {e} {pn}.{k} has {b.nbytes} "
                                                  f"bytes, expected {n}")
                            blk[o:o + n] = b
                fused_cache.clear()
                crcs.append(zlib.crc32(blk))      # of the bytes as written (manifest block_crc32)
                f.write(blk)
                bar.update(1)
        except BaseException:
            f.abort()
            raise
        info = f.close()
        entry = {"file": rel, "n_experts": E, "block_bytes": bb, "data_offset": len(hdr), "parts": layout,
                 "block_crc32": crcs}
        return rel, entry, info

    # gate and up of a fused gate_up_proj come from one read
    def _fused_full(self, s, cache, as_bf16):
        key = (s.name, s.index0, as_bf16)
        if key not in cache:
            ck = self.ck
            if as_bf16 and ck.dtype(s.name) == "BF16":
                cache[key] = ck.read_index0(s.name, s.index0)
            else:
                v = ck.read_f32(s.name, s.index0)
                cache[key] = fmt.f32_to_bf16(v) if as_bf16 else v
        return cache[key]

    def _bf16_cached(self, s, shape, cache):
        if isinstance(s.rows, slice):
            return np.ascontiguousarray(self._fused_full(s, cache, True)[s.rows])
        return self._bf16(s, shape)

    def _float_cached(self, s, shape, cache):
        if isinstance(s.rows, slice):
            return np.ascontiguousarray(self._fused_full(s, cache, False)[s.rows], dtype=np.float32)
        return self._float(s, shape)

    def run(self):
        from pyflashmoe import __version__
        fmt.AtomicDir(self.dst, self.force).check()
        self.plan()
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if self.progress:
            for n in self.notes:
                print(f"flashmoe convert: note: {n}", file=sys.stderr)
        n_items = len(self.dense) + len(self.experts) * self.spec.n_experts
        bar = (tqdm(total=n_items, unit="tensor", desc="convert", disable=not self.progress,
                    file=sys.stderr) if tqdm else _NoBar())
        try:
            with fmt.AtomicDir(self.dst, self.force) as tmp:
                try:
                    os.makedirs(os.path.join(tmp, "experts"))
                    files = {}
                    table, finfo = self._write_dense(tmp, bar)
                    files[fmt.DENSE_FILE] = finfo
                    layers = {}
                    for il, (parts, layout, _) in self.experts.items():
                        rel, entry, info = self._write_experts(tmp, il, parts, bar)
                        layers[str(il)] = entry
                        files[rel] = info
                    eq = self._experts_quant()
                    for fn in COPY_FILES:
                        p = os.path.join(self.ck.path, fn)
                        if os.path.isfile(p):
                            shutil.copyfile(p, os.path.join(tmp, fn))
                    if self.rules:
                        fm = {}
                        for d in self.dense:
                            if d.tm.kind in ("matrix", "embedding"):
                                k = (d.dtype, d.bits, d.group_size)
                                fm[k] = fm.get(k, 0) + int(np.prod(d.tm.shape))
                        dq = self._quant_summary(fm) if fm else {"bits": self.dense_bits}
                    else:
                        dq = {"bits": self.dense_bits}
                        if self.dense_bits == 8:
                            dq["group_size"] = self.gs
                    mlx_dense = sorted({(d.bits, d.group_size) for d in self.dense
                                        if d.dtype == "affine" and d.src.qbits})
                    if mlx_dense:
                        dq["source_affine"] = [{"bits": b, "group_size": g} for b, g in mlx_dense]
                    quant = {"experts": eq or {"bits": self.bits}, "dense": dq}
                    if self.recipe:
                        from pyflashmoe.convert.recipes import RECIPES
                        quant["recipe"] = {"name": self.recipe,
                                           "description": RECIPES[self.recipe].description,
                                           "rules": list(RECIPES[self.recipe].rules)}
                    if self.overrides:
                        quant["overrides"] = list(self.overrides)
                    if self.kept:
                        quant["notes"] = [n for n in self.notes if n.startswith("kept at ")]
                    manifest = {
                        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
                        "created_by": f"pyflashmoe {__version__}",
                        "spec": self.spec.to_dict(),
                        "source": {"path": self.ck.path, "kind": self.kind,
                                   "model_type": self.cfg.get("model_type")},
                        "quantization": quant,
                        "tensors": table,
                        "experts": {"layers": layers},
                        "files": files,
                    }
                    fmt.write_manifest(tmp, manifest)
                except OSError as e:
                    raise ModelIOError(f"{getattr(e, 'filename', None) or self.dst}: write failed: "
                                       f"{e.strerror or e}") from None
        finally:
            bar.close()
            self.ck.close()
        return self.dst


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def convert(src, dst, bits=4, group_size=64, dense_bits=16, force=False, progress=True,
            recipe=None, quant=()):
    """Convert the checkpoint at `src` into a pyflashmoe model dir at `dst` (atomic). Returns dst.
    `recipe`: a name of pyflashmoe.convert.recipes.RECIPES; `quant`: override rules
    ("PATTERN=BITS[:gGROUP]", applied after the recipe's, the last match wins)."""
    return Converter(src, dst, bits, group_size, dense_bits, force, progress, recipe, quant).run()


__all__ = ["convert", "Converter", "RECIPES"]
