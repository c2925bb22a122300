"""Malformed copies of a model dir for the sanitizer sweep (tools/sanitize.sh).

    python tools/san_mutants.py MODEL_DIR OUT_DIR [--max N]

Writes OUT_DIR/<name>/ for each mutant: pyflashmoe.json with ONE field changed (a spec number, a
tensor's shape / dtype / bits / group_size / offset / nbytes, an expert layer's block layout, ...),
the data files symlinked to the original. Prints the mutant dirs, one a line. tools/san_driver
--mutant opens each in its own process: a clean FM_ERR_FORMAT is the expected answer, a sanitizer
report or a crash is a finding. Numbers are chosen at the edges: 0, -1, 2**31, 2**64, 1e300,
fractions, odd offsets (misaligned data), offsets past the end of the file.
"""
import copy
import json
import os
import sys

EDGE = [0, -1, 1, 3, 2 ** 31, 2 ** 31 - 1, 2 ** 63, 2 ** 64, 1e300, -1e300, 0.5, "x", None]


def main():
    args = sys.argv[1:]
    mx = 10 ** 9
    if "--max" in args:
        i = args.index("--max")
        mx = int(args[i + 1])
        del args[i:i + 2]
    src, out = os.path.abspath(args[0]), os.path.abspath(args[1])
    base = json.load(open(os.path.join(src, "pyflashmoe.json")))
    muts = []  # (name, manifest)

    def add(name, fn):
        m = copy.deepcopy(base)
        try:
            fn(m)
        except (KeyError, IndexError, TypeError):
            return
        muts.append((name, m))

    def setp(path, v):
        def fn(m):
            o = m
            for k in path[:-1]:
                o = o[k]
            if v is _DEL:
                del o[path[-1]]
            else:
                o[path[-1]] = v
        return fn

    # top level
    add("format", setp(["format"], "gguf"))
    add("format_version", setp(["format_version"], 2))
    add("no_tensors", setp(["tensors"], _DEL))
    add("dense_size", setp(["files", "dense.safetensors", "size"], 1))
    # spec numbers
    for k, v in list(base["spec"].items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for e in EDGE:
                add(f"spec.{k}={e}", setp(["spec", k], e))
            add(f"spec.{k}=del", setp(["spec", k], _DEL))
    add("spec.layers=short", lambda m: m["spec"]["layers"].pop())
    add("spec.layers=attn", setp(["spec", "layers", 0, "attn"], "sliding"))
    add("spec.layers=flip", lambda m: m["spec"]["layers"][0].update(
        attn="full" if m["spec"]["layers"][0]["attn"] == "linear" else "linear"))
    add("spec.layers=dense", setp(["spec", "layers", 0, "ffn"], "dense"))
    add("spec.arch", setp(["spec", "arch"], "llama"))
    # tensors: the first few of each dtype
    seen = {}
    for name, t in base["tensors"].items():
        dt = t.get("dtype")
        if seen.get(dt, 0) >= 3 and not name.startswith("blk.0."):
            continue
        seen[dt] = seen.get(dt, 0) + 1
        T = ["tensors", name]
        for e in (0, 1, 2 ** 31, 2 ** 62, 1e300):
            add(f"{name}.shape0={e}", lambda m, e=e, n=name: m["tensors"][n]["shape"].__setitem__(0, e))
        add(f"{name}.shape=3d", lambda m, n=name: m["tensors"][n]["shape"].append(1))
        add(f"{name}.shape=1d", lambda m, n=name: m["tensors"][n].__setitem__("shape", m["tensors"][n]["shape"][-1:]))
        for d in ("bf16", "f32", "affine", "int8"):
            if d != dt:
                add(f"{name}.dtype={d}", setp(T + ["dtype"], d))
        if dt == "affine":
            for f in ("bits", "group_size"):
                for e in (0, 1, 7, 16, 32, 256, 2 ** 31, 2 ** 40, 1e300, -1e300, 0.5, None):
                    add(f"{name}.{f}={e}", setp(T + [f], e))
            for f in ("q", "scales", "biases"):
                o, n = t[f]
                for off in (o + 1, o + 2, -1, 2 ** 40, 2 ** 64, 1e300):
                    add(f"{name}.{f}.off={off}", setp(T + [f, 0], off))
                for nb in (n - 1, n + 1, 0, 2 ** 64):
                    add(f"{name}.{f}.nbytes={nb}", setp(T + [f, 1], nb))
        else:
            o, n = t["offset"], t["nbytes"]
            for off in (o + 1, o + 2, -1, 2 ** 40, 2 ** 64, 1e300, base["files"]["dense.safetensors"]["size"]):
                add(f"{name}.off={off}", setp(T + ["offset"], off))
            for nb in (n - 1, n + 1, 0, 2 ** 64):
                add(f"{name}.nbytes={nb}", setp(T + ["nbytes"], nb))
    # experts
    layers = base.get("experts", {}).get("layers", {})
    for il in list(layers)[:1]:
        L = ["experts", "layers", il]
        for f in ("n_experts", "block_bytes", "data_offset"):
            for e in (0, -1, 4096, 4097, 2 ** 31, 2 ** 62, 2 ** 64, 1e300, 4096 * 10 ** 6):
                add(f"experts.{il}.{f}={e}", setp(L + [f], e))
        add(f"experts.{il}.file=..", setp(L + ["file"], "../x"))
        add(f"experts.{il}.file=missing", setp(L + ["file"], "experts/none"))
        add(f"experts.{il}=del", setp(L, _DEL))
        for p, P in layers[il]["parts"].items():
            PP = L + ["parts", p]
            for d in ("bf16", "f32", "affine"):
                if d != P.get("dtype"):
                    add(f"experts.{il}.{p}.dtype={d}", setp(PP + ["dtype"], d))
            if P.get("dtype") == "affine":
                for f in ("bits", "group_size"):
                    for e in (0, 7, 16, 256, 2 ** 40, 1e300):
                        add(f"experts.{il}.{p}.{f}={e}", setp(PP + [f], e))
                for f in ("q", "scales", "biases"):
                    for off in (P[f][0] + 2, P[f][0] + 4, layers[il]["block_bytes"], 2 ** 64, 1e300):
                        add(f"experts.{il}.{p}.{f}.off={off}", setp(PP + [f, 0], off))
            for e in (0, 2 ** 31, 1e300):
                add(f"experts.{il}.{p}.shape0={e}", lambda m, e=e, PP=PP: _get(m, PP)["shape"].__setitem__(0, e))
    os.makedirs(out, exist_ok=True)
    dirs = []
    for i, (name, m) in enumerate(muts[:mx]):
        d = os.path.join(out, f"m{i:04d}")
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if f != "pyflashmoe.json" and not os.path.exists(os.path.join(d, f)):
                os.symlink(os.path.join(src, f), os.path.join(d, f))
        with open(os.path.join(d, "pyflashmoe.json"), "w") as fh:
            json.dump(m, fh)
        with open(os.path.join(d, "MUTATION"), "w") as fh:
            fh.write(name + "\n")
        dirs.append(d)
    print("\n".join(dirs))


class _Del:
    pass


_DEL = _Del()


def _get(m, path):
    for k in path:
        m = m[k]
    return m


if __name__ == "__main__":
    main()
