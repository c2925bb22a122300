"""Cold decode with speculative expert prefetch off vs on, side by side in one run.

    python bench/prefetch_ab.py MODEL_DIR [--tokens 8] [--prompt-tokens 4] [--repeat 3] [--threads 2]

Two Engines on the same model dir (prefetch=False / prefetch=True). Each repeat runs both modes
(order alternating between repeats, so drift and background load hit them alike); before each
mode's run the expert files are dropped from the page cache (posix_fadvise DONTNEED), then a
prompt of --prompt-tokens random tokens is prefilled and --tokens tokens are decoded greedily.
Reports decode ms/token (median and min..max over repeats), the per-phase split, bytes read from
disk per decode token (/proc/self/io), and the prefetch stats (blocks prefetched, how many the real
routing used). Both modes must produce bit-identical logits (prefetch only touches the page cache):
the script fails if they differ.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from pyflashmoe import _core


def expert_files(model: str) -> list[str]:
    d = os.path.join(model, "experts")
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def drop(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def run_once(eng, prompt, n_tokens, n_ctx):
    s = _core.Session(eng, n_ctx)
    logits = s.eval(prompt)
    out = [np.array(logits, copy=True)]
    s.reset_stats()
    tok = int(np.argmax(logits))
    r0 = disk_read_bytes()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = s.eval(np.array([tok], dtype=np.int32))
        out.append(np.array(logits, copy=True))
        tok = int(np.argmax(logits))
    dt = time.perf_counter() - t0
    disk = disk_read_bytes() - r0
    st = s.stats()
    return out, dt * 1e3 / n_tokens, disk / n_tokens, st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefetch", type=int, default=1,
                    help="fm_model_params.prefetch of the 'on' engine (1: default depth, n >= 2: top n)")
    ap.add_argument("--json", help="write the raw results here")
    a = ap.parse_args(argv)

    files = expert_files(a.model)
    engs = {m: _core.Engine(a.model, n_threads=a.threads, prefetch=(a.prefetch if m == "on" else 0)) for m in ("off", "on")}
    vocab = engs["off"].n_vocab
    rng = np.random.default_rng(a.seed)
    prompt = rng.integers(0, vocab, size=a.prompt_tokens).astype(np.int32)
    n_ctx = a.prompt_tokens + a.tokens + 1
    res = {m: [] for m in engs}
    ref = None
    for r in range(a.repeat):
        for m in (("off", "on") if r % 2 == 0 else ("on", "off")):
            drop(files)
            out, ms, disk, st = run_once(engs[m], prompt, a.tokens, n_ctx)
            if ref is None:
                ref = out
            else:
                for i, (x, y) in enumerate(zip(ref, out)):
                    if not np.array_equal(x, y):
                        print(f"FAIL: logits of step {i} differ (mode {m}, repeat {r})", file=sys.stderr)
                        return 1
            n = a.tokens
            row = {"repeat": r, "ms_token": ms, "disk_mb_token": disk / 1e6,
                   **{k: st[k] / n for k in ("ms_attn", "ms_route", "ms_io_wait", "ms_expert", "ms_other")},
                   "prefetch_blocks": st["prefetch_blocks"], "prefetch_used": st["prefetch_used"],
                   "engine_mb_token": st["bytes_read"] / n / 1e6,
                   "load": os.getloadavg()[0]}
            res[m].append(row)
            print(f"repeat {r} prefetch {m:3s}: {ms:7.1f} ms/token  attn {row['ms_attn']:.0f} route "
                  f"{row['ms_route']:.1f} io_wait {row['ms_io_wait']:.0f} expert {row['ms_expert']:.0f} "
                  f"other {row['ms_other']:.0f}  disk {row['disk_mb_token']:.0f} MB/tok  prefetched "
                  f"{st['prefetch_blocks']} used {st['prefetch_used']}  load {row['load']:.1f}", flush=True)
    print("\n| prefetch | decode ms/token median (min..max) | tok/s | attn | route | I/O wait | experts | other "
          "| disk MB/token | prefetched blocks/token | used by routing |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, rows in res.items():
        ms = [x["ms_token"] for x in rows]
        med = statistics.median(ms)
        def mp(k):
            return statistics.median(x[k] for x in rows)
        pb = sum(x["prefetch_blocks"] for x in rows)
        pu = sum(x["prefetch_used"] for x in rows)
        hit = f"{pu}/{pb} = {100 * pu / pb:.0f}%" if pb else "-"
        print(f"| {m} | {med:.0f} ({min(ms):.0f}..{max(ms):.0f}) | {1e3 / med:.3f} | {mp('ms_attn'):.0f} | "
              f"{mp('ms_route'):.1f} | {mp('ms_io_wait'):.0f} | {mp('ms_expert'):.0f} | {mp('ms_other'):.0f} | "
              f"{mp('disk_mb_token'):.0f} | {pb / (len(rows) * a.tokens):.1f} | {hit} |")
    print("logits bit-identical with prefetch off and on: yes")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
