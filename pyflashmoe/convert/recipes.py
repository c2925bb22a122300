"""Mixed-precision recipes and per-tensor overrides for `flashmoe convert` (issue 11 item 5).

A rule is `PATTERN=FORMAT`:

* PATTERN is a glob (`*`, `?`, `[...]`, and `{a,b}` alternatives) over the converter's names of the
  weight matrices: the dense ones by their canonical names (docs/INTERNALS.md section 2:
  `tok_embd`, `output`, `blk.3.attn_q`, `blk.0.ssm_qkv`, `blk.0.shexp_down`, `blk.0.ffn_router`,
  ...) and the routed experts' parts as `blk.N.experts.gate`, `.up`, `.down`. A pattern without a
  `blk.` prefix also matches the name with its `blk.N.` stripped, so `experts.down` means every
  layer's and `blk.{0,7}.experts.down` the first and last layer's. Aliases: `embed` = `tok_embd`,
  `lm_head` = `output`, `router` = `{ffn_router,shexp_router}`, `attn` = `attn_{q,k,v,o}`,
  `ssm` = `ssm_{qkv,z,a,b,out}`, `shexp` = `shexp_{gate,up,down}`, `experts` = `experts.*`.
  Norms, `ssm_conv` and other 1-D tensors are always F32 and match no pattern.
* FORMAT is `BITS[:gGS]`: BITS one of 2, 3, 4, 5, 6, 8 (group-affine, the engine's formats on CPU
  and CUDA) or 16 / `bf16`; GS one of 32, 64, 128 (default: --group-size). Where the group size
  does not divide a tensor's input dim: a rule without `:g` falls back as --bits does (the largest
  smaller group size that divides it, else bf16, with a note); an explicit `:gGS` there is refused.

Rules apply in order over the base (--bits for expert parts, --dense-bits for dense matrices):
a recipe's rules first, then each --quant; for every tensor the last matching rule wins. A --quant
that matches no tensor is an error naming it; a recipe's rule may match nothing (a recipe is
written for every family: a model without full attention has no `attn_q`).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from pyflashmoe.errors import ArgumentError

RULE_BITS = (2, 3, 4, 5, 6, 8, 16)
RULE_GROUP_SIZES = (32, 64, 128)

ALIASES = {
    "embed": "tok_embd",
    "lm_head": "output",
    "router": "{ffn_router,shexp_router}",
    "attn": "attn_{q,k,v,o}",
    "ssm": "ssm_{qkv,z,a,b,out}",
    "shexp": "shexp_{gate,up,down}",
    "experts": "experts.*",
}


@dataclass(frozen=True)
class Recipe:
    description: str
    rules: tuple


# The recipes, as data: picked by measured KLD per bits per weight on the demo model (bench/RESULTS.md
# "Demo model: mixed-precision recipes"; each beats every uniform setting at its size), in the spirit
# of the low-bit GGUF mixes: the dense weights every token reads above the experts' bits (6-bit
# measured the better trade than 8 on the demo, whose dense share is 29%; mix-4-d8 keeps 8), routers
# bf16 (tiny), expert down above gate/up.
RECIPES = {
    "mix-2": Recipe(
        "experts gate/up 2-bit, down 4-bit; embedding, lm_head, attention, linear attention, "
        "shared expert 6-bit; routers bf16",
        ("*=6", "router=bf16", "experts.{gate,up}=2", "experts.down=4")),
    "mix-3": Recipe(
        "experts gate/up 3-bit, down 4-bit; embedding, lm_head, attention, linear attention, "
        "shared expert 6-bit; routers bf16",
        ("*=6", "router=bf16", "experts.{gate,up}=3", "experts.down=4")),
    "mix-4": Recipe(
        "experts gate/up 4-bit, down 6-bit; embedding, lm_head, attention, linear attention, "
        "shared expert 6-bit; routers bf16",
        ("*=6", "router=bf16", "experts.{gate,up}=4", "experts.down=6")),
    "mix-4-d8": Recipe(
        "experts gate/up 4-bit, down 6-bit; embedding, lm_head, attention, linear attention, "
        "shared expert 8-bit; routers bf16",
        ("*=8", "router=bf16", "experts.{gate,up}=4", "experts.down=6")),
}


@dataclass(frozen=True)
class Rule:
    text: str                 # as given, for messages and the manifest
    patterns: tuple           # brace-expanded globs
    bits: int                 # 16 = bf16
    group_size: int           # 0: the converter's --group-size
    source: str               # "--quant" or "--recipe NAME"

    def fmt(self, default_gs):
        """(dtype, bits, group size) this rule asks for."""
        if self.bits == 16:
            return ("bf16", 0, 0)
        return ("affine", self.bits, self.group_size or default_gs)


def expand_braces(pat, what="pattern"):
    """'experts.{gate,up}' -> ['experts.gate', 'experts.up'] (nested and repeated groups)."""
    m = re.search(r"\{([^{}]*)\}", pat)
    if not m:
        if "{" in pat or "}" in pat:
            raise ArgumentError(f"{what}: unbalanced braces in {pat!r}")
        return [pat]
    out = []
    for alt in m.group(1).split(","):
        if not alt:
            raise ArgumentError(f"{what}: empty alternative in {{{m.group(1)}}} of {pat!r}")
        out.extend(expand_braces(pat[:m.start()] + alt + pat[m.end():], what))
    return out


def _resolve_alias(p):
    """An alias as a whole name or as the part after `blk.N.` / `blk.*.`."""
    if p in ALIASES:
        return ALIASES[p]
    m = re.match(r"^(blk\.[^.]+\.)(.+)$", p)
    if m and m.group(2) in ALIASES:
        return m.group(1) + ALIASES[m.group(2)]
    return p


def parse_rule(text, source="--quant"):
    """'experts.down=6' / 'attn=8:g32' / 'router=bf16' -> Rule; ArgumentError naming the rule."""
    what = f"{source} {text!r}"
    if not isinstance(text, str) or text.count("=") != 1:
        raise ArgumentError(f"{what}: expected PATTERN=BITS[:gGROUP], e.g. 'experts.down=6' or "
                            f"'attn=8:g32' or 'router=bf16'")
    pat, spec = (x.strip() for x in text.split("="))
    if not pat:
        raise ArgumentError(f"{what}: empty pattern")
    if re.search(r"[^A-Za-z0-9_.*?\[\]{},!-]", pat):
        raise ArgumentError(f"{what}: pattern {pat!r} has characters other than names, '.', "
                            f"'*', '?', '[...]' and '{{a,b}}'")
    pats = []
    for p in expand_braces(pat, what):
        if not p:
            raise ArgumentError(f"{what}: empty alternative in {pat!r}")
        pats.extend(expand_braces(_resolve_alias(p), what))
    m = re.fullmatch(r"(bf16|\d+)(?::g(\d+))?", spec)
    if not m:
        raise ArgumentError(f"{what}: format {spec!r} is not BITS[:gGROUP] (BITS one of "
                            f"2, 3, 4, 5, 6, 8, 16 or bf16; GROUP one of 32, 64, 128)")
    bits = 16 if m.group(1) == "bf16" else int(m.group(1))
    if bits not in RULE_BITS:
        raise ArgumentError(f"{what}: {bits} bits: the engine runs 2, 3, 4, 5, 6 and 8-bit "
                            f"group-affine weights and bf16 (16)")
    gs = int(m.group(2)) if m.group(2) else 0
    if m.group(2) and gs not in RULE_GROUP_SIZES:
        raise ArgumentError(f"{what}: group size {gs}: the engine runs group sizes 32, 64, 128")
    if bits == 16 and gs:
        raise ArgumentError(f"{what}: bf16 has no group size")
    return Rule(text, tuple(pats), bits, gs, source)


def matches(rule, name):
    """Does `rule` cover the weight `name` (`blk.3.attn_q`, `blk.3.experts.down`, `tok_embd`)?"""
    short = re.sub(r"^blk\.\d+\.", "", name)
    for p in rule.patterns:
        if fnmatch.fnmatchcase(name, p):
            return True
        if not p.startswith("blk.") and short != name and fnmatch.fnmatchcase(short, p):
            return True
    return False


def recipe_rules(name):
    if name not in RECIPES:
        raise ArgumentError(f"--recipe {name!r}: unknown; the recipes are "
                            + ", ".join(RECIPES) + " (flashmoe convert --help describes them)")
    return [parse_rule(t, f"--recipe {name}") for t in RECIPES[name].rules]


def recipes_help():
    """What `flashmoe convert --help` shows after the options: the recipes and the --quant syntax."""
    w = max(len(n) for n in RECIPES)
    return ("recipes (--recipe NAME):\n"
            + "\n".join(f"  {n.ljust(w)}  {r.description}" for n, r in RECIPES.items())
            + "\n\n--quant PATTERN=BITS[:gGROUP] (repeatable; applied after the recipe, the last "
              "match wins):\n"
              "  PATTERN globs over the weight names tok_embd, output, blk.N.attn_q, blk.N.ssm_qkv,\n"
              "  blk.N.shexp_down, blk.N.ffn_router, blk.N.experts.gate|up|down ({a,b} alternatives;\n"
              "  without 'blk.' it matches any layer); aliases: "
              + ", ".join(ALIASES) + ".\n"
              "  BITS: 2, 3, 4, 5, 6, 8 or 16 / bf16; GROUP: 32, 64, 128 (default --group-size).\n"
              "  e.g. --quant 'experts.down=6' --quant 'attn=8:g32' --quant 'blk.{0,7}.experts.*=8'")


__all__ = ["RECIPES", "Recipe", "Rule", "parse_rule", "matches", "recipe_rules", "recipes_help",
           "expand_braces", "ALIASES"]
