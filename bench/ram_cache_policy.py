#!/usr/bin/env python3
"""Engine RAM cache (csrc/fm_io.c, `ram_budget`) on real text: hit rate and decode speed.

    python bench/ram_cache_policy.py --dir pyflashmoe/demo/model \\
        --text demo_out/corpus/heldout.txt --text demo_out/corpus/heldout_chat.txt --json out.json

For each text, --tokens tokens from the middle of its first --max-tokens are fed to the engine one
token per eval (decode order: every layer in a cycle, each layer's K experts as one fm_io_submit),
sessions of --seq tokens (reset between them; the cache belongs to the Engine and persists), one
fresh Engine per run and per budget. ram_budget = round(frac x n_layers x n_experts) blocks of the
largest block size. Hit rate = expert_hits / (expert_hits + expert_loads) from Session.stats
(counted from a cold cache); decode tok/s = tokens / wall time of the eval loop. Medians over
--repeat runs. Results: bench/RESULTS.md "Demo model: routing", docs/ROUTING.md.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(ROOT, "pyflashmoe", "demo", "model"))
    ap.add_argument("--text", action="append", required=True)
    ap.add_argument("--max-tokens", type=int, default=40960)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--frac", type=float, action="append", default=None, help="default 0.1 0.3 0.5")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from routing_study import tokenize
    from pyflashmoe import _core as core
    probe = core.Engine(a.dir, n_threads=a.threads)
    L, E = probe.n_layers, probe.n_experts
    bb = max(probe.expert_block_bytes(il) for il in range(L))
    del probe
    out = {"dir": a.dir, "tokens": a.tokens, "seq": a.seq, "rows": []}
    for path in a.text:
        ids = tokenize(a.dir, path)[:a.max_tokens]
        half = len(ids) // 2
        toks = [int(t) for t in ids[half:half + a.tokens]]
        for frac in a.frac or (0.1, 0.3, 0.5):
            cap = int(round(frac * L * E))
            rates, tps = [], []
            for _ in range(a.repeat):
                eng = core.Engine(a.dir, n_threads=a.threads, ram_budget=cap * bb)
                ses = core.Session(eng, a.seq)
                hits = loads = 0
                t0 = time.perf_counter()
                for i, t in enumerate(toks):
                    if i % a.seq == 0:
                        if i:
                            s = ses.stats()
                            hits += s["expert_hits"]
                            loads += s["expert_loads"]
                        ses.reset()
                        ses.reset_stats()
                    ses.eval([t])
                dt = time.perf_counter() - t0
                s = ses.stats()
                hits += s["expert_hits"]
                loads += s["expert_loads"]
                rates.append(hits / max(1, hits + loads))
                tps.append(len(toks) / dt)
                del ses, eng
            row = {"text": os.path.basename(path), "frac": frac, "blocks": cap, "of": L * E,
                   "hit_rate": statistics.median(rates), "decode_tps": statistics.median(tps), "tps_runs": tps}
            out["rows"].append(row)
            print(f"{row['text']} {frac:.0%} ({cap}/{L * E} blocks): hit {100 * row['hit_rate']:.1f}%, decode "
                  f"{row['decode_tps']:.1f} tok/s (runs {', '.join(f'{x:.0f}' for x in tps)})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
