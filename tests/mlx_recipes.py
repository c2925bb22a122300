"""mlx_lm.convert quant_predicate callables that give a checkpoint per-layer / per-part formats
(what mixed recipes and hand-made predicates publish), for tests/test_convert_formats.py and the
"mixed" variants of tests/test_cuda.py. Each takes (path, module) and returns False (leave the
layer unquantized) or {"bits", "group_size", "mode"}; use them with a global q_group_size of 32
(mlx_lm skips a layer whose input dim the global group size does not divide before it asks the
predicate)."""
import re


def _q(bits, gs):
    return {"bits": bits, "group_size": gs, "mode": "affine"}


def _layer(path):
    m = re.search(r"layers\.(\d+)\.", path)
    return int(m.group(1)) if m else -1


def down8(path, module):
    """down projections (routed and shared) at 8-bit g32; the rest 4-bit g64 where 64 divides the
    input dim, else 4-bit g32."""
    if "down_proj" in path:
        return _q(8, 32)
    return _q(4, 64) if module.weight.shape[-1] % 64 == 0 else _q(4, 32)


def mixed(path, module):
    """Per-layer and per-tensor formats, gate and up of one layer alike: routed gate/up 2-bit g32
    on even layers, 4-bit g64 on odd ones; routed down unquantized (bf16) in layer 0, else 8-bit
    g32; attention q/k 6-bit g32, v 5-bit g64, o 3-bit g64, lm_head 5-bit g64, routers 8-bit g64;
    everything else 4-bit g32."""
    il = _layer(path)
    if "switch_mlp.down_proj" in path:
        return False if il == 0 else _q(8, 32)
    if "switch_mlp." in path:
        return _q(2, 32) if il % 2 == 0 else _q(4, 64)
    for k, b, g in (("q_proj", 6, 32), ("k_proj", 6, 32), ("v_proj", 5, 64), ("o_proj", 3, 64),
                    ("lm_head", 5, 64)):
        if k in path:
            return _q(b, g)
    if path.endswith("mlp.gate"):
        return _q(8, 64)
    return _q(4, 32)


def gate_up_kinds(path, module):
    """Routed gate 2-bit g32, up 4-bit g64, down unquantized (bf16): three kinds in one expert."""
    if "switch_mlp.gate_proj" in path:
        return _q(2, 32)
    if "switch_mlp.up_proj" in path:
        return _q(4, 64)
    if "switch_mlp.down_proj" in path:
        return False
    return True


def gate_up_groups(path, module):
    """Routed and shared-expert gate 4-bit g32, up 4-bit g64: one kind, two group sizes."""
    if "switch_mlp.gate_proj" in path or "shared_expert.gate_proj" in path:
        return _q(4, 32)
    if "switch_mlp.up_proj" in path or "shared_expert.up_proj" in path:
        return _q(4, 64)
    return True
