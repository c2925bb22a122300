"""The model-family registry: SUPPORTED / ALIASES / ARCH_RULES come from the modules
`pyflashmoe/models/<model_type>.py`, so a new family is one module and no other edit."""
import concurrent.futures
import importlib
import sys
import textwrap

import pytest

from pyflashmoe import models
from pyflashmoe.errors import FlashMoEError, FormatError, UnsupportedModelError
from pyflashmoe.models import ModelSpec, spec_from_config, tensor_map

QWEN3_MOE_CFG = {
    "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 96,
    "mlp_only_layers": [1], "eos_token_id": 3,
}

# a family that reuses Qwen3-MoE's reader under a new model_type, as a contributor would write it
TOY = '''
import dataclasses
from pyflashmoe.models import qwen3_moe

ALIASES = ("toy_moe_text",)
RULES = dict(qwen3_moe.RULES)


def spec_from_config(cfg, generation_config=None):
    return dataclasses.replace(qwen3_moe.spec_from_config(cfg, generation_config), arch="toy_moe")


tensor_map = qwen3_moe.tensor_map
'''


@pytest.fixture
def extra_family(tmp_path):
    """Put modules from a temp dir on the models package path; -> write(name, source)."""
    added = []
    models.__path__.append(str(tmp_path))

    def write(name, src):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
        added.append(name)
        importlib.invalidate_caches()

    try:
        yield write
    finally:
        models.__path__.remove(str(tmp_path))
        for name in added:
            sys.modules.pop(f"pyflashmoe.models.{name}", None)
            if hasattr(models, name):
                delattr(models, name)
        importlib.invalidate_caches()
        models.registry(refresh=True)


def test_registry_has_the_shipped_families():
    # the values the hard-coded tables had before the registry read them from the modules
    assert models.SUPPORTED == ("qwen3_5_moe", "qwen3_moe", "qwen3_next")
    assert models.ALIASES == {"qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next_text": "qwen3_next",
                              "qwen3_moe_text": "qwen3_moe"}
    assert models.ARCH_RULES == {"qwen3_5_moe": (1.0, True, ("full", "linear"), ("moe",)),
                                 "qwen3_next": (1.0, True, ("full", "linear"), ("moe", "dense")),
                                 "qwen3_moe": (0.0, False, ("full",), ("moe", "dense"))}
    # from-imports work too
    from pyflashmoe.models import ALIASES, ARCH_RULES, SUPPORTED
    assert SUPPORTED == models.SUPPORTED and ALIASES is models.ALIASES
    assert ARCH_RULES is models.ARCH_RULES
    with pytest.raises(AttributeError):
        getattr(models, "NO_SUCH_NAME")  # noqa: B009


def test_unsupported_lists_types_sorted():
    with pytest.raises(UnsupportedModelError) as ei:
        spec_from_config({"model_type": "llama"})
    assert ("supported: qwen3_5_moe, qwen3_moe, qwen3_next (aliases: qwen3_5_moe_text, "
            "qwen3_moe_text, qwen3_next_text)") in str(ei.value)
    for mt in (["qwen3_moe"], {"a": 1}, 5):   # unhashable / non-str types are unsupported too
        with pytest.raises(UnsupportedModelError, match="supported: qwen3_5_moe, qwen3_moe"):
            spec_from_config(dict(QWEN3_MOE_CFG, model_type=mt))
    d = spec_from_config(QWEN3_MOE_CFG).to_dict()
    d["arch"] = "llama"
    with pytest.raises(FormatError, match="is not one of qwen3_5_moe, qwen3_moe, qwen3_next"):
        ModelSpec.from_dict(d)


def test_norm_topk_prob_rule_from_module():
    # qwen3_5_moe's RULES pin norm_topk_prob (the check used to name the arch in the code)
    cfg = {k: v for k, v in QWEN3_MOE_CFG.items() if k != "mlp_only_layers"}   # every layer MoE
    d = spec_from_config(cfg).to_dict()
    d.update(arch="qwen3_5_moe", norm_offset=1.0, attn_output_gate=True, norm_topk_prob=False)
    with pytest.raises(FormatError, match="norm_topk_prob: must be true for arch qwen3_5_moe"):
        ModelSpec.from_dict(d)
    d["norm_topk_prob"] = True
    ModelSpec.from_dict(d)


