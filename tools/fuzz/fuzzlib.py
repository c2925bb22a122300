"""Shared pieces of the pyflashmoe fuzz targets (atheris): a structure-aware JSON mutator, the
oracle's exception policy, and the tiny model dirs the manifest target loads.

Oracle everywhere: a reader may raise only pyflashmoe project errors (FlashMoEError subclasses:
FormatError, ArgumentError, UnsupportedModelError, ModelIOError, ...). Any other exception, a
hang (libFuzzer -timeout) or a memory blow-up (-rss_limit_mb) is a finding.
"""
import copy
import json
import math
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

INTERESTING = [0, -1, 1, 2, 3, 7, 8, 16, 63, 64, 65, 4095, 4096, 4097, 8192, 65536, 65537, 1 << 20,
               (1 << 31) - 1, 1 << 31, 1 << 32, 1 << 53, (1 << 63) - 1, 1 << 63, 1 << 64, 10 ** 30,
               10 ** 400, -(1 << 63), 1e9, 1.5, 0.5, -0.0, 1e-300, 1e308, float("inf"), float("-inf"),
               float("nan"), True, False, None, "", "x", "bf16", "f32", "affine", "U8", "F32", "BF16",
               "full", "linear", "moe", "dense", "qwen3_moe", "qwen3_next", "qwen3_5_moe",
               "../../../../etc/passwd", "/etc/passwd", "experts/../dense.safetensors",
               "dense.safetensors", "experts/L000.safetensors", "\udc80", "a\x00b", [], {}, [0, 0],
               [4096, 4096], [[[]]], {"a": 1}]


def _paths(obj, limit=20000):
    """[(container, key)] of every value inside obj (breadth-first, bounded)."""
    out, todo = [], [obj]
    while todo and len(out) < limit:
        c = todo.pop()
        items = c.items() if isinstance(c, dict) else enumerate(c)
        for k, v in items:
            out.append((c, k))
            if isinstance(v, (dict, list)):
                todo.append(v)
    return out


def _new_value(v, rnd, pool):
    r = rnd.random()
    if isinstance(v, bool) or v is None:
        return rnd.choice(INTERESTING)
    if isinstance(v, int) and r < 0.6:
        return rnd.choice([v + 1, v - 1, v * 2, v // 2, -v, v + 4096, v - 4096, v + 64, v - 64,
                           v + 1 << rnd.randint(1, 40), float(v), str(v), [v], v ^ (1 << rnd.randint(0, 62))])
    if isinstance(v, float) and r < 0.6:
        return rnd.choice([v * 10, v / 10, -v, v + 1, int(v) if math.isfinite(v) else 0, 0.0, str(v)])
    if isinstance(v, str) and r < 0.5 and v:
        i = rnd.randrange(len(v))
        return rnd.choice([v[:i], v + v, v[:i] + chr(rnd.randint(0, 0x7F)) + v[i + 1:], v.upper(), "../" + v])
    if isinstance(v, list) and v and r < 0.5:
        v = list(v)
        op = rnd.randrange(4)
        if op == 0:
            del v[rnd.randrange(len(v))]
        elif op == 1:
            v.append(rnd.choice(v))
        elif op == 2:
            v = v * rnd.randint(2, 3)
        else:
            rnd.shuffle(v)
        return v
    if r < 0.8 and pool:
        c, k = rnd.choice(pool)          # a value from elsewhere in the document (copied: no cycles)
        return copy.deepcopy(c[k])
    return rnd.choice(INTERESTING)


def mutate_obj(obj, rnd):
    pool = _paths(obj)
    if not pool:
        return rnd.choice(INTERESTING)
    c, k = rnd.choice(pool)
    op = rnd.random()
    if op < 0.08:                                    # delete
        del c[k]
    elif op < 0.12 and isinstance(c, dict):          # rename a key
        v = c.pop(k)
        c[rnd.choice([k + "x", k.upper(), "", k[:-1], str(rnd.randint(0, 99))])] = v
    elif op < 0.16 and isinstance(c, dict):          # add a key
        c[rnd.choice([k + "_", "__metadata__", "block_crc32", "manifest_sha256", "text_config",
                      "layer_types", "mlp_only_layers", "rope_parameters"])] = _new_value(c[k], rnd, pool)
    elif op < 0.22:                                  # swap two values
        c2, k2 = rnd.choice(pool)
        try:
            c[k], c2[k2] = copy.deepcopy(c2[k2]), copy.deepcopy(c[k])
        except (KeyError, IndexError):
            pass
    else:
        c[k] = _new_value(c[k], rnd, pool)
    return obj


def mutate_json_bytes(data, max_size, seed, fallback):
    """Structure-aware mutation of a JSON document; `fallback(data, max_size)` for byte-level."""
    rnd = random.Random(seed)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        obj = None
    if obj is None or not isinstance(obj, (dict, list)) or rnd.random() < 0.05:
        return fallback(data, max_size)
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        try:
            obj = mutate_obj(obj, rnd)
        except Exception:    # the mutator's own arithmetic (huge ints, ...); not a finding
            break
    try:
        out = json.dumps(obj, separators=(",", ":") if rnd.random() < 0.5 else None).encode("utf-8", "surrogatepass")
    except Exception:
        return fallback(data, max_size)
    if len(out) > max_size:
        return fallback(data, max_size)
    return out


def project_error():
    from pyflashmoe.errors import FlashMoEError
    return FlashMoEError


def model_dirs(base=None):
    """Tiny converted model dirs for the manifest target, built once (in a subprocess, so the
    fuzzed process imports pyflashmoe only under atheris instrumentation) and cached."""
    base = base or os.environ.get("FLASHMOE_FUZZ_MODELS", "/tmp/flashmoe-fuzz-models")
    names = ("next4", "moe16")
    if not all(os.path.isfile(os.path.join(base, n, "pyflashmoe.json")) for n in names):
        subprocess.run([sys.executable, os.path.join(HERE, "build_models.py"), base], check=True)
    return [os.path.join(base, n) for n in names]


def fast_tmp():
    """A RAM-backed temp dir when there is one (every execution rewrites a file)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
