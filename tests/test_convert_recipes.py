"""Mixed-precision recipes and per-tensor overrides in `flashmoe convert` (issue 11 item 5).

* Rule syntax `PATTERN=BITS[:gGROUP]` (pyflashmoe/convert/recipes.py): parsing, aliases, `{a,b}`,
  and the errors (bad bits / group size, a --quant that matches nothing, an explicit group size that
  does not divide, recipes with --bits, an MLX source).
* Every recipe's dir has the formats its rules say (read back from the manifest), the manifest
  records the recipe and the overrides, and later rules win.
* A recipe dir with overrides loads and its CPU logits match transformers' fp32 forward with every
  stored (dequantized) weight in place.
"""
import os

import numpy as np
import pytest

from pyflashmoe import cli
from pyflashmoe.convert import convert, fallback_group_size
from pyflashmoe.convert.recipes import ALIASES, RECIPES, matches, parse_rule, recipe_rules
from pyflashmoe.errors import ArgumentError
from pyflashmoe.format import ModelDir, read_manifest, validate
from pyflashmoe.models import tensor_map
from tiny_models import load_tiny_hf, make_tiny_hf

torch = pytest.importorskip("torch")
core = pytest.importorskip("pyflashmoe._core")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """qwen3_5_moe tiny: hidden 64, expert intermediate 32 (down: g64 falls back to g32), shared
    expert 48 (shexp_down: no group size divides 48 -> bf16)."""
    src, _ = make_tiny_hf("qwen3_5_moe", tmp_path_factory.mktemp("hf") / "hf", seed=21)
    return src


# ---- rule syntax -----------------------------------------------------------------------------

def test_parse_rule_formats_and_aliases():
    r = parse_rule("experts.down=6")
    assert (r.patterns, r.bits, r.group_size) == (("experts.down",), 6, 0)
    assert r.fmt(64) == ("affine", 6, 64)
    r = parse_rule("attn=8:g32")
    assert r.patterns == ("attn_q", "attn_k", "attn_v", "attn_o") and r.fmt(64) == ("affine", 8, 32)
    assert parse_rule("router=bf16").fmt(64) == ("bf16", 0, 0)
    assert parse_rule("embed=16").patterns == ("tok_embd",)
    assert parse_rule("blk.{0,7}.experts.{gate,up}=2:g32").patterns == (
        "blk.0.experts.gate", "blk.0.experts.up", "blk.7.experts.gate", "blk.7.experts.up")
    assert parse_rule("blk.3.shexp=4").patterns == ("blk.3.shexp_gate", "blk.3.shexp_up", "blk.3.shexp_down")
    assert set(ALIASES) >= {"embed", "lm_head", "router", "attn", "ssm", "shexp", "experts"}


def test_rule_matching():
    r = parse_rule("experts.down=6")
    assert matches(r, "blk.0.experts.down") and matches(r, "blk.17.experts.down")
    assert not matches(r, "blk.0.experts.up") and not matches(r, "blk.0.shexp_down")
    r = parse_rule("blk.1.experts.*=8")
    assert matches(r, "blk.1.experts.gate") and not matches(r, "blk.11.experts.gate")
    assert matches(parse_rule("*=8"), "tok_embd") and matches(parse_rule("*=8"), "blk.2.ssm_qkv")
    r = parse_rule("router=bf16")
    assert matches(r, "blk.4.ffn_router") and matches(r, "blk.4.shexp_router")
    assert not matches(r, "blk.4.shexp_gate")
    assert matches(parse_rule("lm_head=6"), "output") and not matches(parse_rule("lm_head=6"), "tok_embd")
    assert matches(parse_rule("*_down=5"), "blk.0.shexp_down")