def test_new_family_module_is_picked_up(extra_family):
    with pytest.raises(UnsupportedModelError):
        spec_from_config(dict(QWEN3_MOE_CFG, model_type="toy_moe"))
    extra_family("toy_moe", TOY)
    models.registry(refresh=True)
    assert models.SUPPORTED == ("qwen3_5_moe", "qwen3_moe", "qwen3_next", "toy_moe")
    assert models.ALIASES["toy_moe_text"] == "toy_moe"
    assert models.ARCH_RULES["toy_moe"] == models.ARCH_RULES["qwen3_moe"]
    ref = spec_from_config(QWEN3_MOE_CFG)
    for mt in ("toy_moe", "toy_moe_text"):
        spec = spec_from_config(dict(QWEN3_MOE_CFG, model_type=mt))
        assert spec.arch == "toy_moe"
        assert spec.to_dict() == dict(ref.to_dict(), arch="toy_moe")
        assert ModelSpec.from_dict(spec.to_dict()) == spec   # a manifest with the new arch loads
        assert tensor_map(spec) == tensor_map(ref)
    # the family's own rules apply to it
    d = dict(spec.to_dict(), norm_offset=1.0)
    with pytest.raises(FormatError, match="do not match arch toy_moe"):
        ModelSpec.from_dict(d)
    with pytest.raises(UnsupportedModelError,
                       match=r"qwen3_next, toy_moe \(aliases: .*, toy_moe_text\)"):
        spec_from_config({"model_type": "llama"})


FUNCS = "def spec_from_config(cfg, g=None): pass\ndef tensor_map(spec): pass\n"


def _rules(**kw):
    r = {"norm_offset": 0.0, "attn_output_gate": False, "attn_kinds": ("full",), "ffn_kinds": ("moe",)}
    r.update(kw)
    return f"RULES = {{k: v for k, v in {r!r}.items() if v != 'DROP'}}\n"


@pytest.mark.parametrize(("src", "match"), [
    (_rules(), r"missing module attribute\(s\) \['spec_from_config', 'tensor_map'\]"),
    (FUNCS, r"missing module attribute\(s\) \['RULES'\]"),
    (_rules(ffn_kinds="DROP") + FUNCS, r"RULES has missing key\(s\) \['ffn_kinds'\]"),
    (_rules(sliding=1) + FUNCS, r"unknown key\(s\) \['sliding'\]"),
    (_rules(attn_kinds=("full", "sliding")) + FUNCS, r"RULES\['attn_kinds'\] must be a non-empty tuple"),
    (_rules(ffn_kinds=()) + FUNCS, r"RULES\['ffn_kinds'\] must be a non-empty tuple"),
    (_rules(norm_offset=2.0) + FUNCS, r"RULES\['norm_offset'\] must be a number in \[0, 1\]"),
    (_rules(attn_output_gate=1) + FUNCS, r"RULES\['attn_output_gate'\] must be True or False"),
    (_rules(norm_topk_prob="yes") + FUNCS, r"RULES\['norm_topk_prob'\] must be None, True or False"),
    ("RULES = 3\n" + FUNCS, r"RULES must be a dict"),
    (_rules() + "spec_from_config = 1\ndef tensor_map(spec): pass\n", r"spec_from_config must be a function"),
    ("ALIASES = ('qwen3_moe_text',)\n" + _rules() + FUNCS,
     r"model families 'broken' and 'qwen3_moe': both claim the alias 'qwen3_moe_text'"),
    ("ALIASES = ('qwen3_next',)\n" + _rules() + FUNCS,
     r"alias 'qwen3_next' is also the name of a family module"),
    ("ALIASES = 'broken_text'\n" + _rules() + FUNCS, r"ALIASES must be a tuple"),
])
def test_broken_family_module_is_a_clear_error(extra_family, src, match):
    extra_family("broken", src)
    with pytest.raises(FlashMoEError, match=match) as ei:
        models.registry(refresh=True)
    assert "broken" in str(ei.value)


def test_private_modules_are_not_families(extra_family):
    extra_family("_helpers", "X = 1\n")
    assert "_helpers" not in models.registry(refresh=True).supported


def test_family_reading_the_registry_while_it_is_built_is_a_clear_error(extra_family):
    extra_family("selfref", _rules() + FUNCS + "from pyflashmoe.models import SUPPORTED\n")
    with pytest.raises(FlashMoEError, match="while the registry was being built"):
        models.registry(refresh=True)


def test_registry_built_once_under_threads():
    models.registry(refresh=True)
    models._REGISTRY = None
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        regs = list(ex.map(lambda _: models.registry(), range(32)))
    assert all(r is regs[0] for r in regs)
