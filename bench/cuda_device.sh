#!/bin/bash
# bench/cuda_device.sh STAGE... : what one call on the GPU machine runs (logs under $OUT).
# Stages: info build test a b. The CUDA object may come prebuilt in build/cuda (carried).
# Env: TEST_K (pytest -k filter), B_LAYERS, B_BUDGETS, B_TOKENS, B_SPLITS (cpu_split settings
# per budget, default 0,auto), B_RESIDENT=1 (also the all-resident floor), *_TIMEOUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fm_out}
MD=${FM_MODELS:-/tmp/fm_models}
mkdir -p "$OUT" "$MD"
for st in "$@"; do
  echo "=== stage $st $(date +%T)"
  case $st in
  info)
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
    python3 -V; nproc; free -g | head -2; df -h / /tmp | tail -2
    python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__, 'qwen3_5', hasattr(transformers, 'Qwen3_5MoeForCausalLM'))" ;;
  build)
    t0=$(date +%s)
    FLASHMOE_CUDA=1 python3 setup.py build_ext --inplace -q 2>&1 | grep -v -e Wcomment -e "^ *|" -e "fm_internal.h:1" -e "In file included" -e "from csrc" | tail -15
    echo "build $(( $(date +%s) - t0 )) s"
    python3 -c "import pyflashmoe._core as c; print('cuda', c.cuda_compiled(), c.cuda_available(), c.cuda_describe())" ;;
  test)
    timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -rs --tb=short --maxfail=25 -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | grep -v "^SKIPPED" | tail -60 ;;
  a)
    t0=$(date +%s)
    python3 -c "from pyflashmoe.synth import synth; synth('$MD/q35', preset='qwen3.5-35b-a3b', bits=4, dense_bits=8, progress=False, force=True)" 2>&1 | tail -3
    echo "synth 35B $(( $(date +%s) - t0 )) s"; du -sh "$MD/q35"
    timeout ${A_TIMEOUT:-240} python3 bench/cuda_bench.py resident "$MD/q35" --tokens 128 --warmup 8 2>&1 | tee "$OUT/bench_a.log" | grep -v "^{"
    rm -rf "$MD/q35" ;;
  b)
    t0=$(date +%s)
    python3 -c "from pyflashmoe.synth import synth; synth('$MD/q397', preset='qwen3.5-397b-a17b', layers=${B_LAYERS:-8}, bits=4, dense_bits=8, progress=False, force=True)" 2>&1 | tail -3
    echo "synth 397B x${B_LAYERS:-8} layers $(( $(date +%s) - t0 )) s"; du -sh "$MD/q397"
    timeout ${B_TIMEOUT:-300} python3 bench/cuda_bench.py tiers "$MD/q397" --budgets ${B_BUDGETS:-8,16,32} --scale-layers 60 --tokens ${B_TOKENS:-48} --warmup 8 --splits ${B_SPLITS:-0,auto} ${B_RESIDENT:+--resident-too} 2>&1 | tee "$OUT/bench_b.log" | grep -v "^{" ;;
  esac
done
echo "=== done $(date +%T)"
