#!/usr/bin/env bash
# tools/sanitize.sh: the ASan/UBSan sweep of the C core (csrc/), run now and then by a developer.
#
# It never touches the checkout's own build: it makes a separate git worktree, builds the
# extension there with FLASHMOE_SANITIZE=1 (setup.py: -fsanitize=address,undefined -O1 -g), and
#   1. builds and runs tools/san_driver.c: a C-only program linked against the same csrc/ files
#      with leak detection ON (no Python in the process, so every leak reported is ours): kernels of
#      every SIMD level on exactly sized buffers, the thread pool, JSON prefixes, and tiny model dirs
#      (open / sessions / eval / errors / close) made by the converter on the sanitized extension;
#      then tools/san_mutants.py writes ~3000 malformed copies of those dirs (one manifest field
#      changed each) and san_driver --mutant opens/evaluates each in its own process: any
#      fm_status is fine, a sanitizer report is a finding;
#      Also a ThreadSanitizer build of the same driver (compute pool, I/O threads, probe) on the
#      model dirs: data races are UB too;
#   2. runs the C-heavy pytest files against the sanitized extension, with libasan + libubsan
#      preloaded into the (uninstrumented) Python, leak detection OFF (CPython, numpy and torch
#      "leak" by design), every report written to a log file (pytest's fd capture would swallow a
#      report printed just before the process ends);
#   3. prints a summary: driver and pytest result lines, sanitizer reports (count + top frames);
#      exit status 1 on any report or failure.
#
# Usage: tools/sanitize.sh [--head] [--keep] [--no-pytest] [--no-driver] [--no-mutants] [--no-tsan] [pytest args...]
#   --head       sanitize the last commit only (default: HEAD plus the checkout's modified and
#                untracked-not-ignored files copied over, i.e. what is on disk now)
#   --keep       keep the worktree (default: remove it at the end; logs are kept, see below)
#   extra args   passed to pytest instead of the default file list (e.g. tests/test_quant.py -k matvec)
# Environment: SAN_SRC (the checkout; default: the one holding this script), SAN_DIR (the
#   worktree, default /tmp/fm-san-$USER), SAN_LOGS (default /tmp/fm-san-logs-$USER), SAN_NICE
#   (default 10), SAN_JOBS (parallel compiles of the driver, default 2), SAN_ASAN_EXTRA (more
#   ASAN_OPTIONS, e.g. detect_odr_violation=0:alloc_dealloc_mismatch=0 should a torch/mlx build
#   need them). Takes about 15 minutes on 2 busy cores.
#
# Setup notes (what a clean run needs, and why):
#  - LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)": the
#    extension links the shared sanitizer runtimes and ASan must come first in the process.
#  - ASAN_OPTIONS=detect_leaks=0 for Python; leaks are checked by san_driver (detect_leaks=1).
#    torch 2.13 and mlx 0.32 ran clean under the preloaded runtime without detect_odr_violation=0
#    or alloc_dealloc_mismatch=0.
#  - CFLAGS="-fno-wrapv -UNDEBUG": Python's own CFLAGS carry -fwrapv (which turns signed
#    overflow into defined behaviour and so hides every such report) and -DNDEBUG.
#  - -fsanitize=float-cast-overflow: UB, but not part of GCC's -fsanitize=undefined.
#  - FLASHMOE_CUDA=0: this sweep is for the C core; nvcc objects are not instrumented anyway.
#  - halt_on_error=1 for both: the first report ends the process (pytest then shows a crash).
#    ASan reports go to $SAN_LOGS/asan.<pid> (log_path); GCC's UBSan ignores log_path next to
#    ASan and prints to stderr, so pytest runs with --capture=sys (fd 2 stays the log file) and
#    the summary greps every log for "runtime error".
#  - allocator_may_return_null=1: a manifest asking for absurd sizes must get FM_ERR_OOM, not an
#    ASan abort.
#  - No AVX-512 on the dev VM: the AVX-512 kernels are only swept where the CPU has them
#    (san_driver runs every level fm_simd_level_supported() reports).
set -u -o pipefail
# the body is one function, parsed whole before it runs: editing this file during a run is safe
main() {

HEAD_ONLY=0
KEEP=0
RUN_PYTEST=1
RUN_DRIVER=1
RUN_MUTANTS=1
RUN_TSAN=1
PYTEST_ARGS=()
for a in "$@"; do
    case "$a" in
    --head) HEAD_ONLY=1 ;;
    --keep) KEEP=1 ;;
    --no-pytest) RUN_PYTEST=0 ;;
    --no-driver) RUN_DRIVER=0 ;;
    --no-mutants) RUN_MUTANTS=0 ;;
    --no-tsan) RUN_TSAN=0 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) PYTEST_ARGS+=("$a") ;;
    esac
