"""CUDA backend benchmarks (bench/RESULTS.md "CUDA (H100)"): decode tok/s and ms per layer.

  python bench/cuda_bench.py resident DIR [--tokens N]         (a) every expert in VRAM
  python bench/cuda_bench.py tiers DIR --budgets 8,16,32 [--scale-layers 60] [--tokens N]
                                                               (b) experts in pinned host RAM,
                                                               VRAM cache of each budget
                                                               [--splits 0,auto] cpu_split settings
                                                               (debug switch) run on each engine
  python bench/cuda_bench.py bw                                pinned H2D and D2D bandwidth
  python bench/cuda_bench.py prefill DIR [--lens 64,256,1024]  prompt tok/s, every expert in VRAM, the
                                                               tensor-core prefill kernels (cuda_mma=1)
                                                               and the fp32 ones (cuda_mma=0) side by side
  python bench/cuda_bench.py gdn DIR [--lens 2,4,8,16,32,64]   prompt tok/s with the chunked GatedDeltaNet
                                                               (gdn_chunk=2) and the sequential kernel
                                                               (gdn_chunk=0): where to put gdn_chunk's default

Model dirs come from `flashmoe synth` (pyflashmoe/synth.py: random weights at real dimensions).
Decode timing: a 16-token prompt, `--warmup` greedy decode steps (fill the caches), then `--tokens`
timed steps; per step the wall time of Session.eval (one host sync at the end: the logits).
Switches (csrc/fm.h fm_debug_params) are set on the engine between runs with Engine.set_debug.
--scale-layers L: the model dir has fewer layers than the real model (disk); the VRAM budget is
scaled by (layers in dir / L) so the cache holds the same share of the experts as the full model
would, and the hit rate (uniform random routing: ~ slots / experts) is the one of the full model.
Roofline numbers: bytes a decode step must move (every dense matrix but the embedding table, K
expert blocks per MoE layer, the recurrent state read + written, KV cache read) over the measured
device-to-device bandwidth; for tiers, expert bytes copied over the measured pinned H2D bandwidth.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyflashmoe import _core as core  # noqa: E402


def manifest(d):
    with open(os.path.join(d, "pyflashmoe.json")) as f:
        return json.load(f)


def step_bytes(man, k, n_ctx_used=32):
    """bytes one decode token must read (+ write for the recurrent state)."""
    spec = man["spec"]
    dense = 0
    for name, t in man["tensors"].items():
        if name == "tok_embd" and not spec.get("tie_word_embeddings"):
            continue
        if "nbytes" in t:
            dense += int(t["nbytes"])
        else:
            dense += sum(int(t[p][1]) for p in ("q", "scales", "biases") if p in t)
    layers = man["experts"]["layers"]
    experts = sum(int(v["block_bytes"]) * k for v in layers.values())
    kinds = [l["attn"] for l in spec["layers"]]
    n_lin = kinds.count("linear")
    n_full = kinds.count("full")
    state = n_lin * 2 * 4 * spec["linear_n_v_heads"] * spec["linear_k_dim"] * spec["linear_v_dim"]
    kv = n_full * 2 * 4 * spec["n_kv_heads"] * spec["head_dim"] * n_ctx_used
    return dense, experts, state + kv


def decode_run(eng, n_tok, warmup, n_ctx=512):
    ses = core.Session(eng, n_ctx)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, min(eng.n_vocab, 150000), size=16).astype(np.int32)
    t0 = time.perf_counter()
    lg = ses.eval(prompt)
    t_prefill = time.perf_counter() - t0
    tok = int(np.argmax(lg))
    for _ in range(warmup):
        tok = int(np.argmax(ses.eval([tok])))
    c0 = core.cuda_counters(ses) if hasattr(core, "cuda_counters") else {}
    s0 = ses.stats()
    times = []
    for _ in range(n_tok):
        t = time.perf_counter()
        lg = ses.eval([tok])
        times.append(time.perf_counter() - t)
        tok = int(np.argmax(lg))
    c1 = core.cuda_counters(ses) if hasattr(core, "cuda_counters") else {}
    s1 = ses.stats()
    keys = ("syncs", "h2d_bytes", "vram_hits", "ram_hits", "storage_reads", "cpu_experts", "cpu_layers", "cpu_ms")
    d = {k: c1[k] - c0[k] for k in keys if k in c1} if c0 else {}
    d = {k: v / n_tok for k, v in d.items()}
    if c0 and c1.get("head_evals", 0) > c0.get("head_evals", 0):  # device ms of final norm + lm_head per token
        d["head_ms"] = (c1["head_ms"] - c0["head_ms"]) / (c1["head_evals"] - c0["head_evals"])
    for k in ("h2d_gbps", "cpu_gbps", "split"):  # the engine's measured rates (EMA over layers) after the run
        if k in c1:
            d[k] = c1[k]
    d["io_wait_ms"] = (s1["ms_io_wait"] - s0["ms_io_wait"]) / n_tok
    times = np.array(times) * 1e3
    # breakdown: the same decode with a host sync after every op (cuda_timing=1; slower overall)
    eng.set_debug(cuda_timing=1)
    s0 = ses.stats()
    nb = 16
    for _ in range(nb):
        tok = int(np.argmax(ses.eval([tok])))
    s1 = ses.stats()
    eng.set_debug(cuda_timing=0)
    d["breakdown_ms"] = {k: (s1[k] - s0[k]) / nb for k in ("ms_total", "ms_attn", "ms_expert", "ms_other", "ms_io_wait")}
    return {"prefill_s": t_prefill, "ms_median": float(np.median(times)), "ms_mean": float(times.mean()),
            "ms_p90": float(np.percentile(times, 90)), "tok_s": 1e3 / float(np.median(times)),
            "per_token": d, "finite": bool(np.isfinite(lg).all())}


def cmd_bw(a):
    h2d = core.cuda_h2d_bandwidth(1 << 30, 10)
    d2d = core.cuda_d2d_bandwidth(1 << 31, 10)
    print(json.dumps({"device": core.cuda_describe(), "h2d_pinned_GBps": h2d, "d2d_GBps": d2d}))
    return h2d, d2d


def cmd_resident(a):
    h2d, d2d = cmd_bw(a)
    man = manifest(a.dir)
    t0 = time.perf_counter()
    eng = core.Engine(a.dir, backend=1, io_threads=16)
    t_open = time.perf_counter() - t0
    k = eng.experts_per_token
    r = decode_run(eng, a.tokens, a.warmup)
    dense, experts, state = step_bytes(man, k)
    total = dense + experts + state
    floor_ms = total / (d2d * 1e9) * 1e3
    out = {"case": "resident", "dir": a.dir, "layers": eng.n_layers, "K": k, "open_s": t_open,
           "bytes_per_token": {"dense": dense, "experts": experts, "state_kv": state, "total": total},
           "hbm_floor_ms": floor_ms, "roofline_tok_s": 1e3 / floor_ms, **r,
           "achieved_frac_of_roofline": floor_ms / r["ms_median"], "d2d_GBps": d2d}
    print(json.dumps(out))
    print(f"RESIDENT {eng.n_layers} layers K={k}: {r['tok_s']:.1f} tok/s (median {r['ms_median']:.3f} ms/token), "
          f"HBM roofline {1e3 / floor_ms:.0f} tok/s ({total / 1e9:.2f} GB/token at {d2d:.0f} GB/s) -> "
          f"{100 * floor_ms / r['ms_median']:.0f}% ; syncs/token {r['per_token'].get('syncs', 0):.2f}")
    print("  breakdown with a sync per op (ms/token):", {k: round(v, 3) for k, v in r["per_token"]["breakdown_ms"].items()})
    eng.set_debug(cuda_graph=0)
    r0 = decode_run(eng, a.tokens, a.warmup)
    eng.set_debug(cuda_graph=1)
    print(f"  without the CUDA graph (plain launches): {r0['tok_s']:.1f} tok/s ({r0['ms_median']:.3f} ms/token)")
    print(json.dumps({"case": "resident_no_graph", "tok_s": r0["tok_s"], "ms_median": r0["ms_median"]}))


def prefill_run(eng, n, reps=3):
    """median wall time of Session.eval over an n-token prompt (fresh session each run, one warm-up run
    first); Session.eval returns after the logits are on the host."""
    rng = np.random.default_rng(n)
    prompt = rng.integers(10, min(eng.n_vocab, 150000), size=n).astype(np.int32)
    times, finite = [], True
    for i in range(reps + 1):
        ses = core.Session(eng, n + 8)
        t = time.perf_counter()
        lg = ses.eval(prompt)
        dt = time.perf_counter() - t
        finite = finite and bool(np.isfinite(lg).all())
        if i:
            times.append(dt)
        del ses
    ms = float(np.median(times)) * 1e3
    return {"ms_median": ms, "tok_s": n / ms * 1e3, "ms_all": [t * 1e3 for t in times], "finite": finite}


def cmd_prefill(a):
    eng = core.Engine(a.dir, backend=1, io_threads=16)
    lens = [int(v) for v in a.lens.split(",") if v.strip()]
    for n in lens:
        row = {"case": "prefill", "dir": a.dir, "layers": eng.n_layers, "tokens": n}
        for mma in (1, 0):
            eng.set_debug(cuda_mma=mma)
            row["mma" if mma else "fp32"] = prefill_run(eng, n, a.reps)
        eng.set_debug(cuda_mma=1)
        row["speedup"] = row["mma"]["tok_s"] / row["fp32"]["tok_s"]
        print(json.dumps(row))
        print(f"PREFILL {n} tokens: tensor cores {row['mma']['tok_s']:.0f} tok/s "
              f"({row['mma']['ms_median']:.1f} ms), fp32 kernels {row['fp32']['tok_s']:.0f} tok/s "
              f"({row['fp32']['ms_median']:.1f} ms): x{row['speedup']:.2f}")


def cmd_gdn(a):
    """prompt tok/s per length with the chunked GatedDeltaNet from 2 tokens on (gdn_chunk=2) and with the
    sequential kernel (gdn_chunk=0), every expert in VRAM: gdn_chunk's default belongs at the first
    length from which the chunked form stays faster."""
    eng = core.Engine(a.dir, backend=1, io_threads=16)
    lens = [int(v) for v in a.lens.split(",") if v.strip()]
    for n in lens:
        row = {"case": "gdn_chunk", "dir": a.dir, "layers": eng.n_layers, "tokens": n}
        for g in (2, 0):
            eng.set_debug(gdn_chunk=g)
            row["chunked" if g else "sequential"] = prefill_run(eng, n, a.reps)
        eng.set_debug(gdn_chunk=2)
        row["speedup"] = row["chunked"]["tok_s"] / row["sequential"]["tok_s"]
        print(json.dumps(row))
        print(f"GDN {n} tokens: chunked {row['chunked']['ms_median']:.2f} ms, sequential "
              f"{row['sequential']['ms_median']:.2f} ms: x{row['speedup']:.2f}")


def cmd_tiers(a):
    h2d, d2d = cmd_bw(a)
    man = manifest(a.dir)
    n_layers = len(man["spec"]["layers"])
    scale = n_layers / a.scale_layers if a.scale_layers else 1.0
    total_experts = sum(int(v["block_bytes"]) * int(v["n_experts"]) for v in man["experts"]["layers"].values())
    rows = []
    for gb in [float(x) for x in a.budgets.split(",")]:
        budget = int(gb * (1 << 30) * scale)
        t0 = time.perf_counter()
        eng = core.Engine(a.dir, backend=1, io_threads=16, vram_budget=budget, ram_budget=total_experts + (1 << 30))
        t_open = time.perf_counter() - t0
        for sp in a.splits.split(","):
            eng.set_debug(cpu_split="auto" if sp == "auto" else float(sp))
            rows.append(tiers_row(a, eng, gb, budget, scale, t_open, n_layers, h2d, sp))
        del eng
    if a.resident_too:
        eng = core.Engine(a.dir, backend=1, io_threads=16)
        r = decode_run(eng, a.tokens, a.warmup)
        print(f"TIERS all-resident floor: {r['ms_median'] / n_layers:.3f} ms/layer "
              f"(syncs/token {r['per_token'].get('syncs', 0):.1f})", r["per_token"]["breakdown_ms"])
        print(json.dumps({"case": "tiers_resident_floor", "ms_per_layer": r["ms_median"] / n_layers, **r}))


def tiers_row(a, eng, gb, budget, scale, t_open, n_layers, h2d, sp):
    if True:
        k = eng.experts_per_token
        bb = eng.expert_block_bytes(0)
        r = decode_run(eng, a.tokens, a.warmup)
        pt = r["per_token"]
        # the per-token head (final norm + lm_head over the 248k vocab, ~1 GB at 8-bit) is paid once per
        # token, not per layer: take its measured device time out before dividing by the layer count
        head = pt.get("head_ms", 0.0)
        per_layer = (r["ms_median"] - head) / n_layers
        routed = k * n_layers
        hit = pt.get("vram_hits", 0) / routed
        pcie_ms_layer = pt.get("h2d_bytes", 0) / n_layers / (h2d * 1e9) * 1e3
        row = {"case": "tiers", "cpu_split": sp, "vram_budget_GiB_full_model": gb, "vram_budget_bytes_here": budget,
               "open_s": t_open, "ms_per_layer": per_layer, "vram_hit_rate": hit,
               "h2d_MB_per_layer": pt.get("h2d_bytes", 0) / n_layers / 1e6, "pcie_floor_ms_per_layer": pcie_ms_layer,
               "pcie_frac": pcie_ms_layer / per_layer if per_layer else 0, "h2d_GBps": h2d,
               "head_ms": head, "ms_per_layer_incl_head": r["ms_median"] / n_layers,
               "tok_s_full_model": 1e3 / (per_layer * a.scale_layers + head) if a.scale_layers else r["tok_s"], **r}
        print(json.dumps(row))
        print(f"TIERS split={sp} vram {gb:g} GiB (x{scale:.3f} -> {budget / 2**30:.2f} GiB here): {per_layer:.3f} ms/layer, "
              f"VRAM hit {100 * hit:.1f}%, {row['h2d_MB_per_layer']:.1f} MB/layer over PCIe "
              f"(floor {pcie_ms_layer:.3f} ms at {h2d:.1f} GB/s, {100 * row['pcie_frac']:.0f}%), "
              f"syncs/token {pt.get('syncs', 0):.1f}, io wait {pt['io_wait_ms']:.2f} ms/token, block {bb / 2**20:.2f} MiB; "
              f"head (final norm + lm_head) {head:.3f} ms/token, {r['ms_median'] / n_layers:.3f} ms/layer with it; "
              f"{row['tok_s_full_model']:.1f} tok/s at {a.scale_layers or n_layers} layers")
        print(f"  CPU split: {pt.get('cpu_experts', 0) / n_layers:.2f} experts/layer on the CPU "
              f"({pt.get('cpu_ms', 0) / n_layers:.3f} ms/layer), engine-measured PCIe {pt.get('h2d_gbps', 0):.1f} GB/s, "
              f"CPU expert matvec {pt.get('cpu_gbps', 0):.1f} GB/s")
        print("  breakdown with a sync per op (ms/token):", {k: round(v, 3) for k, v in pt["breakdown_ms"].items()})
        return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["resident", "tiers", "bw", "prefill", "gdn"])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budgets", default="8,16,32")
    ap.add_argument("--scale-layers", type=int, default=0)
    ap.add_argument("--resident-too", action="store_true")
    ap.add_argument("--splits", default="0,auto", help="cpu_split settings (auto, 0 or a fraction) to run per "
                    "budget (tiers)")
    ap.add_argument("--lens", default=None, help="prompt lengths (prefill: 64,256,1024; gdn: 2,4,8,16,32,64)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per prompt length (prefill), median")
    a = ap.parse_args()
    if a.lens is None:
        a.lens = "2,4,8,16,32,64" if a.cmd == "gdn" else "64,256,1024"
    {"resident": cmd_resident, "tiers": cmd_tiers, "bw": cmd_bw, "prefill": cmd_prefill, "gdn": cmd_gdn}[a.cmd](a)


if __name__ == "__main__":
    main()
