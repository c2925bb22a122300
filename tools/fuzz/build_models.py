"""Build the tiny model dirs the manifest fuzz target loads: `python build_models.py OUTDIR`.

next4: Qwen3-Next (linear + full attention, one dense MLP layer), 4-bit affine experts with
block_crc32, 8-bit affine dense matrices. moe16: Qwen3-MoE, bf16 experts and dense.
"""
import os
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))


def add_block_crcs(d):
    """Record experts.layers[*].block_crc32 (until the writers do it themselves)."""
    from pyflashmoe import format as fmt
    m = fmt.read_manifest(d)
    for L in m["experts"]["layers"].values():
        if "block_crc32" in L:
            continue
        with open(os.path.join(d, L["file"]), "rb") as f:
            f.seek(L["data_offset"])
            L["block_crc32"] = [zlib.crc32(f.read(L["block_bytes"])) for _ in range(L["n_experts"])]
    fmt.write_manifest(d, m)


def main(out):
    import shutil
    from tiny_models import make_tiny_hf
    from pyflashmoe.convert import convert
    os.makedirs(out, exist_ok=True)
    for name, arch, kw, ckw in (("next4", "qwen3_next", {"mlp_only_layers": [1]},
                                 dict(bits=4, group_size=32, dense_bits=8)),
                                ("moe16", "qwen3_moe", {}, dict(bits=16))):
        src = os.path.join(out, name + "-hf")
        make_tiny_hf(arch, src, seed=3, **kw)
        convert(src, os.path.join(out, name), force=True, progress=False, **ckw)
        add_block_crcs(os.path.join(out, name))
        shutil.rmtree(src)


if __name__ == "__main__":
    main(sys.argv[1])