done

SRC=${SAN_SRC:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)} || exit 2
ME=${USER:-$(id -u)}
SAN_DIR=${SAN_DIR:-/tmp/fm-san-$ME}
SAN_LOGS=${SAN_LOGS:-/tmp/fm-san-logs-$ME}
SAN_NICE=${SAN_NICE:-10}
SAN_JOBS=${SAN_JOBS:-2}
N="nice -n $SAN_NICE"
say() { printf '== %s\n' "$*" >&2; }
T0=$(date +%s)

# ---- 1. worktree ---------------------------------------------------------------------------
if [ -e "$SAN_DIR" ]; then
    git -C "$SRC" worktree remove --force "$SAN_DIR" 2>/dev/null || rm -rf "$SAN_DIR"
fi
git -C "$SRC" worktree prune
say "worktree $SAN_DIR at $(git -C "$SRC" rev-parse --short HEAD)"
git -C "$SRC" worktree add --detach -q "$SAN_DIR" HEAD || exit 2
cleanup() {
    if [ "$KEEP" = 0 ]; then
        git -C "$SRC" worktree remove --force "$SAN_DIR" 2>/dev/null || rm -rf "$SAN_DIR"
        git -C "$SRC" worktree prune
    fi
}
if [ "$HEAD_ONLY" = 0 ]; then
    # what is on disk now: modified tracked files and untracked files git does not ignore
    (cd "$SRC" && git ls-files -z -m -o --exclude-standard | tar --null -T - -cf - 2>/dev/null) |
        tar -C "$SAN_DIR" -xf - || { say "copying the working tree failed"; cleanup; exit 2; }
    # files deleted in the checkout but not yet committed
    (cd "$SRC" && git ls-files -z -d) | (cd "$SAN_DIR" && xargs -0 -r rm -f --)
    say "copied $(cd "$SRC" && git ls-files -m -o --exclude-standard | wc -l) uncommitted files"
fi
rm -rf "$SAN_LOGS"
mkdir -p "$SAN_LOGS"
cd "$SAN_DIR" || exit 2

SANFLAGS="-fsanitize=address,undefined -fsanitize=float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer"
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
ASAN_BASE="halt_on_error=1:allocator_may_return_null=1:strict_string_checks=1:check_initialization_order=1${SAN_ASAN_EXTRA:+:$SAN_ASAN_EXTRA}"
UBSAN_BASE="print_stacktrace=1:halt_on_error=1"
STATUS=0

# ---- 2. sanitized extension ----------------------------------------------------------------
EXT_OK=0
say "building the sanitized extension (FLASHMOE_SANITIZE=1; log $SAN_LOGS/build.log)"
if FLASHMOE_SANITIZE=1 FLASHMOE_CUDA=0 CFLAGS="-fno-wrapv -UNDEBUG -fsanitize=float-cast-overflow -fno-sanitize-recover=all" \
    $N python setup.py build_ext --inplace -q >"$SAN_LOGS/build.log" 2>&1; then
    EXT_OK=1
else
    say "extension build FAILED"
    grep -E 'error' "$SAN_LOGS/build.log" | head -n 20 >&2
    STATUS=1
fi
# the uninstrumented Python with the sanitizer runtimes preloaded, leaks off
san_py() {
    PYTHONPATH="$SAN_DIR" LD_PRELOAD="$LIBASAN $LIBUBSAN" \
        ASAN_OPTIONS="$ASAN_BASE:detect_leaks=0:log_path=$SAN_LOGS/asan" \
        UBSAN_OPTIONS="$UBSAN_BASE:log_path=$SAN_LOGS/ubsan" \
        $N python "$@"
}

