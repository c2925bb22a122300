"""GB/s of weight bytes the 4-bit and bf16 matvec stream, by thread count, next to this machine's
memory bandwidth measured in the same run (a large numpy copy, single- and multi-threaded).

    python bench/matvec_bandwidth.py [--mb 256] [--repeats 7] [--threads 1,2,4] [--json out.json]

Weight matrices are sized well past the last-level cache (--mb each) so every call streams them
from DRAM. Each measurement is repeated; the table shows the median and the min..max spread.
Prints a markdown table (plus the machine, the command and the commit) for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyflashmoe import quant  # noqa: E402


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, SIMD {quant.simd_name()}"


def commit() -> str:
    try:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        h = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "csrc", "pyflashmoe"],
                               capture_output=True, text=True).stdout.strip()
        return h + ("+dirty" if dirty else "") if h else "unknown"
    except OSError:
        return "unknown"


def timed(fn, repeats: int, inner: int = 1) -> list[float]:
    fn()  # warm-up (page faults, thread start)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t) / inner)
    return out


def fmt(nbytes: float, ts: list[float]) -> str:
    rates = sorted(nbytes / t / 1e9 for t in ts)
    return f"{statistics.median(rates):.1f} ({rates[0]:.1f}..{rates[-1]:.1f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="weight megabytes per matrix (default 256)")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="", help="comma list (default 1..nproc)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    ncpu = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, ncpu + 1))
    cols = args.cols
    rng = np.random.default_rng(0)

    # memory bandwidth: a large copy (bytes read + bytes written per second)
    nbytes = args.mb << 20
    src = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy()
    dst = np.empty_like(src)
    copy1 = timed(lambda: np.copyto(dst, src), args.repeats)

    def copy_mt(nt):
        step = (nbytes + nt - 1) // nt

        def part(i):
            np.copyto(dst[i * step:(i + 1) * step], src[i * step:(i + 1) * step])

        with concurrent.futures.ThreadPoolExecutor(nt) as ex:
            return timed(lambda: list(ex.map(part, range(nt))), args.repeats)

    # weights: 4-bit (group 64) and bf16, each about --mb MiB
    rows4 = max(64, nbytes // (cols // 2 + cols // 64 * 4))
    rowsb = max(64, nbytes // (cols * 2))
    wq = rng.integers(0, 2 ** 32, (rows4, cols // 8), dtype=np.uint32)
    sc = quant.f32_to_bf16(rng.uniform(0.001, 0.01, (rows4, cols // 64)))
    bi = quant.f32_to_bf16(rng.uniform(-0.05, 0.0, (rows4, cols // 64)))
    m4 = quant.QMatrix("affine", rows4, cols, q=wq, scales=sc, biases=bi, bits=4, group_size=64)
    mb = quant.QMatrix("bf16", rowsb, cols, data=rng.integers(0, 2 ** 16, (rowsb, cols), dtype=np.uint16) & 0xBFFF)
    x = rng.standard_normal(cols).astype(np.float32)

    results = {"machine": machine(), "commit": commit(), "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
               "cols": cols, "rows_q4": rows4, "rows_bf16": rowsb, "rows": []}
    print(f"machine: {results['machine']}\ncommit: {results['commit']}\n")
    print(f"weights: q4 {rows4}x{cols} ({m4.nbytes / 2**20:.0f} MiB incl. scales/biases), "
          f"bf16 {rowsb}x{cols} ({mb.nbytes / 2**20:.0f} MiB); median (min..max) of {args.repeats}\n")
    print("| threads | memcpy GB/s (read+write) | q4 matvec GB/s | bf16 matvec GB/s |")
    print("|---|---|---|---|")
    for nt in threads:
        pool = quant.Pool(nt)
        cp = copy1 if nt == 1 else copy_mt(nt)
        t4 = timed(lambda: m4.matvec(x, pool=pool), args.repeats)
        tb = timed(lambda: mb.matvec(x, pool=pool), args.repeats)
        row = {"threads": nt, "copy": [2 * nbytes / t / 1e9 for t in cp],
               "q4": [m4.nbytes / t / 1e9 for t in t4], "bf16": [mb.nbytes / t / 1e9 for t in tb]}
        results["rows"].append(row)
        print(f"| {nt} | {fmt(2 * nbytes, cp)} | {fmt(m4.nbytes, t4)} | {fmt(mb.nbytes, tb)} |", flush=True)
    # single thread, by SIMD path (FM_SIMD-style forcing through the test hook)
    print("\n| SIMD path (1 thread) | q4 matvec GB/s | bf16 matvec GB/s |")
    print("|---|---|---|")
    results["levels"] = {}
    for lv in quant.simd_levels():
        reps = max(3, args.repeats // 2)
        t4 = timed(lambda: m4.matvec(x, level=lv), reps)
        tb = timed(lambda: mb.matvec(x, level=lv), reps)
        results["levels"][lv] = {"q4": [m4.nbytes / t / 1e9 for t in t4], "bf16": [mb.nbytes / t / 1e9 for t in tb]}
        print(f"| {lv} | {fmt(m4.nbytes, t4)} | {fmt(mb.nbytes, tb)} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
