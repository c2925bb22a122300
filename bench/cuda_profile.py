"""Per-kernel device time of CUDA decode steps (bench/RESULTS.md "CUDA (H100)": where the time goes).

  ncu --clock-control none --profile-from-start off --csv --page raw --print-units base \\
      --metrics gpu__time_duration.sum python3 bench/cuda_profile.py run DIR [--budget GiB] > raw.csv
  python3 bench/cuda_profile.py summarize raw.csv [--steps N]

`run` opens DIR on the CUDA backend (every expert resident in VRAM unless --budget is given), evaluates
a 16-token prompt, then decodes --steps greedy tokens with plain launches (debug cuda_graph=0, so the
profiler sees each kernel) between cuProfilerStart/Stop (driver API through ctypes), so only those
steps are profiled. `summarize` groups ncu's per-kernel durations by kernel name (template
arguments kept) and prints microseconds per decode step, largest first.
"""
import argparse
import csv
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def cmd_run(a):
    import numpy as np
    from pyflashmoe import _core as core
    kw = {}
    if a.budget:
        kw = {"vram_budget": int(a.budget * (1 << 30)), "ram_budget": 1 << 40}
    eng = core.Engine(a.dir, backend=1, io_threads=16, debug={"cuda_graph": 0}, **kw)
    ses = core.Session(eng, 256)
    prompt = np.arange(100, 116, dtype=np.int32)
    tok = int(np.argmax(ses.eval(prompt)))
    for _ in range(4):  # warm-up: caches filled, first-use costs paid
        tok = int(np.argmax(ses.eval([tok])))
    import ctypes
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        cu = None
        print(f"no libcuda for cuProfilerStart ({e}): profiling everything", file=sys.stderr)
    if cu is not None:
        cu.cuProfilerStart()
    for _ in range(a.steps):
        tok = int(np.argmax(ses.eval([tok])))
    if cu is not None:
        cu.cuProfilerStop()
    print(f"decoded {a.steps} tokens", file=sys.stderr)


def cmd_summarize(a):
    rows = []
    with open(a.csv, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rd = csv.DictReader(lines)
    for r in rd:
        name = r.get("Kernel Name") or r.get("Function Name") or ""
        v = r.get("gpu__time_duration.sum", "")
        try:
            us = float(v.replace(",", "")) / 1e3  # ncu reports ns
        except ValueError:
            continue
        rows.append((re.sub(r"\(.*$", "", name), us))
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for n, us in rows:
        tot[n] += us
        cnt[n] += 1
    s = a.steps
    print(f"{len(rows)} kernels, {sum(tot.values()) / s:.1f} us of kernel time per decode step ({s} steps)")
    for n, t in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"  {t / s:9.1f} us/step  {cnt[n] / s:6.1f} launches/step  {t / cnt[n]:8.2f} us each  {n}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["run", "summarize"])
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.0)
    a = ap.parse_args()
    if a.cmd == "run":
        a.dir = a.path
        cmd_run(a)
    else:
        a.csv = a.path
        cmd_summarize(a)


if __name__ == "__main__":
    main()
