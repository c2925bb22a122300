"""Aggregate decode throughput with 1, 4 and 8 concurrent streams (issue 10 item 4).

    python bench/bench_parallel.py [--backend cpu|cuda] [--models demo,35b] [--streams 1,4,8]
        [--tokens 64] [--repeats 3] [--layers 4] [--vocab N] [--server] [--json out.json]

For every model and every stream count S, S prompts (distinct random token ids, 16 tokens each)
are decoded together through Model.generate_batch (greedy, EOS ignored, --tokens tokens each):
one batched step evaluates a token of every stream (Model._eval_batch -> Engine.eval_batch: each
MoE layer reads the union of the streams' experts once). Measured per run, after every stream
has joined (the prefills are not timed):

  agg_tps          generated tokens of all streams / decode wall time
  per_stream_tps   agg_tps / S
  bytes_per_token  bytes the engine read (sessions' `bytes_read`, summed: a batched step counts
                   its reads once) / generated tokens; 0 when every expert is resident
  ms_per_step      decode wall time / batched steps

--repeats runs of each (after one untimed warm-up run per model) give the median and the spread
(min, max, (max - min) / median). speedup = median agg_tps / median agg_tps of 1 stream.
--server also measures S concurrent streaming clients of `flashmoe serve --parallel max(S)` (a
subprocess on 127.0.0.1, same model and backend; /v1/completions with token-id prompts, EOS banned
by logit_bias), from the requests' start to the last chunk of all streams (prefills included).

Models:
  demo  the embedded demo model (pyflashmoe.Model.load()).
  35b   a synthetic model at Qwen3.5-35B-A3B dims (pyflashmoe.synth preset qwen3.5-35b-a3b, 256
        experts, top-8, 4-bit experts), --layers layers and --vocab ids (default the preset's
        248,320), written once into --synth-dir (default $FLASHMOE_BENCH_SYNTH or
        /tmp/flashmoe_bench_parallel) and reused. --layers defaults to all 40 with --backend
        cuda (~20 GB, about a minute to write; a GPU step of a few layers is so short that the
        per-sequence Python work of a step, sampling included, would dominate the ratio) and to
        4 on the CPU.

Defaults finish in a few minutes on a GPU; on a small CPU machine use e.g.
    python bench/bench_parallel.py --tokens 16 --repeats 2 --layers 2 --vocab 32768
Output: a table on stderr, JSON on stdout (or --json FILE).
"""
import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pyflashmoe as fm  # noqa: E402
from pyflashmoe.generate import Model  # noqa: E402

PROMPT_LEN = 16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def synth_dir(a) -> str:
    from pyflashmoe.synth import synth
    base = a.synth_dir or os.environ.get("FLASHMOE_BENCH_SYNTH") or os.path.join(
        tempfile.gettempdir(), "flashmoe_bench_parallel")
    name = f"q35b_L{a.layers}_v{a.vocab or 'full'}_b4"
    out = os.path.join(base, name)
    if not os.path.isfile(os.path.join(out, "pyflashmoe.json")):
        os.makedirs(base, exist_ok=True)
        log(f"writing the synthetic 35B-dims model ({a.layers} layers) to {out} ...")
        t0 = time.time()
        synth(out, preset="qwen3.5-35b-a3b", layers=a.layers, bits=4, group_size=64,
              tokenizer="", progress=False, vocab=a.vocab)
        log(f"  done in {time.time() - t0:.0f} s")
    return out


def load(a, name, parallel):
    path = None if name == "demo" else synth_dir(a)
    ctx = PROMPT_LEN + a.tokens + 8
    return Model.load(path, backend=a.backend, threads=a.threads, parallel=parallel,
                      context_length=ctx)


def prompts(model, s, seed):
    rng = np.random.default_rng(seed)
    hi = min(model.n_vocab, 30000)
    return [rng.integers(3, hi, size=PROMPT_LEN).tolist() for _ in range(s)]


def bytes_read(model) -> float:
    total = 0.0
    for sess in model.pool.sessions():
        try:
            total += float(sess.stats().get("bytes_read", 0))
        except Exception:
            pass
    return total


def run_batch(model, s, tokens, seed):
    """One run of s streams through generate_batch: the decode-phase numbers."""
    gen = model.generate_batch(prompts(model, s, seed), parallel=s, max_tokens=tokens,
                               temperature=0, ignore_eos=True, logprobs=False)
    joined, n_tok, t_join = set(), 0, None
    b_join = steps0 = n_join = 0
    for i, piece in gen:
        n_tok += 1
        if t_join is None:
            joined.add(i)
            if len(joined) == s:  # every stream has joined: the decode phase starts here
                t_join = time.perf_counter()
                b_join, steps0, n_join = bytes_read(model), model.stats["steps"], n_tok
    t_end = time.perf_counter()
    dec = n_tok - n_join
    wall = t_end - t_join
    steps = model.stats["steps"] - steps0
    return {"agg_tps": dec / wall if wall > 0 else 0.0, "tokens": dec, "wall_s": wall,
            "bytes_per_token": (bytes_read(model) - b_join) / max(1, dec),
            "ms_per_step": 1000 * wall / max(1, steps), "steps": steps}


