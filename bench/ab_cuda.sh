#!/bin/bash
# bench/ab_cuda.sh OLD_TREE [ROUNDS]: CUDA speed of this tree against an older one, side by side in
# one call on the GPU machine (bench/RESULTS.md "One forward loop"). OLD_TREE is a copy of the old
# commit (`git archive REV`: setup.py, pyproject.toml, csrc/, pyflashmoe/ without demo/, bench/),
# with its CUDA objects under OLD_TREE/build/cuda or built here. Both trees are built, the models are
# written once by this tree's synth (the on-disk format is the same), then per round, new then old:
#   resident: 35B-A3B dims (40 layers, 4-bit experts, 8-bit dense), every expert in VRAM,
#             `cuda_bench.py resident --tokens 128 --warmup 8` (CUDA graph and plain launches)
#   tiers:    397B-A17B dims, B_LAYERS layers (default 4), experts in pinned host RAM, a 16 GiB VRAM
#             cache scaled to 60 layers, `cuda_bench.py tiers --splits 0,auto`
# Logs go to $OUT/ab_{new,old}_{resident,tiers}_ROUND.log; the summary greps tok/s and ms/layer.
set -u
export PYTHONUNBUFFERED=1
OLD=$(cd "$1" && pwd)
ROUNDS=${2:-3}
NEW=$(pwd)
OUT=${OUT:-/tmp/ab_out}
MD=${FM_MODELS:-/tmp/fm_models}
mkdir -p "$OUT" "$MD"
t0=$(date +%s)
(cd "$OLD" && FLASHMOE_CUDA=1 python3 setup.py build_ext --inplace -q >"$OUT/build_old.log" 2>&1) &
FLASHMOE_CUDA=1 python3 setup.py build_ext --inplace -q >"$OUT/build_new.log" 2>&1
wait
echo "builds $(( $(date +%s) - t0 )) s"
for t in "$NEW" "$OLD"; do (cd "$t" && python3 -c "import pyflashmoe._core as c; print(c.__file__, c.cuda_available())"); done
t0=$(date +%s)
python3 -c "from pyflashmoe.synth import synth; synth('$MD/q35', preset='qwen3.5-35b-a3b', bits=4, dense_bits=8, progress=False, force=True)" &
python3 -c "from pyflashmoe.synth import synth; synth('$MD/q397', preset='qwen3.5-397b-a17b', layers=${B_LAYERS:-4}, bits=4, dense_bits=8, progress=False, force=True)"
wait
echo "synth $(( $(date +%s) - t0 )) s"
for r in $(seq 1 "$ROUNDS"); do
  for side in new old; do
    if [ $side = new ]; then t=$NEW; else t=$OLD; fi
    [ "${SKIP_RESIDENT:-0}" = 1 ] || (cd "$t" && timeout 300 python3 bench/cuda_bench.py resident "$MD/q35" --tokens 128 --warmup 8 >"$OUT/ab_${side}_resident_$r.log" 2>&1)
    [ "${SKIP_TIERS:-0}" = 1 ] || (cd "$t" && timeout 300 python3 bench/cuda_bench.py tiers "$MD/q397" --budgets 16 --scale-layers 60 --tokens 32 --warmup 8 --splits 0,auto >"$OUT/ab_${side}_tiers_$r.log" 2>&1)
    echo "round $r $side done $(date +%T)"
  done
done
grep -H -i -e "tok/s" -e "ms/layer" -e "ms_per_layer" "$OUT"/ab_*.log | grep -v "^{" | cut -c1-220
