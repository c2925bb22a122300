"""Pick mixed-precision recipes by measured KLD per bits per weight (issue 11 item 5).

Converts the bf16 demo checkpoint with every uniform setting (experts at N bits with bf16 dense,
with 8-bit dense, and every weight matrix at N bits) and with candidate mixes, evaluates each with
`flashmoe eval` against a saved bf16 reference at each K, writes the results as JSON and draws
KLD against bits per weight (uniform lines per K, recipe points):

    python bench/recipe_sweep.py --ckpt demo_out/ckpt --ref ref64.npz.xz --out sweep \\
        --k 2,4,8 --json bench/recipe_sweep.json --plot bench/demo_recipes_kld_bpw.svg

A candidate beats uniform bits when its KLD is below the lower envelope of the uniform curves
(at the same K) interpolated at its bpw (linear in bpw, log in KLD); `verdicts` in the JSON.
`--plot-only FILE.json` redraws from saved results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BITS = (2, 3, 4, 5, 6, 8)
DENSE8 = ("*=8", "router=bf16")

# uniform families: name -> (label, {N: convert kwargs})
UNIFORM = {
    "u": ("experts N-bit, dense bf16", {n: dict(bits=n) for n in BITS}),
    "ud8": ("experts N-bit, dense 8-bit", {n: dict(bits=n, dense_bits=8) for n in BITS}),
    "uall": ("every matrix N-bit (routers bf16)",
             {n: dict(bits=n, quant=(f"*={n}", "router=bf16")) for n in BITS}),
}

# candidate mixes: name -> --quant rules (the shipped recipes are pyflashmoe.convert.recipes.RECIPES)
CANDIDATES = {
    "gu2g32-d4": DENSE8 + ("experts.{gate,up}=2:g32", "experts.down=4"),
    "gu2-d4": DENSE8 + ("experts.{gate,up}=2", "experts.down=4"),
    "gu2g32-d3": DENSE8 + ("experts.{gate,up}=2:g32", "experts.down=3"),
    "gu2g32-d3g32": DENSE8 + ("experts.{gate,up}=2:g32", "experts.down=3:g32"),
    "gu3-d4": DENSE8 + ("experts.{gate,up}=3", "experts.down=4"),
    "gu3-d5": DENSE8 + ("experts.{gate,up}=3", "experts.down=5"),
    "gu3g32-d4": DENSE8 + ("experts.{gate,up}=3:g32", "experts.down=4"),
    "gu4-d5": DENSE8 + ("experts.{gate,up}=4", "experts.down=5"),
    "gu4-d6": DENSE8 + ("experts.{gate,up}=4", "experts.down=6"),
    "gu3-d4-ends6": DENSE8 + ("experts.{gate,up}=3", "experts.down=4", "blk.{0,7}.experts.*=6"),
    "gu3-d4-dense6": ("*=6", "router=bf16", "experts.{gate,up}=3", "experts.down=4"),
    "gu2g32-d4-dense6": ("*=6", "router=bf16", "experts.{gate,up}=2:g32", "experts.down=4"),
    "gu2-d4-dense6": ("*=6", "router=bf16", "experts.{gate,up}=2", "experts.down=4"),
    "gu2-d3-dense6": ("*=6", "router=bf16", "experts.{gate,up}=2", "experts.down=3"),
    "gu3-d3-dense6": ("*=6", "router=bf16", "experts.{gate,up}=3", "experts.down=3"),
    "gu3-d4-dense5": ("*=5", "router=bf16", "experts.{gate,up}=3", "experts.down=4"),
    "gu4-d6-dense6": ("*=6", "router=bf16", "experts.{gate,up}=4", "experts.down=6"),
    "gu4-d5-dense6": ("*=6", "router=bf16", "experts.{gate,up}=4", "experts.down=5"),
    "gu3-d4-dense6-ends6": ("*=6", "router=bf16", "experts.{gate,up}=3", "experts.down=4",
                            "blk.{0,7}.experts.*=6"),
}


def nominal_bpw(d):
    """Bits per weight of a dir's formats, without the file layout: affine b-bit group g = b + 32/g
    (a bf16 scale and bias per group), bf16 16, f32 32. The file bpw (`flashmoe eval`) also counts
    the padding of each expert block to a multiple of 4096 bytes: up to ~15% on the demo's 21-24 KB
    experts, noise (< 0.1%) on real models' MB-sized ones."""
    from pyflashmoe.format import read_manifest
    man = read_manifest(d)
    bits = params = 0

    def add(e, n):
        nonlocal bits, params
        params += n
        bits += n * ({"bf16": 16, "f32": 32}.get(e["dtype"]) or (e["bits"] + 32 / e["group_size"]))
    for e in man["tensors"].values():
        n = 1
        for x in e["shape"]:
            n *= x
        add(e, n)
    for L in man["experts"]["layers"].values():
        for pe in L["parts"].values():
            add(pe, pe["shape"][0] * pe["shape"][1] * L["n_experts"])
    return bits / params


