#!/bin/sh
# Run the three targets one after the other on one core.
#   tools/fuzz/run_all.sh [CONFIG_RUNS] [ST_RUNS] [MANIFEST_RUNS] [OUTDIR]
# Logs, the growing work corpora and any crash-* / timeout-* / oom-* reproducers go to OUTDIR
# (default /tmp/flashmoe-fuzz); the committed seed corpora under tools/fuzz/corpus/ are only read.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
C=${1:-500000}; S=${2:-350000}; M=${3:-150000}; OUT=${4:-/tmp/flashmoe-fuzz}
mkdir -p "$OUT/art"
for t in config:$C st_header:$S manifest:$M; do
    name=${t%%:*}; runs=${t#*:}
    mkdir -p "$OUT/work/$name"
    python "$HERE/fuzz_$name.py" -atheris_runs="$runs" -max_len=300000 -timeout=30 -rss_limit_mb=3072 \
        -print_final_stats=1 -artifact_prefix="$OUT/art/$name-" \
        "$OUT/work/$name" "$HERE/corpus/$name" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? ($(grep -o 'Done [0-9]* in [0-9]* second(s)' "$OUT/$name.log"))"
done