def run_server(server_url, s, tokens, seed, n_vocab, eos):
    import httpx
    rng = np.random.default_rng(seed)
    hi = min(n_vocab, 30000)
    bias = {str(t): -100 for t in eos}

    async def one(c, ids):
        n, t_first, t_last = 0, None, None
        body = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
                "logit_bias": bias, "stream_options": {"include_usage": True}}
        async with c.stream("POST", server_url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])
                    if "error" in ch:
                        raise RuntimeError(ch["error"])
                    if ch.get("usage"):  # tokens (a model without a tokenizer streams no text)
                        n = ch["usage"]["completion_tokens"]
                    else:
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
        return n, t_first, t_last

    async def all_():
        limits = httpx.Limits(max_connections=s + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as c:
            t0 = time.perf_counter()
            out = await asyncio.gather(*[one(c, rng.integers(3, hi, size=PROMPT_LEN).tolist())
                                         for _ in range(s)])
            return t0, out

    t0, out = asyncio.run(all_())
    n = sum(o[0] for o in out)
    wall = max(o[2] for o in out) - t0
    return {"agg_tps": n / wall if wall > 0 else 0.0, "tokens": n, "wall_s": wall}


class LiveServer:
    """`flashmoe serve` of the same model dir and settings, a subprocess on 127.0.0.1 (its own
    process: the clients here do not share its GIL)."""

    def __init__(self, a, name, model, parallel):
        import socket
        import subprocess
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        args = [sys.executable, "-m", "pyflashmoe", "serve"]
        if name != "demo":
            args.append(model.path)
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--parallel", str(parallel),
                 "--backend", a.backend, "--ctx", str(model.context_length), "--timeout", "0",
                 "--state-ram", "0"]
        if a.threads:
            args += ["--threads", str(a.threads)]
        self.proc = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx
        t0 = time.time()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("flashmoe serve exited: " + self.proc.stderr.read()[-2000:])
            if time.time() - t0 > 300:
                raise RuntimeError("flashmoe serve did not come up in 300 s")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def summarize(runs, key):
    v = [r[key] for r in runs]
    med = statistics.median(v)
    return med, {"min": min(v), "max": max(v), "rel": (max(v) - min(v)) / med if med else 0.0,
                 "runs": v}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="demo,35b")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per stream and run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="layers of the synthetic 35B-dims "
                    "model (default: all 40 with --backend cuda, 4 on the CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of the synthetic model "
                    "(default the preset's; a multiple of 16)")
    ap.add_argument("--synth-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server", action="store_true", help="also through the HTTP server")
    ap.add_argument("--json", default=None, help="write the JSON here (default: stdout)")
    a = ap.parse_args(argv)
    if a.layers is None:
        a.layers = 40 if a.backend == "cuda" else 4
    streams = [int(x) for x in a.streams.split(",")]
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in ("demo", "35b"):
            ap.error(f"--models: unknown model {m!r} (demo, 35b)")
    if a.tokens < 2 or a.repeats < 1 or min(streams) < 1:
        ap.error("--tokens >= 2, --repeats >= 1 and stream counts >= 1")
    results = []
    t_all = time.time()
    for name in models:
        model = load(a, name, max(streams))
        log(f"{name}: {model!r}, backend {model.backend}, parallel {model.parallel}, "
            f"engine eval_batch: {hasattr(model.engine, 'eval_batch')}")
        run_batch(model, max(streams), min(a.tokens, 8), 999)  # warm-up (sessions, caches)
        base = {}
        for path in ["generate_batch"] + (["server"] if a.server else []):
            live = LiveServer(a, name, model, max(streams)).__enter__() if path == "server" else None
            try:
                for s in streams:
                    runs = []
                    for r in range(a.repeats):
                        if live is None:
                            runs.append(run_batch(model, s, a.tokens, 1000 * r + s))
                        else:
                            runs.append(run_server(live.url, s, a.tokens, 1000 * r + s,
                                                   model.n_vocab, model.eos_token_ids))
                    tps, spread = summarize(runs, "agg_tps")
                    row = {"model": name, "path": path, "streams": s, "tokens_per_stream": a.tokens,
                           "agg_tps": tps, "per_stream_tps": tps / s, "spread": spread,
                           "timed_tokens": runs[0]["tokens"]}
                    if live is None:
                        row["bytes_per_token"] = summarize(runs, "bytes_per_token")[0]
                        row["ms_per_step"] = summarize(runs, "ms_per_step")[0]
                    base.setdefault(path, tps if s == 1 else None)
                    if base.get(path):
                        row["speedup"] = tps / base[path]
                    results.append(row)
                    extra = (f" | {row['bytes_per_token'] / 2**20:8.2f} MiB read/token | "
                             f"{row['ms_per_step']:7.2f} ms/step") if live is None else ""
                    log(f"{name:5} {path:14} {s:2} streams: {tps:9.2f} tok/s aggregate "
                        f"(spread {100 * spread['rel']:.1f}%)"
                        + (f" x{row['speedup']:.2f}" if "speedup" in row else "") + extra)
            finally:
                if live is not None:
                    live.__exit__(None, None, None)
        model.close()
    out = {"bench": "bench_parallel", "backend": a.backend, "argv": sys.argv[1:],
           "config": {"tokens": a.tokens, "repeats": a.repeats, "streams": streams,
                      "layers_35b": a.layers, "vocab_35b": a.vocab, "prompt_len": PROMPT_LEN},
           "host": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "pyflashmoe": getattr(fm, "__version__", "?")},
           "wall_s": time.time() - t_all, "results": results}
    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
        log(f"wrote {a.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