# ---- 3. C-only driver (leaks on) ------------------------------------------------------------
if [ "$RUN_DRIVER" = 1 ]; then
    say "building tools/san_driver.c"
    mkdir -p build/san
    srcs=(csrc/*.c)
    [ -f csrc/cuda/fm_ref.c ] && srcs+=(csrc/cuda/fm_ref.c)
    [ -f csrc/cuda/fm_cuda_stub.c ] && srcs+=(csrc/cuda/fm_cuda_stub.c)
    srcs+=(tools/san_driver.c)
    DRV_OK=1
    printf '%s\n' "${srcs[@]}" | $N xargs -P "$SAN_JOBS" -I{} sh -c \
        'gcc -std=gnu11 -O1 -g -pthread -D_GNU_SOURCE -Icsrc -Wall -Wno-unused-function -fno-strict-aliasing '"$SANFLAGS"' -c "{}" -o "build/san/$(echo {} | tr / _).o"' \
        >"$SAN_LOGS/driver-build.log" 2>&1 &&
        gcc $SANFLAGS -pthread build/san/*.o -lm -o build/san/san_driver >>"$SAN_LOGS/driver-build.log" 2>&1 || DRV_OK=0
    if [ "$DRV_OK" = 1 ]; then
        MODELS=""
        if [ "$EXT_OK" = 1 ]; then
            say "making tiny model dirs (the converter on the sanitized extension)"
            cat >build/san/make_models.py <<'PYEOF'
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from tiny_models import make_tiny_hf
from pyflashmoe.convert import convert
root = sys.argv[1]
out = []
# bf16 experts; 4-bit experts + 8-bit dense (gs 64 needs moe_intermediate 64); 3-bit gs 32
for arch, bits, gs, dense_bits, over in (("qwen3_5_moe", 16, 64, 16, {}),
                                        ("qwen3_next", 4, 64, 8, {"moe_intermediate_size": 64}),
                                        ("qwen3_moe", 3, 32, 16, {})):
    hf, _ = make_tiny_hf(arch, os.path.join(root, arch + "-hf"), seed=0, **over)
    out.append(convert(hf, os.path.join(root, f"{arch}-b{bits}"), bits=bits, group_size=gs,
                       dense_bits=dense_bits, progress=False))
print(" ".join(out))
PYEOF
            MODELS=$(san_py build/san/make_models.py "$SAN_DIR/build/san/models" 2>"$SAN_LOGS/models.log") ||
                { say "model dirs could not be made (see $SAN_LOGS/models.log)"; MODELS=""; STATUS=1; }
        fi
        say "running san_driver (detect_leaks=1) on: ${MODELS:-no model dirs}"
        # shellcheck disable=SC2086
        ASAN_OPTIONS="$ASAN_BASE:detect_leaks=1:detect_stack_use_after_return=1:log_path=$SAN_LOGS/asan" \
            UBSAN_OPTIONS="$UBSAN_BASE:log_path=$SAN_LOGS/ubsan" \
            $N build/san/san_driver $MODELS >"$SAN_LOGS/driver.log" 2>&1
        rc=$?
        tail -n 1 "$SAN_LOGS/driver.log" >&2
        [ $rc = 0 ] || { say "san_driver exit $rc (log $SAN_LOGS/driver.log)"; STATUS=1; }
        if [ "$RUN_MUTANTS" = 1 ] && [ -n "$MODELS" ]; then
            mkdir -p "$SAN_LOGS/mutants"
            : >build/san/mutants.txt
            for md in $MODELS; do
                python tools/san_mutants.py "$md" "build/san/mutants/$(basename "$md")" >>build/san/mutants.txt ||
                    { say "san_mutants.py failed on $md"; STATUS=1; }
            done
            say "running san_driver --mutant on $(wc -l <build/san/mutants.txt) malformed model dirs"
            nbad=0
            while read -r d; do
                tag="$(basename "$(dirname "$d")")-$(basename "$d")"
                ASAN_OPTIONS="$ASAN_BASE:detect_leaks=1:log_path=$SAN_LOGS/asan.mutant-$tag" \
                    UBSAN_OPTIONS="$UBSAN_BASE" \
                    $N timeout 120 build/san/san_driver --mutant "$d" >"$SAN_LOGS/mutants/$tag.log" 2>&1
                rc=$?
                if [ $rc = 0 ] && ! grep -q 'runtime error' "$SAN_LOGS/mutants/$tag.log"; then
                    rm -f "$SAN_LOGS/mutants/$tag.log"
                else
                    echo "mutation: $(cat "$d/MUTATION") (exit $rc)" >>"$SAN_LOGS/mutants/$tag.log"
                    nbad=$((nbad + 1))
                fi
            done <build/san/mutants.txt
            say "mutants with a report or a bad exit: $nbad (logs kept in $SAN_LOGS/mutants)"
            [ $nbad = 0 ] || STATUS=1
        fi
        if [ "$RUN_TSAN" = 1 ]; then
            say "ThreadSanitizer build of san_driver"
            if $N gcc -std=gnu11 -O1 -g -pthread -D_GNU_SOURCE -Icsrc -Wno-comment -fsanitize=thread "${srcs[@]}" -lm \
                -o build/san/san_driver_tsan >"$SAN_LOGS/tsan-build.log" 2>&1; then
                # shellcheck disable=SC2086
                TSAN_OPTIONS="halt_on_error=0:log_path=$SAN_LOGS/tsan" $N build/san/san_driver_tsan $MODELS \
                    >"$SAN_LOGS/tsan.log" 2>&1 || { say "tsan driver exit $? (log $SAN_LOGS/tsan.log)"; STATUS=1; }
                tail -n 1 "$SAN_LOGS/tsan.log" >&2
            else
                say "tsan build FAILED (log $SAN_LOGS/tsan-build.log)"
                STATUS=1
            fi
        fi
    else
        say "driver build FAILED (log $SAN_LOGS/driver-build.log)"
        grep -E 'error' "$SAN_LOGS/driver-build.log" | head -n 20 >&2
        STATUS=1
    fi
fi

# ---- 4. pytest on the sanitized extension ---------------------------------------------------
if [ "$RUN_PYTEST" = 1 ] && [ "$EXT_OK" = 1 ]; then
    if [ ${#PYTEST_ARGS[@]} = 0 ]; then
        # the files that reach _core; the Python-only ones (tokenizer, sampling, server, toolcalls)
        # add minutes, not C coverage
        for t in test_quant test_io test_format test_engine test_generate test_models test_convert test_synth; do
            [ -f "tests/$t.py" ] && PYTEST_ARGS+=("tests/$t.py")
        done
        # ASan's shadow memory and quarantine (the child process inherits LD_PRELOAD) inflate the
        # peak RSS this test bounds: a sanitizer artefact, not a finding
        [ -f tests/test_synth.py ] && PYTEST_ARGS+=(--deselect tests/test_synth.py::test_bounded_rss_on_a_cut_preset)
    fi
    say "pytest ${PYTEST_ARGS[*]} (log $SAN_LOGS/pytest.log)"
    san_py -m pytest -q -p no:cacheprovider --capture=sys "${PYTEST_ARGS[@]}" >"$SAN_LOGS/pytest.log" 2>&1
    rc=$?
    tail -n 1 "$SAN_LOGS/pytest.log" >&2
    [ $rc = 0 ] || { say "pytest exit $rc"; STATUS=1; }
fi

# ---- 5. summary ------------------------------------------------------------------------------
echo
echo "==================== sanitizer summary ($(($(date +%s) - T0)) s) ===================="
[ -f "$SAN_LOGS/driver.log" ] && echo "driver (ASan+UBSan+LSan): $(tail -n 1 "$SAN_LOGS/driver.log")"
[ -f "$SAN_LOGS/tsan.log" ] && echo "driver (TSan):            $(tail -n 1 "$SAN_LOGS/tsan.log")"
[ -f "$SAN_LOGS/pytest.log" ] && echo "pytest (sanitized _core): $(tail -n 1 "$SAN_LOGS/pytest.log")"
# one line per distinct finding: the report's first line and its first frame in our sources
findings=$(
    for f in "$SAN_LOGS"/asan.* "$SAN_LOGS"/tsan.* "$SAN_LOGS"/driver.log "$SAN_LOGS"/pytest.log "$SAN_LOGS"/models.log "$SAN_LOGS"/mutants/*.log; do
        [ -f "$f" ] || continue
        grep -q -E 'ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|runtime error' "$f" || continue
        awk -v src="$(basename "$f")" '
            /runtime error|ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer/ && !what {
                what = $0; sub(/^.*(csrc|tools)\//, "", what); sub(/^==[0-9]+==/, "", what)
                sub(/runtime error: [^ ]+ is outside/, "runtime error: <value> is outside", what); next }
            what && !frame && /#[0-9]+ .*(csrc|tools)\// {
                frame = $0; sub(/^ *#[0-9]+ (0x[0-9a-f]+ in )?/, "", frame)
                sub(/ \(.*$/, "", frame) }
            what && frame { print substr(what, 1, 160) "  @ " frame "  [" src "]"; what = ""; frame = "" }
            END { if (what) print substr(what, 1, 160) "  [" src "]" }' "$f"
    done | sort -t'[' -k1,1 -u
)
if [ -n "$findings" ]; then
    STATUS=1
    echo "sanitizer findings (distinct, first frame in our code; example log in brackets):"
    echo "$findings" | sed 's/^/  /'
else
    echo "sanitizer findings: none"
fi
echo "logs: $SAN_LOGS"
cleanup
echo "RESULT: $([ $STATUS = 0 ] && echo CLEAN || echo 'FINDINGS OR FAILURES (see above)')"
exit $STATUS
}
main "$@"
exit $?