def variants(which):
    out = {}
    if "uniform" in which:
        for fam, (_, by) in UNIFORM.items():
            for n, kw in by.items():
                out[f"{fam}{n}"] = kw
    if "candidates" in which:
        for name, rules in CANDIDATES.items():
            out[name] = dict(quant=rules)
    if "recipes" in which:
        from pyflashmoe.convert.recipes import RECIPES
        for name in RECIPES:
            out[f"recipe-{name}"] = dict(recipe=name)
    return out


def interp_log(curve, x):
    """log-linear interpolation of [(bpw, kld)] at x; None outside the curve's span."""
    curve = sorted(curve)
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1 and y0 > 0 and y1 > 0:
            t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def envelope(results, k, x="bpw"):
    """The uniform families' best KLD at each bpw: min over the families' interpolations."""
    curves = []
    for fam in UNIFORM:
        c = [(r[x], r["kld_mean"]) for r in results
             if r["k"] == k and r["name"].startswith(fam) and r["name"][len(fam):].isdigit()]
        if len(c) >= 2:
            curves.append((fam, c))

    def at(x):
        best = None
        for fam, c in curves:
            y = interp_log(c, x)
            if y is not None and (best is None or y < best[1]):
                best = (fam, y)
        return best
    return at


def verdicts(results, x="bpw"):
    """Per candidate and K: its KLD against the uniform envelope at its bpw (`x`: "bpw" = file
    bytes, "bpw_nominal" = the formats' bits)."""
    out = []
    ks = sorted({r["k"] for r in results})
    for k in ks:
        env = envelope(results, k, x)
        for r in results:
            if r["k"] != k or any(r["name"].startswith(f) and r["name"][len(f):].isdigit() for f in UNIFORM):
                continue
            e = env(r[x])
            v = {"name": r["name"], "k": k, x: round(r[x], 3), "kld": r["kld_mean"]}
            if e is None:
                v.update(verdict="outside the uniform curves' bpw range")
            else:
                v.update(uniform_family=e[0], uniform_kld=e[1], ratio=r["kld_mean"] / e[1],
                         verdict="beats uniform" if r["kld_mean"] < e[1] else "does not beat uniform")
            out.append(v)
    return out


