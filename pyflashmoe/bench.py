"""`flashmoe bench`: decode / prefill speed, where the time goes, and the hardware roofline.

Owns: the benchmark loop over an Engine/Session (pyflashmoe._core), cold-cache control (posix_fadvise
DONTNEED on the expert files before each repeat, checked with mincore), the roofline (disk read
bandwidth from the engine's own probe fm_io_probe at the expert block size, RAM bandwidth from a
copy loop) and the report (text, --json, --plot). Does not own: the engine or the probe.

Definitions (DESIGN.md section 6):
* per token: the engine's Session stats diffed around each eval; "disk bytes" are what the process
  really fetched from storage (/proc/self/io read_bytes), "engine bytes" what the expert reader
  asked for (stats bytes_read; page-cache hits count there but not on disk).
* t_io = disk bytes per token / disk bandwidth; t_compute = weight bytes touched per token (dense
  minus the embedding table, plus K experts per MoE layer) / RAM bandwidth;
  roofline tok/s = 1 / max(t_io, t_compute) (I/O and compute overlapped), achieved/roofline next to it.
* cold: before each repeat the expert files are dropped from the page cache (and the engine is
  reopened so its own RAM cache is empty); the dense weights are read once beforehand so that they
  are resident, as they are in steady state. Residency is measured with mincore before and after.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import sys
import threading
import time

import numpy as np

from pyflashmoe.errors import ArgumentError, BackendError

_BACKENDS = {"cpu": 0, "cuda": 1}


# ---- page cache control ------------------------------------------------------------------------

_libc = None


def _lc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


def resident_bytes(path) -> tuple[int, int]:
    """(bytes of `path` in the page cache, file size), via mmap + mincore."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    lc = _lc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"{path}: mmap failed")
        try:
            pg = mmap.PAGESIZE
            npages = (size + pg - 1) // pg
            vec = (ctypes.c_ubyte * npages)()
            if lc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"{path}: mincore failed")
            n = int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
        finally:
            lc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return min(n * mmap.PAGESIZE, size), size


def drop_cache(paths):
    """posix_fadvise(DONTNEED) on each file (clean pages of files nobody maps leave the cache)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_file(path, chunk=16 << 20):
    """Read a file once so it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def residency(paths) -> float:
    tot = res = 0
    for p in paths:
        r, s = resident_bytes(p)
        res += r
        tot += s
    return res / tot if tot else 0.0


def proc_read_bytes() -> int | None:
    """Bytes this process fetched from storage (/proc/self/io read_bytes), None if unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- bandwidths --------------------------------------------------------------------------------

_probe_fn = None


def _io_probe_fn():
    global _probe_fn
    if _probe_fn is None:
        from pyflashmoe import _core
        f = getattr(_core, "io_probe", None)
        if callable(f):
            _probe_fn = f
        else:
            lib = ctypes.CDLL(_core.__file__)
            lib.fm_io_probe.restype = ctypes.c_int
            lib.fm_io_probe.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32,
                                        ctypes.c_int32, ctypes.POINTER(ctypes.c_double), ctypes.c_char_p,
                                        ctypes.c_size_t]

            def f(path, block_bytes, n_reads, threads, direct_io):
                g = ctypes.c_double()
                err = ctypes.create_string_buffer(1024)
                st = lib.fm_io_probe(os.fsencode(path), block_bytes, n_reads, threads, int(direct_io),
                                     ctypes.byref(g), err, 1024)
                if st != 0:
                    raise BackendError(f"fm_io_probe: {err.value.decode(errors='replace')}")
                return g.value
            _probe_fn = f
    return _probe_fn


def disk_bandwidth(path, block_bytes, n_reads, threads, cold=True, direct_io=False) -> float:
    """GB/s (1e9) of random block reads of `path` by the engine's probe; cold drops the file first."""
    if cold:
        drop_cache([path])
    g = _io_probe_fn()(path, int(block_bytes), int(n_reads), int(threads), bool(direct_io))
    if cold:
        drop_cache([path])
    return float(g)


def ram_bandwidth(threads=1, mb=256, reps=5) -> float:
    """GB/s of a numpy copy loop on `threads` threads (STREAM convention: read + write bytes)."""
    n = mb * (1 << 20) // 8
    srcs = [np.ones(n, np.float64) for _ in range(threads)]
    dsts = [np.empty(n, np.float64) for _ in range(threads)]
    best = 0.0
    for _ in range(reps):
        bar = threading.Barrier(threads + 1)

        def work(i):
            bar.wait()
            np.copyto(dsts[i], srcs[i])

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        bar.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, 2 * 8 * n * threads / dt / 1e9)
    return best


