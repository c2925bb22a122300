#!/usr/bin/env python3
"""pyflashmoe vs llama.cpp (llama-cpp-python) at the same dims, same threads, same K, cold and warm.

    python bench/compare_llamacpp.py --model-dir /work/synth/q35b --gguf /work/synth/q35b.gguf \
        --threads 2 --tokens 8 --prompt-tokens 8 --repeat 3

Both models are random-weight synthetic models of the same preset (`flashmoe synth --preset P
DIR --gguf FILE`): experts 4-bit (pyflashmoe affine group 64 / llama.cpp Q4_0: both 4.5 bits per
weight), dense 16-bit (bf16 / f16). The weights are drawn alike but are not the same values, so
routing differs token by token; speed, not output, is compared.

Each engine runs in its own subprocess (clean page-cache accounting via /proc/self/io and no
shared mmap). Modes:
  warm  files as the page cache holds them after a warm-up pass (pyflashmoe: one untimed repeat;
        llama.cpp: load, which maps the GGUF with MAP_POPULATE, plus one untimed decode).
  cold  pyflashmoe: expert files dropped from the page cache (posix_fadvise DONTNEED) before each
        repeat, dense weights resident. llama.cpp: the GGUF dropped before each load; note that
        llama.cpp's loader maps with MAP_POPULATE (it reads the whole file at load), so its decode
        is only cold when the model is larger than the page cache.
Load time is reported separately and not counted in tok/s. The roofline comes from
`flashmoe bench` (engine disk probe at the expert block size + RAM copy loop).

Large models may not fit on disk twice: run `--only flashmoe --save a.json`, replace the model dir
by the GGUF, run `--only llama --save b.json`, then `--merge a.json b.json` prints the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _summ(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


# ---- llama.cpp worker (runs in its own process) -------------------------------------------------

def llama_worker(a):
    import numpy as np
    import llama_cpp
    from pyflashmoe import bench as fb
    P, N = a.prompt_tokens, a.tokens
    rng = np.random.default_rng(a.seed)
    kv = {}
    if a.k:
        kv["qwen35moe.expert_used_count"] = int(a.k)

    def load():
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=P + N + 16, n_batch=max(P, 8), n_ubatch=max(P, 8),
                              n_threads=a.threads, n_threads_batch=a.threads, use_mmap=True,
                              verbose=False, kv_overrides=kv or None)
        return llm, time.perf_counter() - t0

    def last_logits(llm):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def one(llm):
        prompt = rng.integers(0, 240000, size=P).tolist()
        llm.reset()
        d0, t0 = fb.proc_read_bytes(), time.perf_counter()
        llm.eval(prompt)
        t1, d1 = time.perf_counter(), fb.proc_read_bytes()
        lg = last_logits(llm)
        finite = bool(np.isfinite(lg).all()) and float(lg.std()) > 0
        tok = int(np.argmax(lg))
        d2, t2 = fb.proc_read_bytes(), time.perf_counter()
        for _ in range(N):
            llm.eval([tok])
            lg = last_logits(llm)
            finite = finite and bool(np.isfinite(lg).all())
            tok = int(np.argmax(lg))
        t3, d3 = time.perf_counter(), fb.proc_read_bytes()
        return {"prefill_tps": P / (t1 - t0), "decode_tps": N / (t3 - t2), "finite": finite,
                "prefill_disk_bytes": d1 - d0, "decode_disk_bytes_per_token": (d3 - d2) / N}

    runs, loads, resid = [], [], []
    if a.mode == "warm":
        llm, lt = load()
        loads.append(lt)
        one(llm)  # warm-up
        for _ in range(a.repeat):
            runs.append(one(llm))
        del llm
    else:
        for _ in range(a.repeat):
            fb.drop_cache([a.gguf])
            resid.append(fb.residency([a.gguf]))
            llm, lt = load()
            loads.append(lt)
            runs.append(one(llm))
            del llm
    out = {"engine": "llama.cpp", "mode": a.mode, "threads": a.threads, "k": a.k,
           "version": getattr(llama_cpp, "__version__", "?"),
           "decode_tps": _summ([r["decode_tps"] for r in runs]),
           "prefill_tps": _summ([r["prefill_tps"] for r in runs]),
           "load_s": _summ(loads), "finite": all(r["finite"] for r in runs),
           "decode_disk_bytes_per_token": statistics.median(r["decode_disk_bytes_per_token"] for r in runs),
           "residency_before_load": resid, "runs": runs,
           "gguf_bytes": os.path.getsize(a.gguf)}
    print(json.dumps(out))


# ---- driver ---------------------------------------------------------------------------------------

def run_flashmoe(a, mode):
    cmd = [sys.executable, "-m", "pyflashmoe", "bench", a.model_dir, "--json", "--tokens", str(a.tokens),
           "--prompt-tokens", str(a.prompt_tokens), "--repeat", str(a.repeat), "--threads", str(a.threads),
           "--seed", str(a.seed)]
    if a.k:
        cmd += ["--k", str(a.k)]
    if mode == "cold":
        cmd.append("--cold")
    if a.io_threads:
        cmd += ["--io-threads", str(a.io_threads)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pyflashmoe bench failed:\n{r.stderr}")
    res = json.loads(r.stdout)
    res["engine"] = "pyflashmoe"
    res["mode"] = mode
    for ph in ("prefill", "decode"):
        res[ph + "_tps"] = res[ph]["tps"]
    return res


def run_llama(a, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--gguf", a.gguf, "--mode", mode,
           "--tokens", str(a.tokens), "--prompt-tokens", str(a.prompt_tokens), "--repeat", str(a.repeat),
           "--threads", str(a.threads), "--seed", str(a.seed)]
    if a.k:
        cmd += ["--k", str(a.k)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(results):
    by = {(r["engine"], r["mode"]): r for r in results}
    lines = ["| mode | pyflashmoe decode tok/s | llama.cpp decode tok/s | ratio | roofline tok/s | "
             "pyflashmoe / roofline | pyflashmoe prefill tok/s | llama.cpp prefill tok/s | "
             "llama.cpp load s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(s):
        return f"{s['median']:.3f} ({s['min']:.3f}..{s['max']:.3f})" if s else "-"
    for mode in ("cold", "warm"):
        fm, ll = by.get(("pyflashmoe", mode)), by.get(("llama.cpp", mode))
        if not fm and not ll:
            continue
        ratio = (fm["decode_tps"]["median"] / ll["decode_tps"]["median"]) if fm and ll else None
        rf = (fm or {}).get("roofline") or {}
        lines.append(
            f"| {mode} | {f(fm['decode_tps']) if fm else '-'} | {f(ll['decode_tps']) if ll else '-'} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | "
            f"{rf.get('roofline_tps', float('nan')):.3f} | "
            f"{100 * rf.get('achieved_over_roofline', float('nan')):.0f}% | "
            f"{f(fm['prefill_tps']) if fm else '-'} | {f(ll['prefill_tps']) if ll else '-'} | "
            f"{ll['load_s']['median']:.1f} |" if ll else
            f"| {mode} | {f(fm['decode_tps'])} | - | - | {rf.get('roofline_tps', float('nan')):.3f} | "
            f"{100 * rf.get('achieved_over_roofline', float('nan')):.0f}% | {f(fm['prefill_tps'])} | - | - |")
    return "\n".join(lines)


def details(results):
    out = []
    for r in results:
        if r["engine"] == "pyflashmoe":
            d = r["decode"]
            mp = d["ms_per_token"]
            rf = r.get("roofline", {})
            out.append(
                f"- pyflashmoe {r['mode']}: decode ms/token total {mp['total']:.0f} = attention "
                f"{mp['attn']:.0f} + routing {mp['route']:.1f} + I/O wait {mp['io_wait']:.0f} + experts "
                f"{mp['expert']:.0f} + other {mp['other']:.0f}; engine bytes/token "
                f"{d['engine_bytes_per_token'] / 1e6:.0f} MB, from disk "
                f"{(d['disk_bytes_per_token'] or 0) / 1e6:.0f} MB; RAM-cache hits "
                f"{100 * d['ram_cache_hit_rate']:.0f}%"
                + (f", page-cache hits {100 * d['page_cache_hit_rate']:.0f}%"
                   if d.get("page_cache_hit_rate") is not None else "")
                + (f"; roofline: disk {rf['disk_gbps']:.3f} GB/s, RAM {rf['ram_gbps']:.1f} GB/s, "
                   f"t_io {rf['t_io_ms']:.0f} ms, t_compute {rf['t_compute_ms']:.0f} ms" if rf else "")
                + (f"; load avg {r['loadavg'][0]:.1f}" if r.get("loadavg") else ""))
        else:
            out.append(f"- llama.cpp {r['mode']}: disk bytes/token during decode "
                       f"{r['decode_disk_bytes_per_token'] / 1e6:.0f} MB, load "
                       f"{r['load_s']['median']:.1f} s, GGUF {r['gguf_bytes'] / 1e9:.1f} GB"
                       + (f", GGUF resident before load {', '.join(f'{100 * x:.1f}%' for x in r['residency_before_load'])}"
                          if r.get("residency_before_load") else ""))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir")
    p.add_argument("--gguf")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--io-threads", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="cold,warm")
    p.add_argument("--only", choices=["flashmoe", "llama"], default=None)
    p.add_argument("--save", default=None, help="write the raw results (JSON)")
    p.add_argument("--merge", nargs="+", default=None, help="print the table of saved result files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="warm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return llama_worker(a)
    results = []
    if a.merge:
        for fn in a.merge:
            with open(fn) as f:
                results += json.load(f)["results"]
    else:
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        for mode in modes:
            if a.only in (None, "flashmoe"):
                if not a.model_dir:
                    raise SystemExit("--model-dir is needed")
                results.append(run_flashmoe(a, mode))
            if a.only in (None, "llama"):
                if not a.gguf:
                    raise SystemExit("--gguf is needed")
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    raise SystemExit("llama-cpp-python is not installed (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" "
                                     "pip install llama-cpp-python)") from None
                results.append(run_llama(a, mode))
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "loadavg": os.getloadavg(), "results": results}, f, indent=1)
    print(table(results))
    print()
    print(details(results))


if __name__ == "__main__":
    main()