def plot_svg(results, path, show=None, measure="bpw", windows=None):
    """KLD (log) against bpw: one panel per K; uniform families as lines, mixes as labelled points."""
    results = [dict(r, bpw=r[measure]) for r in results]
    ks = sorted({r["k"] for r in results})
    PW, PH, L, T, B, R = 420, 360, 60, 30, 45, 30
    W, H = L + len(ks) * (PW + R), T + PH + B + 20
    xs = [r["bpw"] for r in results]
    ys = [r["kld_mean"] for r in results if r["kld_mean"] > 0]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    styles = {"u": ("#1f77b4", ""), "ud8": ("#2ca02c", ""), "uall": ("#7f7f7f", "4,3")}
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
         f'font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>']
    for j, k in enumerate(ks):
        ox = L + j * (PW + R)
        px = lambda x: ox + (x - x0) / (x1 - x0) * PW  # noqa: E731
        py = lambda y: T + (1 - (math.log10(y) - y0) / (y1 - y0)) * PH  # noqa: E731
        s.append(f'<text x="{ox + PW / 2}" y="{T - 10}" text-anchor="middle" font-size="13">K = {k}'
                 + (f" ({windows[k]} held-out windows)" if windows and k in windows else "") + '</text>')
        s.append(f'<rect x="{ox}" y="{T}" width="{PW}" height="{PH}" fill="none" stroke="black"/>')
        for xv in range(x0, x1 + 1):
            s.append(f'<line x1="{px(xv):.1f}" y1="{T}" x2="{px(xv):.1f}" y2="{T + PH}" stroke="#eee"/>')
            s.append(f'<text x="{px(xv):.1f}" y="{T + PH + 14}" text-anchor="middle">{xv}</text>')
        for e in range(y0, y1 + 1):
            yy = py(10 ** e)
            s.append(f'<line x1="{ox}" y1="{yy:.1f}" x2="{ox + PW}" y2="{yy:.1f}" stroke="#ddd"/>')
            if j == 0:
                s.append(f'<text x="{ox - 5}" y="{yy + 4:.1f}" text-anchor="end">{10.0 ** e:g}</text>')
        for fam, (label, _) in UNIFORM.items():
            c = sorted((r["bpw"], r["kld_mean"], r["name"][len(fam):]) for r in results
                       if r["k"] == k and r["name"].startswith(fam) and r["name"][len(fam):].isdigit())
            if not c:
                continue
            col, dash = styles[fam]
            s.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.8" '
                     + (f'stroke-dasharray="{dash}" ' if dash else "") + 'points="'
                     + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in c) + '"/>')
            for x, y, n in c:
                s.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{col}"/>')
                s.append(f'<text x="{px(x) + 3:.1f}" y="{py(y) - 3:.1f}" fill="{col}" font-size="9">{n}</text>')
        for r in results:
            if r["k"] != k or any(r["name"].startswith(f) and r["name"][len(f):].isdigit() for f in UNIFORM):
                continue
            if show is not None and r["name"] not in show:
                continue
            shipped = r["name"].startswith("recipe-")
            col = "#d62728" if shipped else "#ff7f0e"
            x, y = px(r["bpw"]), py(r["kld_mean"])
            s.append(f'<path d="M{x - 4:.1f},{y:.1f} L{x:.1f},{y - 4:.1f} L{x + 4:.1f},{y:.1f} '
                     f'L{x:.1f},{y + 4:.1f} Z" fill="{col}"/>')
            if shipped:
                s.append(f'<text x="{x + 5:.1f}" y="{y + 12:.1f}" fill="{col}" font-size="10">'
                         f'{r["name"][len("recipe-"):]}</text>')
        s.append(f'<text x="{ox + PW / 2}" y="{T + PH + 32}" text-anchor="middle">bits per weight '
                 + ("(whole model dir, file bytes)" if measure == "bpw" else "(whole model, formats' bits)")
                 + '</text>')
    s.append(f'<text x="14" y="{T + PH / 2}" text-anchor="middle" transform="rotate(-90 14 {T + PH / 2})">'
             f'mean KL(bf16 ‖ quantized), nats/token</text>')
    ly = H - 6
    lx = L
    for fam, (label, _) in UNIFORM.items():
        col, dash = styles[fam]
        s.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" stroke="{col}" stroke-width="2"'
                 + (f' stroke-dasharray="{dash}"' if dash else "") + '/>')
        s.append(f'<text x="{lx + 24}" y="{ly}">{label} (N labelled)</text>')
        lx += 24 + 6.2 * len(label + " (N labelled)") + 20
    s.append(f'<path d="M{lx},{ly - 4} l4,-4 l4,4 l-4,4 Z" fill="#d62728"/><text x="{lx + 12}" y="{ly}">'
             f'shipped recipe</text>')
    s.append(f'<path d="M{lx + 120},{ly - 4} l4,-4 l4,4 l-4,4 Z" fill="#ff7f0e"/><text x="{lx + 132}" '
             f'y="{ly}">other candidate</text>')
    s.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(s) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="demo_out/ckpt")
    p.add_argument("--ref", help="saved reference (flashmoe eval --save-ref)")
    p.add_argument("--out", default="sweep", help="dir for the converted model dirs")
    p.add_argument("--which", default="uniform,candidates,recipes")
    p.add_argument("--only", default=None, help="comma list of variant names")
    p.add_argument("--k", default="2,4,8")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--json", default="recipe_sweep.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--plot-only", default=None, metavar="JSON[,JSON]",
                   help="redraw from saved results (several files: e.g. K=4 and K=2,8 runs)")
    p.add_argument("--x", default="bpw_nominal", choices=["bpw", "bpw_nominal"],
                   help="the size measure of the plot and verdicts (default: the formats' bits)")
    p.add_argument("--show", default=None, help="comma list: the candidates the plot shows")
    a = p.parse_args(argv)
    if a.plot_only:
        results, windows = [], {}
        for fn in a.plot_only.split(","):
            with open(fn) as f:
                res = json.load(f)
            for r in res["results"]:
                if "bpw_nominal" not in r:
                    r["bpw_nominal"] = nominal_bpw(os.path.join(a.out, r["name"]))
                windows[r["k"]] = res["config"].get("windows")
            results += res["results"]
        plot_svg(results, a.plot, a.show.split(",") if a.show else None, a.x, windows)
        for x in ("bpw", "bpw_nominal"):
            print(f"-- verdicts by {x}")
            _print_verdicts(verdicts(results, x), x)
        return 0
    from pyflashmoe.convert import convert
    from pyflashmoe.eval import evaluate, parse_k_list
    vs = variants(a.which.split(","))
    if a.only:
        vs = {n: vs[n] for n in a.only.split(",")}
    prev = []
    if os.path.exists(a.json):
        with open(a.json) as f:
            prev = json.load(f).get("results", [])
    results = [r for r in prev if r["name"] not in vs]
    for r in results:
        if "bpw_nominal" not in r:
            r["bpw_nominal"] = nominal_bpw(os.path.join(a.out, r["name"]))
    os.makedirs(a.out, exist_ok=True)
    for name, kw in vs.items():
        d = os.path.join(a.out, name)
        if not os.path.isfile(os.path.join(d, "pyflashmoe.json")):
            convert(a.ckpt, d, progress=False, force=True, **kw)
        t0 = time.time()
        res = evaluate(models=[d], ref=a.ref, ks=a.k, max_tokens=a.max_tokens, threads=a.threads,
                       quiet=True, backend=a.backend, log=lambda m: None)
        for r in res["results"]:
            results.append({"name": name, "bpw_nominal": nominal_bpw(d), "convert": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in kw.items()},
                            **{k: r[k] for k in ("k", "bpw", "size_bytes", "params", "ppl", "ppl_se",
                                                 "delta_ppl", "kld_mean", "kld_p99", "top1_agreement")}})
            print(f"{name:18s} K={r['k']} bpw {r['bpw']:.3f} ppl {r['ppl']:.3f} KLD {r['kld_mean']:.5f} "
                  f"p99 {r['kld_p99']:.4f} top1 {100 * r['top1_agreement']:.2f}% "
                  f"({time.time() - t0:.0f} s)", flush=True)
        with open(a.json + ".tmp", "w") as f:
            json.dump({"config": res["config"], "results": results,
                       "verdicts": verdicts(results, "bpw_nominal"), "verdicts_file_bpw": verdicts(results)},
                      f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    if a.plot:
        plot_svg(results, a.plot, a.show.split(",") if a.show else None, a.x,
                 {k: res["config"]["windows"] for k in parse_k_list(a.k)})
    for x in ("bpw", "bpw_nominal"):
        print(f"-- verdicts by {x}")
        _print_verdicts(verdicts(results, x), x)
    return 0


def _print_verdicts(vs, x):
    for v in vs:
        extra = (f" vs {v['uniform_family']} {v['uniform_kld']:.5f} (x{v['ratio']:.2f})"
                 if "ratio" in v else "")
        print(f"K={v['k']} {v['name']:18s} {x} {v[x]:.2f} KLD {v['kld']:.5f}{extra}: {v['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
