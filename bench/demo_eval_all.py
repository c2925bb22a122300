"""The demo model's full held-out table (issue 11): bf16 perplexity (transformers) and, for each
shipped bits setting / recipe x K, perplexity, mean / p99 KLD and top-1 agreement against it, over
all 189 held-out windows (48,195 scored tokens).

Needs only the repo checkout and demo_out/ckpt (the bf16 checkpoint, 35 MB, with its tokenizer)
+ demo_out/corpus/heldout.txt: it builds the extension (setup.py build_ext --inplace, with CUDA for
--backend cuda; --no-build skips that), converts the model dirs itself (into --work, not carried back), saves the bf16
reference once through transformers (--ref-device cuda on a GPU), then evaluates every dir x K.
Resumable: a finished (dir, K) is kept in OUT/results.json and not run again, so a run cut by a
time limit continues where it stopped.

    python3 bench/demo_eval_all.py --backend cuda --ref-device cuda --out /tmp/dea   # GPU machine
    python3 bench/demo_eval_all.py --backend cpu --threads 16 --out /tmp/dea         # 16 cores
    python3 bench/demo_eval_all.py --max-tokens 510 --no-build --out /tmp/e          # a quick check

(--out on the machine's own disk, so that a second call resumes; copy OUT/table.md and
OUT/results.json to wherever the results must go.)

Writes OUT/results.json (every run), OUT/table.md (the markdown rows for bench/RESULTS.md) and
prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the shipped bits settings (bench/RESULTS.md "Demo model: perplexity and KLD") and the recipes;
# the embedded demo (--bits 4 --dense-bits 8) is the package's own dir
BITS_DIRS = {"demo-q2": dict(bits=2), "demo-q3": dict(bits=3), "demo-q4": dict(bits=4),
             "demo-q8": dict(bits=8)}


def ensure_core(backend):
    """Build pyflashmoe._core in the checkout (setup.py build_ext --inplace; with CUDA for --backend
    cuda), so that the extension matches the checkout's C sources, then check it imports."""
    env = dict(os.environ)
    if backend == "cuda":
        env["FLASHMOE_CUDA"] = "1"
    print(f"demo_eval_all: building pyflashmoe._core ({'CUDA' if backend == 'cuda' else 'default'})",
          file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=ROOT, env=env,
                   check=True)
    print(f"demo_eval_all: built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    probe = ("import pyflashmoe._core as c, sys; "
             "sys.exit(0 if (sys.argv[1] != 'cuda' or c.cuda_available()) else 3)")
    r = subprocess.run([sys.executable, "-c", probe, backend], cwd=ROOT, capture_output=True, check=False)
    if r.returncode:
        sys.exit(f"demo_eval_all: the built pyflashmoe._core does not import or has no CUDA: "
                 f"{r.stderr.decode(errors='replace')[-500:]}")


