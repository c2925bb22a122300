"""Write tests/data/cpu_logits_before.npz: CPU logits of every case in tests/logits_cases.py,
computed once per SIMD path (FM_SIMD=scalar|avx2|avx512, each in its own process since the path
is chosen at load). Stored: the full float32 logits of the avx2 path (what CI machines run) and
the sha256 of every path's logits, plus the commit they came from.

    python tools/make_logits_fixture.py [--out tests/data/cpu_logits_before.npz]
"""
import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.insert(0, TESTS)

import logits_cases  # noqa: E402

PATHS = ("scalar", "avx2", "avx512")


def child(root, out):
    res = {}
    for name in logits_cases.CASES:
        if (logits_cases.CASES[name][0] == "mlx" and importlib.util.find_spec("mlx_lm") is None
                and not os.path.exists(os.path.join(root, name))):
            continue  # no mlx here: the test reports the case as not compared
        res[name] = logits_cases.logits(logits_cases.build(name, root))
    np.savez(out, **res)


def run_all(root, simd):
    """{case: logits} computed in a child process with FM_SIMD=simd."""
    out = os.path.join(root, f"logits-{simd}.npz")
    env = dict(os.environ, FM_SIMD=simd, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, out], check=True, env=env)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(TESTS, "data", "cpu_logits_before.npz"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    import pyflashmoe._core as core
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    with tempfile.TemporaryDirectory() as root:
        for name in logits_cases.CASES:  # build once, in this process
            logits_cases.build(name, root)
        got = {p: run_all(root, p) for p in PATHS}
    cc = subprocess.run([(sysconfig.get_config_var("CC") or "cc").split()[0], "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    meta = {"commit": commit, "cc": cc, "simd_of_arrays": "avx2", "machine_simd": core.simd_name(),
            "sha256": {p: {k: sha(v) for k, v in got[p].items()} for p in PATHS}}
    np.savez_compressed(a.out, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                        **got["avx2"])
    print(f"wrote {a.out}: {len(got['avx2'])} cases x {len(PATHS)} SIMD paths from {commit[:10]}")


if __name__ == "__main__":
    main()