# ---- the benchmark -----------------------------------------------------------------------------

def _manifest(path):
    # the one model-dir check (format.validate): every file it names is inside the model dir
    from pyflashmoe.format import validate
    return validate(path)


def _model_sizes(m, path):
    spec = m["spec"]
    layers = m["experts"]["layers"]
    blocks = {int(k): v["block_bytes"] for k, v in layers.items()}
    files = m["files"]
    dense = files.get("dense.safetensors", {}).get("size", 0)
    emb = m["tensors"].get("tok_embd", {})
    emb_bytes = emb.get("nbytes") or sum((emb.get(k) or [0, 0])[1] for k in ("q", "scales", "biases"))
    if spec.get("tie_word_embeddings"):
        emb_bytes = 0  # the table is also the lm_head: read every token
    expert_files = [os.path.join(path, v["file"]) for v in layers.values()]
    return {"dense_bytes": dense, "embedding_bytes": emb_bytes, "block_bytes": blocks,
            "expert_files": expert_files, "dense_file": os.path.join(path, "dense.safetensors"),
            "expert_bytes": sum(files[v["file"]]["size"] for v in layers.values()),
            "n_moe": len(layers), "n_layers": spec["n_layers"]}


def _diff(a, b):
    return {k: b[k] - a[k] for k in a if isinstance(a[k], (int, float))}


_PHASES = ("ms_attn", "ms_route", "ms_io_wait", "ms_expert", "ms_other")


