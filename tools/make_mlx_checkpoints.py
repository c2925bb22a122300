"""Write the MLX checkpoints tests/test_cuda.py's mixed-format variants convert, for a machine where
mlx cannot be installed (the GPU machine): the same tiny HF models and tests/mlx_recipes.py recipes
as the `tiny_dirs` fixture, quantized here by mlx_lm.convert.

    python tools/make_mlx_checkpoints.py OUT      then, there: FLASHMOE_TEST_MLX_DIR=OUT pytest tests/test_cuda.py
"""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import mlx_recipes  # noqa: E402
import tiny_models as tm  # noqa: E402

RECIPES = {"mixed": mlx_recipes.mixed, "mixed_gu": mlx_recipes.gate_up_kinds,
           "mixed_gs": mlx_recipes.gate_up_groups}


def main(out):
    with tempfile.TemporaryDirectory() as tmp:
        for arch in tm.ARCHS:
            hf, _ = tm.make_tiny_hf(arch, os.path.join(tmp, arch, "hf"), seed=0)
            for name, pred in RECIPES.items():
                tm.make_mlx_quantized(hf, os.path.join(out, arch, f"mlx_{name}"), bits=4, group_size=32,
                                      quant_predicate=pred)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