@pytest.mark.parametrize("text, match", [
    ("experts.down", "expected PATTERN=BITS"),
    ("a=4=5", "expected PATTERN=BITS"),
    ("=4", "empty pattern"),
    ("experts.down=7", "7 bits: the engine runs 2, 3, 4, 5, 6 and 8-bit"),
    ("experts.down=1", "1 bits"),
    ("experts.down=4:g16", "group size 16: the engine runs group sizes 32, 64, 128"),
    ("experts.down=4:32", "is not BITS"),
    ("experts.down=q4", "is not BITS"),
    ("router=bf16:g32", "bf16 has no group size"),
    ("experts.{gate,up=2", "unbalanced braces"),
    ("experts/down=4", "has characters other than"),
    ("experts.{gate,}=4", "empty alternative"),
])
def test_parse_rule_errors(text, match):
    with pytest.raises(ArgumentError, match=match) as ei:
        parse_rule(text)
    assert repr(text) in str(ei.value)          # the message names the rule


def test_every_recipe_parses_and_has_a_description():
    assert RECIPES
    for name, r in RECIPES.items():
        assert r.description and "\n" not in r.description
        assert len(recipe_rules(name)) == len(r.rules)
    with pytest.raises(ArgumentError, match="--recipe 'nope': unknown; the recipes are mix-"):
        recipe_rules("nope")


# ---- what a converted dir holds ----------------------------------------------------------------

def _want(rules, name, shape, gs=64, base=None):
    """The format the last matching rule gives a weight, with --bits' fallback where the group
    size does not divide the input dim (the recipes give no explicit group size that cannot)."""
    hit = base
    for r in rules:
        if matches(r, name):
            hit = r.fmt(gs)
    dt, b, g = hit
    if dt == "affine" and shape[1] % g:
        g = fallback_group_size(shape[1], g)
        return ("affine", b, g) if g else ("bf16", 0, 0)
    return hit


def _have(e):
    return (e["dtype"], e.get("bits", 0), e.get("group_size", 0)) if e["dtype"] == "affine" else (e["dtype"], 0, 0)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_dir_has_the_formats_it_says(recipe, tiny, tmp_path):
    dst = tmp_path / recipe
    convert(tiny, dst, recipe=recipe, progress=False)
    validate(dst)
    man = read_manifest(dst)
    q = man["quantization"]
    assert q["recipe"] == {"name": recipe, "description": RECIPES[recipe].description,
                           "rules": list(RECIPES[recipe].rules)}
    assert "overrides" not in q
    rules = recipe_rules(recipe)
    spec = ModelDir(dst).spec
    n = 0
    for tm in tensor_map(spec):
        e = man["tensors"][tm.name]
        if tm.kind in ("vector", "conv"):
            assert e["dtype"] == "f32", tm.name
            continue
        assert _have(e) == _want(rules, tm.name, tm.shape, base=("bf16", 0, 0)), tm.name
        n += 1
    assert n > 20
    for il in spec.moe_layers():
        for pn, pe in man["experts"]["layers"][str(il)]["parts"].items():
            assert _have(pe) == _want(rules, f"blk.{il}.experts.{pn}", pe["shape"]), (il, pn)
    # the shipped recipes' shape: dense at 6 or 8 bits, routers bf16, experts below the dense bits,
    # down >= gate/up
    t = man["tensors"]
    db = t["tok_embd"]["bits"]
    assert db in (6, 8) and _have(t["output"])[:2] == ("affine", db)
    assert t["blk.0.ffn_router"]["dtype"] == "bf16" and t["blk.0.shexp_router"]["dtype"] == "bf16"
    assert _have(t["blk.1.attn_q"])[:2] == ("affine", db) and _have(t["blk.0.ssm_qkv"])[:2] == ("affine", db)
    parts = man["experts"]["layers"]["0"]["parts"]
    assert parts["gate"]["bits"] == parts["up"]["bits"] <= parts["down"]["bits"] <= db
    # tiny dims: expert down (input 32) at g32, shexp_down (input 48) bf16, both noted
    assert parts["down"]["group_size"] == 32
    assert t["blk.0.shexp_down"]["dtype"] == "bf16"
    assert any("blk.*.shexp_down" in s and "input dim 48" in s for s in q["notes"])