def model_dirs(ckpt, work):
    """{name: path}: each shipped bits setting and recipe converted from ckpt, + the embedded demo."""
    from pyflashmoe.convert import convert
    from pyflashmoe.convert.recipes import RECIPES
    from pyflashmoe.eval import DEMO_MODEL
    todo = dict(BITS_DIRS)
    todo.update({f"recipe {n}": dict(recipe=n) for n in RECIPES})
    out = {}
    os.makedirs(work, exist_ok=True)
    for name, kw in todo.items():
        d = os.path.join(work, name.replace(" ", "-"))
        if not os.path.isfile(os.path.join(d, "pyflashmoe.json")):
            t0 = time.time()
            convert(ckpt, d, progress=False, force=True, **kw)
            print(f"demo_eval_all: converted {name} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
        out[name] = d
    out["embedded demo (q4, dense 8)"] = DEMO_MODEL
    return out


def describe(path):
    """'experts / dense' formats of a dir from its manifest: '4 / 16', '2g32+4 / 8+bf16'."""
    from pyflashmoe.format import read_manifest
    q = read_manifest(path)["quantization"]

    def fmts(e):
        fs = e.get("formats") or [e]
        return "+".join("bf16" if f.get("bits") == 16 else f"{f['bits']}"
                        + (f"g{f['group_size']}" if f.get("group_size") not in (None, 64) else "")
                        for f in fs)
    return f"{fmts(q['experts'])} / {fmts(q['dense'])}"


def markdown(res, names):
    ks = sorted({r["k"] for r in res["runs"].values()})
    ref = res["reference"]
    head = (["model dir", "experts / dense bits", "bpw", "MB"] + [f"ppl K={k}" for k in ks]
            + [f"KLD K={k}" for k in ks] + [f"p99 KLD K={k}" for k in ks]
            + ["top-1 agree K=" + " / ".join(map(str, ks))])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    n = len(ks)
    rows.append("| bf16 checkpoint (transformers, the reference) | 16 / 16 | 16 | "
                f"{ref['size_mb']:.1f} | " + " | ".join(
                    f"{ref['ppl']:.2f} ± {ref['ppl_se']:.2f}" if k == ref.get("k") else "" for k in ks)
                + " | " + " | ".join("0" if k == ref.get("k") else "" for k in ks)
                + " | " + " | ".join("0" if k == ref.get("k") else "" for k in ks)
                + f" | 100% at K={ref.get('k')} |")
    for name, path in names.items():
        rs = {k: res["runs"].get(f"{name}|{k}") for k in ks}
        if not any(rs.values()):
            continue
        r0 = next(r for r in rs.values() if r)
        def cell(k, f, rs=rs):
            return f(rs[k]) if rs[k] else "…"
        rows.append(f"| {name} | {describe(path)} | {r0['bpw']:.2f} | {r0['size_bytes'] / 1e6:.1f} | "
                    + " | ".join(cell(k, lambda r: f"{r['ppl']:.2f}") for k in ks) + " | "
                    + " | ".join(cell(k, lambda r: f"{r['kld_mean']:.4f}") for k in ks) + " | "
                    + " | ".join(cell(k, lambda r: f"{r['kld_p99']:.3f}") for k in ks) + " | "
                    + " / ".join(cell(k, lambda r: f"{100 * r['top1_agreement']:.1f}%") for k in ks) + " |")
    assert n == len(ks)
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-out", default=os.path.join(ROOT, "demo_out"),
                   help="holds ckpt/ (bf16 checkpoint + tokenizer) and corpus/heldout.txt")
    p.add_argument("--out", default="demo_eval_all_out", help="results.json, table.md, ref_all.npz.xz")
    p.add_argument("--work", default=None, help="converted model dirs (default: /tmp/demo_eval_all_dirs)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ref-device", default=None, help="torch device of the bf16 reference (cpu, cuda)")
    p.add_argument("--k", default="2,4,8")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (tests)")
    p.add_argument("--no-build", action="store_true", help="use the extension as built (a second call)")
    a = p.parse_args(argv)
    t_start = time.time()
    if not a.no_build:
        ensure_core("cuda" if a.backend == "cuda" else "cpu")
    from pyflashmoe.errors import FlashMoEError
    from pyflashmoe.eval import evaluate, parse_k_list
    ckpt = os.path.join(a.demo_out, "ckpt")
    text = os.path.join(a.demo_out, "corpus", "heldout.txt")
    for f in (os.path.join(ckpt, "config.json"), text):
        if not os.path.isfile(f):
            sys.exit(f"demo_eval_all: {f}: missing (carry demo_out/ckpt and demo_out/corpus/heldout.txt)")
    os.makedirs(a.out, exist_ok=True)
    work = a.work or "/tmp/demo_eval_all_dirs"
    names = model_dirs(ckpt, work)
    res_path = os.path.join(a.out, "results.json")
    tag = {"max_tokens": a.max_tokens, "text": os.path.abspath(text)}
    res = {"tag": tag, "reference": None, "runs": {}}
    if os.path.isfile(res_path):
        with open(res_path) as f:
            old = json.load(f)
        if old.get("tag") == tag:
            res = old
    # the saved reference (exact: hidden states + lm_head, ~40 MB for all windows) stays beside the dirs
    ref_file = os.path.join(work, "ref_all.npz.xz" if a.max_tokens is None else f"ref_{a.max_tokens}.npz.xz")

    def save():
        with open(res_path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(res_path + ".tmp", res_path)

    if res["reference"] is None or not os.path.isfile(ref_file):
        r = evaluate(text=text, ref=ckpt, max_tokens=a.max_tokens, save_ref=ref_file, threads=a.threads,
                     ref_device=a.ref_device, quiet=True)
        size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        res["reference"] = dict(r["reference"], size_mb=size / 1e6, config=r["config"],
                                device=a.ref_device or "cpu")
        save()
        print(f"demo_eval_all: bf16 reference: ppl {r['reference']['ppl']:.4f} over {r['config']['tokens']} "
              f"tokens ({r['config']['windows']} windows), {r['reference']['seconds']:.0f} s", flush=True)
    errors = {}
    for name, d in names.items():        # one evaluate per dir: the reference is loaded once for its Ks
        ks = [k for k in parse_k_list(a.k) if f"{name}|{k}" not in res["runs"]]
        if not ks:
            continue
        try:
            got = evaluate(models=[d], ref=ref_file, ks=ks, threads=a.threads, backend=a.backend, quiet=True,
                           log=lambda m: None)["results"]
        except FlashMoEError as e:       # one dir the backend refuses must not lose the others
            print(f"demo_eval_all: {name}: error: {e}", flush=True)
            errors[name] = str(e)
            continue
        for r in got:
            r["model"] = name
            r["backend"] = a.backend
            res["runs"][f"{name}|{r['k']}"] = r
            print(f"demo_eval_all: {name:30s} K={r['k']} ppl {r['ppl']:.3f} KLD {r['kld_mean']:.5f} "
                  f"p99 {r['kld_p99']:.4f} top-1 {100 * r['top1_agreement']:.2f}% ({r['seconds']:.0f} s)",
                  flush=True)
        save()
    md = markdown(res, names)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md + "\n")
    cfg = res["reference"]["config"]
    print(f"\n{cfg['tokens']} scored tokens, {cfg['windows']} windows of {cfg['ctx']} "
          f"(backend {a.backend}, reference on {res['reference']['device']}), {time.time() - t_start:.0f} s\n")
    print(md)
    for name, e in errors.items():
        print(f"\nnot evaluated: {name}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