def _summ(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _one_repeat(core, path, eng_kw, P, N, rng, cold, files, dense_file, stats_keys):
    if cold:
        drop_cache(files)
    res_before = residency(files) if cold else None
    engine = core.Engine(path, **eng_kw)
    vocab = engine.n_vocab
    sess = core.Session(engine, P + N + 8)
    prompt = rng.integers(0, min(vocab, 240000), size=P).astype(np.int32)
    out = {"cold_residency_before": res_before}
    # prefill
    s0, d0, t0 = sess.stats(), proc_read_bytes(), time.perf_counter()
    logits = sess.eval(prompt)
    t1, d1, s1 = time.perf_counter(), proc_read_bytes(), sess.stats()
    finite = bool(np.isfinite(logits).all())
    pre = _diff(s0, s1)
    out["prefill"] = {"tokens": P, "s": t1 - t0, "tps": P / (t1 - t0), "stats": pre,
                      "disk_bytes": (d1 - d0) if d0 is not None else None}
    # decode (greedy)
    tok = int(np.argmax(logits))
    per_tok = []
    s2, d2, t2 = sess.stats(), proc_read_bytes(), time.perf_counter()
    for _ in range(N):
        a = time.perf_counter()
        logits = sess.eval(np.array([tok], np.int32))
        per_tok.append(time.perf_counter() - a)
        finite = finite and bool(np.isfinite(logits).all())
        tok = int(np.argmax(logits))
    t3, d3, s3 = time.perf_counter(), proc_read_bytes(), sess.stats()
    dec = _diff(s2, s3)
    out["decode"] = {"tokens": N, "s": t3 - t2, "tps": N / (t3 - t2), "stats": dec,
                     "disk_bytes": (d3 - d2) if d2 is not None else None,
                     "ms_per_token": [1000 * x for x in per_tok]}
    out["finite"] = finite
    out["cold_residency_after"] = residency(files) if cold else None
    out["dense_residency_after"] = residency([dense_file])
    del sess, engine
    return out


def bench(path, backend="cpu", cold=False, tokens=16, prompt_tokens=16, repeat=3, k=None, threads=None,
          io_threads=None, direct_io=False, ram_budget=None, seed=0, roofline=True, warmup=True,
          log=None, vram_budget=None) -> dict:
    """Run the benchmark; returns a dict (see format_report for the fields)."""
    from pyflashmoe.generate import parse_size
    path = os.fspath(path)
    if backend == "auto":
        from pyflashmoe.generate import cuda_available
        backend = "cuda" if cuda_available() else "cpu"
    if backend not in _BACKENDS:
        raise ArgumentError(f"--backend must be one of {', '.join(_BACKENDS)} (got {backend!r})")
    for name, v, lo in (("--tokens", tokens, 1), ("--prompt-tokens", prompt_tokens, 1),
                        ("--repeat", repeat, 1)):
        if not isinstance(v, int) or v < lo:
            raise ArgumentError(f"{name} must be an integer >= {lo} (got {v!r})")
    m = _manifest(path)
    sz = _model_sizes(m, path)
    spec = m["spec"]
    K = int(k) if k else int(spec["n_experts_per_tok"])
    if k is not None and not 1 <= K <= spec["n_experts"]:
        raise ArgumentError(f"--k must be in [1, {spec['n_experts']}] (got {k})")
    budget = parse_size(ram_budget, "ram_budget")
    try:
        from pyflashmoe import _core as core
    except ImportError as e:
        raise BackendError(f"pyflashmoe._core is not built: {e}") from None
    ncpu = os.cpu_count() or 1
    from pyflashmoe.switches import debug_from_env
    eng_kw = dict(backend=_BACKENDS[backend], n_threads=int(threads or 0), io_threads=int(io_threads or 0),
                  direct_io=bool(direct_io), ram_budget=budget, experts_per_token=int(k or 0),
                  vram_budget=parse_size(vram_budget, "vram_budget"), debug=debug_from_env())
    log = log or (lambda *a: None)
    rng = np.random.default_rng(seed)
    files = sz["expert_files"]
    if cold:
        log("cold: reading the dense weights once so they are resident")
        warm_file(sz["dense_file"])
    elif warmup:
        log("warm-up repeat (not timed)")
        _one_repeat(core, path, eng_kw, prompt_tokens, tokens, np.random.default_rng(seed + 10 ** 6),
                    False, files, sz["dense_file"], None)
    runs = []
    for r in range(repeat):
        if cold:
            warm_file(sz["dense_file"])
        t = _one_repeat(core, path, eng_kw, prompt_tokens, tokens, rng, cold, files, sz["dense_file"], None)
        log(f"repeat {r + 1}/{repeat}: prefill {t['prefill']['tps']:.2f} tok/s, decode "
            f"{t['decode']['tps']:.3f} tok/s")
        runs.append(t)
    block = max(sz["block_bytes"].values()) if sz["block_bytes"] else 0
    res = {"model": path, "backend": backend, "cold": cold, "direct_io": bool(direct_io),
           "threads": threads or ncpu, "io_threads": io_threads, "k": K, "ram_budget": budget,
           "prompt_tokens": prompt_tokens, "tokens": tokens, "repeat": repeat,
           "spec": {x: spec[x] for x in ("arch", "hidden_size", "n_layers", "n_experts",
                                         "n_experts_per_tok", "moe_intermediate_size", "vocab_size")},
           "sizes": {k2: v for k2, v in sz.items() if k2 not in ("expert_files", "dense_file", "block_bytes")},
           "block_bytes": block, "finite": all(r_["finite"] for r_ in runs), "runs": runs}
    res["sizes"]["moe_layers"] = sz["n_moe"]
    for ph in ("prefill", "decode"):
        n_tok = [r_[ph]["tokens"] for r_ in runs]
        agg = {"tps": _summ([r_[ph]["tps"] for r_ in runs])}
        tot = {}
        for r_ in runs:
            for k2, v in r_[ph]["stats"].items():
                tot[k2] = tot.get(k2, 0) + v
        nt = tot.get("n_tokens") or sum(n_tok)
        agg["ms_per_token"] = {p[3:]: tot.get(p, 0.0) / nt for p in _PHASES + ("ms_total",)}
        agg["ms_per_layer"] = {p[3:]: tot.get(p, 0.0) / nt / sz["n_layers"] for p in _PHASES[:4]}
        agg["engine_bytes_per_token"] = tot.get("bytes_read", 0) / nt
        loads, hits = tot.get("expert_loads", 0), tot.get("expert_hits", 0)
        agg["expert_loads_per_token"] = loads / nt
        agg["expert_hits_per_token"] = hits / nt
        agg["ram_cache_hit_rate"] = hits / (loads + hits) if loads + hits else 0.0
        agg["bytes_match_loads"] = (tot.get("bytes_read", 0) == loads * block) if block else None
        disk = [r_[ph]["disk_bytes"] for r_ in runs]
        if all(d is not None for d in disk):
            dsum = sum(disk)
            agg["disk_bytes_per_token"] = dsum / nt
            eb = tot.get("bytes_read", 0)
            agg["page_cache_hit_rate"] = max(0.0, 1 - dsum / eb) if eb else None
        else:
            agg["disk_bytes_per_token"] = None
            agg["page_cache_hit_rate"] = None
        res[ph] = agg
    # first decode token of each cold repeat: nothing of it can come from an earlier token
    if cold:
        res["cold_check"] = {
            "residency_before": [r_["cold_residency_before"] for r_ in runs],
            "residency_after": [r_["cold_residency_after"] for r_ in runs]}
    if roofline:
        io_thr = int(io_threads or max(4, K))
        probe_file = max(files, key=os.path.getsize)
        n_blocks = max(1, os.path.getsize(probe_file) // max(block, 1) - 1)
        n_reads = max(1, min(n_blocks, 256, int(1e9 // max(block, 1))))
        log(f"roofline: disk probe ({n_reads} random {block}-byte reads, {io_thr} threads), RAM copy loop")
        cold_bw = [disk_bandwidth(probe_file, block, n_reads, io_thr, cold=True, direct_io=direct_io)
                   for _ in range(3)]
        ram_bw = ram_bandwidth(threads=min(ncpu, int(threads or ncpu)))
        dense_touch = sz["dense_bytes"] - sz["embedding_bytes"]
        exp_touch = sz["n_moe"] * K * block
        touched = dense_touch + exp_touch
        rf = {"disk_gbps": statistics.median(cold_bw), "disk_gbps_all": cold_bw, "ram_gbps": ram_bw,
              "bytes_touched_per_token": touched, "dense_bytes_touched": dense_touch,
              "expert_bytes_touched": exp_touch}
        d = res["decode"]
        io_bytes = d["disk_bytes_per_token"] if d["disk_bytes_per_token"] is not None \
            else d["engine_bytes_per_token"]
        t_io = io_bytes / (rf["disk_gbps"] * 1e9)
        t_c = touched / (ram_bw * 1e9)
        rf["t_io_ms"], rf["t_compute_ms"] = 1e3 * t_io, 1e3 * t_c
        rf["roofline_tps"] = 1.0 / max(t_io, t_c)
        rf["roofline_serial_tps"] = 1.0 / (t_io + t_c)
        rf["disk_only_tps"] = 1.0 / t_io if t_io > 0 else None
        ach = d["tps"]["median"]
        rf["achieved_over_roofline"] = ach / rf["roofline_tps"]
        rf["achieved_over_disk_roofline"] = (ach / rf["disk_only_tps"]) if rf["disk_only_tps"] else None
        res["roofline"] = rf
    try:
        res["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return res


def _gb(n):
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_report(r) -> str:
    s = r["spec"]
    L = []
    L.append(f"{r['model']}: {s['arch']} hidden {s['hidden_size']}, {s['n_layers']} layers, "
             f"{s['n_experts']} experts (K={r['k']}), expert block {r['block_bytes']} B")
    L.append(f"  {'cold' if r['cold'] else 'warm'}{' O_DIRECT' if r['direct_io'] else ''}, threads "
             f"{r['threads']}, io_threads {r['io_threads'] or 'default'}, ram_budget {r['ram_budget']}, "
             f"prompt {r['prompt_tokens']} + decode {r['tokens']} tokens x {r['repeat']} repeats; "
             f"load avg {', '.join(f'{x:.1f}' for x in r.get('loadavg', ()))}")
    for ph in ("prefill", "decode"):
        d = r[ph]
        t = d["tps"]
        L.append(f"  {ph:7s} {t['median']:.3f} tok/s (min {t['min']:.3f}, max {t['max']:.3f})")
        mp = d["ms_per_token"]
        L.append(f"          ms/token: total {mp['total']:.1f} | attention {mp['attn']:.1f} | routing "
                 f"{mp['route']:.2f} | I/O wait {mp['io_wait']:.1f} | experts {mp['expert']:.1f} | "
                 f"other {mp['other']:.1f}")
        ml = d["ms_per_layer"]
        L.append(f"          ms/layer: attention {ml['attn']:.2f} | routing {ml['route']:.3f} | I/O wait "
                 f"{ml['io_wait']:.2f} | experts {ml['expert']:.2f}")
        disk = d["disk_bytes_per_token"]
        L.append(f"          bytes/token: engine {_gb(d['engine_bytes_per_token'])}"
                 + (f", from disk {_gb(disk)}" if disk is not None else "")
                 + f" | expert loads {d['expert_loads_per_token']:.1f}/token, RAM-cache hits "
                 f"{100 * d['ram_cache_hit_rate']:.1f}%"
                 + (f", page-cache hits {100 * d['page_cache_hit_rate']:.1f}%"
                    if d.get("page_cache_hit_rate") is not None else ""))
    dr = [x.get("dense_residency_after") for x in r["runs"] if x.get("dense_residency_after") is not None]
    if dr:
        L.append(f"  dense.safetensors resident in the page cache after each repeat: "
                 f"{', '.join(f'{100 * x:.1f}%' for x in dr)}")
    if r.get("cold_check"):
        c = r["cold_check"]
        L.append(f"  cold check: expert files resident before each repeat "
                 f"{', '.join(f'{100 * x:.2f}%' for x in c['residency_before'])}")
    rf = r.get("roofline")
    if rf:
        L.append(f"  roofline: disk {rf['disk_gbps']:.3f} GB/s (engine probe, cold, {r['block_bytes']} B "
                 f"blocks), RAM {rf['ram_gbps']:.1f} GB/s (copy)")
        L.append(f"            per token: t_io {rf['t_io_ms']:.1f} ms, t_compute {rf['t_compute_ms']:.1f} ms "
                 f"({_gb(rf['bytes_touched_per_token'])} of weights) -> roofline "
                 f"{rf['roofline_tps']:.3f} tok/s (serial {rf['roofline_serial_tps']:.3f})")
        L.append(f"            achieved decode / roofline = {100 * rf['achieved_over_roofline']:.1f}%"
                 + (f"; / disk-only roofline = {100 * rf['achieved_over_disk_roofline']:.1f}%"
                    if rf.get("achieved_over_disk_roofline") else ""))
    if not r["finite"]:
        L.append("  WARNING: non-finite logits seen")
    return "\n".join(L)


def plot_budgets(path, budgets, out_png, log=None, **kw):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendError("--plot needs matplotlib (pip install matplotlib)") from None
    pts = []
    for b in budgets:
        r = bench(path, ram_budget=int(b), roofline=False, log=log, **kw)
        pts.append((b, r["decode"]["tps"]["median"], r["decode"]["tps"]["min"], r["decode"]["tps"]["max"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    gib = max(p[0] for p in pts) >= 2 ** 30
    xs = [p[0] / (2 ** 30 if gib else 2 ** 20) for p in pts]
    ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o", capsize=3)
    ax.set_xlabel(f"engine RAM budget ({'GiB' if gib else 'MiB'})")
    ax.set_ylabel("decode tok/s")
    ax.set_title(os.path.basename(os.path.normpath(path)))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return pts


def run_cli(a) -> int:
    from pyflashmoe.generate import parse_size
    log = (lambda *x: print("flashmoe bench:", *x, file=sys.stderr, flush=True)) if not a.json else None
    kw = dict(backend=a.backend, cold=a.cold, tokens=a.tokens, prompt_tokens=a.prompt_tokens,
              repeat=a.repeat, k=a.k, threads=a.threads, io_threads=a.io_threads, direct_io=a.direct_io,
              seed=a.seed, vram_budget=a.vram_budget)
    if a.plot:
        if a.plot_budgets:
            budgets = [parse_size(x.strip(), "--plot-budgets") for x in a.plot_budgets.split(",")]
        else:
            sz = _model_sizes(_manifest(a.model), a.model)
            budgets = [0] + [int(sz["expert_bytes"] * f) for f in (0.125, 0.25, 0.5, 1.0)]
        pts = plot_budgets(a.model, budgets, a.plot, log=log, **kw)
        if a.json:
            print(json.dumps({"plot": a.plot, "points": pts}))
        else:
            for b, med, lo, hi in pts:
                print(f"ram_budget {b / 2 ** 20:.1f} MiB: decode {med:.3f} tok/s ({lo:.3f}..{hi:.3f})")
            print(f"wrote {a.plot}")
        return 0
    r = bench(a.model, ram_budget=a.ram_budget, roofline=not a.no_roofline, log=log, **kw)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(format_report(r))
    return 0