def test_overrides_apply_after_the_recipe_and_the_last_wins(tiny, tmp_path, capfd):
    dst = tmp_path / "o"
    over = ["experts.down=6", "blk.1.experts.down=bf16", "lm_head=bf16", "attn=5:g32", "blk.0.ssm=4"]
    convert(tiny, dst, recipe="mix-2", quant=over, progress=True)
    err = capfd.readouterr().err
    man = read_manifest(dst)
    q = man["quantization"]
    assert q["overrides"] == over and q["recipe"]["name"] == "mix-2"
    L = man["experts"]["layers"]
    assert _have(L["0"]["parts"]["down"]) == ("affine", 6, 32)      # input 32: g64 -> g32, noted
    assert _have(L["1"]["parts"]["down"]) == ("bf16", 0, 0)
    assert _have(L["1"]["parts"]["gate"]) == ("affine", 2, 64)
    t = man["tensors"]
    assert t["output"]["dtype"] == "bf16" and _have(t["tok_embd"]) == ("affine", 6, 64)
    assert _have(t["blk.1.attn_k"]) == ("affine", 5, 32) and _have(t["blk.1.attn_o"]) == ("affine", 5, 32)
    assert _have(t["blk.0.ssm_z"]) == ("affine", 4, 64) and _have(t["blk.2.ssm_z"]) == ("affine", 6, 64)
    assert "kept at 6-bit g32: blk.{0,2,3}.ffn_down experts (input dim 32 not a multiple of 64)" in err
    assert {"bits": 16} in q["experts"]["formats"] and {"bits": 6, "group_size": 32} in q["experts"]["formats"]
    validate(dst)


def test_quant_only_no_recipe_on_top_of_bits(tiny, tmp_path):
    dst = tmp_path / "q"
    convert(tiny, dst, bits=3, dense_bits=8, quant=["experts.down=8", "embed=6"], progress=False)
    man = read_manifest(dst)
    assert "recipe" not in man["quantization"]
    parts = man["experts"]["layers"]["0"]["parts"]
    assert _have(parts["gate"]) == ("affine", 3, 64) and _have(parts["down"]) == ("affine", 8, 32)
    t = man["tensors"]
    assert _have(t["tok_embd"]) == ("affine", 6, 64)
    assert _have(t["blk.1.attn_q"]) == ("affine", 8, 64)             # --dense-bits 8 as before
    assert t["blk.0.ffn_router"]["dtype"] == "bf16"


@pytest.mark.parametrize("quant, match", [
    (["experts.dwn=6"], r"--quant 'experts.dwn=6': matches no weight matrix"),
    (["attn_norm=8"], r"--quant 'attn_norm=8': matches no weight matrix .*norms and ssm_conv stay f32"),
    (["blk.9.experts.*=8"], r"--quant 'blk.9.experts.\*=8': matches no weight matrix"),
    (["shexp_down=4:g64"], r"--quant 'shexp_down=4:g64': blk.0.shexp_down has input dim 48, not a "
                           r"multiple of group size 64"),
    (["experts.down=9"], "9 bits"),
])
def test_override_errors_name_the_rule(quant, match, tiny, tmp_path):
    with pytest.raises(ArgumentError, match=match):
        convert(tiny, tmp_path / "x", recipe="mix-3", quant=quant, progress=False)
    assert not os.path.exists(tmp_path / "x")


def test_mlx_source_refuses_recipes(tmp_path):
    pytest.importorskip("mlx.core", reason="mlx is not installed: no MLX-quantized checkpoint to refuse")
    from tiny_models import make_mlx_quantized
    src, _ = make_tiny_hf("qwen3_moe", tmp_path / "hf", seed=3)
    mlxdir = make_mlx_quantized(src, tmp_path / "mlx", bits=4, group_size=32)
    with pytest.raises(ArgumentError, match="MLX-quantized checkpoint converts as published; "
                                            "--recipe / --quant need a float"):
        convert(mlxdir, tmp_path / "x", quant=["experts.down=6"], progress=False)


# ---- the command line -------------------------------------------------------------------------

def test_cli_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    for name, r in RECIPES.items():
        assert f"  {name}  " in out and r.description[:40] in out
    assert "--quant PATTERN=BITS[:gGROUP]" in out


def test_cli_recipe_with_bits_is_an_error(tiny, tmp_path, capsys):
    assert cli.main(["convert", tiny, str(tmp_path / "x"), "--recipe", "mix-2", "--bits", "4"]) == 2
    assert "--recipe mix-2 sets the format of every weight" in capsys.readouterr().err
    assert cli.main(["convert", tiny, str(tmp_path / "x"), "--recipe", "mix-9"]) == 2
    assert "--recipe 'mix-9': unknown" in capsys.readouterr().err
    assert cli.main(["convert", tiny, str(tmp_path / "x"), "--quant", "nothing=4"]) == 2
    assert "--quant 'nothing=4': matches no weight matrix" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_cli_recipe_and_quant(tiny, tmp_path):
    dst = tmp_path / "c"
    assert cli.main(["convert", tiny, str(dst), "--recipe", "mix-4", "--quant", "experts.gate=3",
                     "--quant", "router=8", "-q"]) == 0
    man = read_manifest(dst)
    assert man["quantization"]["recipe"]["name"] == "mix-4"
    assert man["quantization"]["overrides"] == ["experts.gate=3", "router=8"]
    parts = man["experts"]["layers"]["0"]["parts"]
    assert (parts["gate"]["bits"], parts["up"]["bits"], parts["down"]["bits"]) == (3, 4, 6)
    assert _have(man["tensors"]["blk.1.attn_v"]) == ("affine", 6, 64)
    assert _have(man["tensors"]["blk.0.ffn_router"]) == ("affine", 8, 64)


# ---- logits against a dequantize reference ----------------------------------------------------

def test_recipe_dir_logits_match_dequantized_reference(tiny, tmp_path):
    """mix-2 plus overrides that give 3/5/6-bit and g32 tensors: the CPU engine's logits equal
    transformers' fp32 forward with every stored weight dequantized in place (so the engine runs
    each per-tensor format as the manifest says), within fp32 rounding."""
    dst = tmp_path / "m"
    convert(tiny, dst, recipe="mix-2", quant=["attn=5:g32", "blk.0.ssm=3", "blk.1.experts.down=6",
                                              "shexp_up=6:g32", "lm_head=4"], progress=False)
    md = ModelDir(dst)
    man, spec = md.manifest, md.spec
    ref_model = load_tiny_hf("qwen3_5_moe", tiny)
    params = dict(ref_model.named_parameters())
    by = {tm.name: tm for tm in tensor_map(spec)}
    seen = set()
    with torch.no_grad():
        for name, e in man["tensors"].items():
            if e["dtype"] == "affine":
                assert by[name].rows is None
                params[by[name].src].copy_(torch.from_numpy(md.dense(name)))
                seen.add((e["bits"], e["group_size"]))
        for il in spec.moe_layers():
            for e in range(spec.n_experts):
                w = md.expert(il, e)
                params[f"model.layers.{il}.mlp.experts.gate_up_proj"][e].copy_(
                    torch.from_numpy(np.concatenate([w["gate"], w["up"]])))
                params[f"model.layers.{il}.mlp.experts.down_proj"][e].copy_(torch.from_numpy(w["down"]))
    assert {(6, 64), (5, 32), (3, 64), (6, 32), (4, 64)} <= seen
    toks = np.random.default_rng(1).integers(3, spec.vocab_size, size=12).astype(np.int32)
    with torch.no_grad():
        ref = ref_model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()
    eng = core.Engine(str(dst), backend=0, n_threads=2)
    ours = core.Session(eng, 64).eval(toks, all_logits=True)
    scale = float(np.abs(ref).max())
    assert np.all(np.isfinite(ours))
    assert float(np.abs(ours - ref).max()) <= 1e-4 * scale
    # and the quantization itself is visible: the bf16 source's logits differ by far more
    src_model = load_tiny_hf("qwen3_5_moe", tiny)
    with torch.no_grad():
        src_logits = src_model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()
    assert float(np.abs(src_logits - ref).max()) > 100 * float(np.abs(ours - ref).max())
