"""The CUDA backend's comparison switches from the environment (FM_CUDA_*), read once per model load.

The C core reads no environment: its switches are `fm_debug_params` (csrc/fm.h), passed as
`Engine(debug={...})` and changed between evals with `Engine.set_debug(...)`. This module maps the
environment variables that users and the benchmarks set onto that dict; `Model.load` and
`flashmoe bench` call it where they build the Engine. An unset or empty variable keeps the default;
a bad value raises ArgumentError naming the variable.

| variable | switch | values |
|---|---|---|
| FM_CUDA_GRAPH | cuda_graph | 1 (default): resident decode as one CUDA graph; 0: plain launches |
| FM_CUDA_TIMING | cuda_timing | 0 (default); 1: a sync after every op, time charged to the stats |
| FM_CUDA_MMA | cuda_mma | 1 (default): prefill on tensor cores; 0: the fp32 kernels |
| FM_CUDA_GDN_CHUNK | gdn_chunk | chunked GatedDeltaNet from this many tokens on (default 4); 0: never |
| FM_CUDA_CPU_SPLIT | cpu_split | auto (default), 0 (off) or a fraction in (0, 1] of the missed experts |
"""
from __future__ import annotations

import math
import os

from pyflashmoe.errors import ArgumentError

ENV_SWITCHES = {
    "FM_CUDA_GRAPH": "cuda_graph",
    "FM_CUDA_TIMING": "cuda_timing",
    "FM_CUDA_MMA": "cuda_mma",
    "FM_CUDA_GDN_CHUNK": "gdn_chunk",
    "FM_CUDA_CPU_SPLIT": "cpu_split",
}


def _flag(var: str, v: str) -> int:
    if v not in ("0", "1"):
        raise ArgumentError(f"{var}={v!r}: expected 0 or 1")
    return int(v)


def debug_from_env(environ=None) -> dict:
    """The debug switches set by FM_CUDA_* variables of `environ` (default os.environ), as a dict for
    Engine(debug=...); only the variables that are set (and not empty) appear."""
    env = os.environ if environ is None else environ
    out = {}
    for var, key in ENV_SWITCHES.items():
        v = env.get(var)
        if v is None or not v.strip():
            continue
        v = v.strip()
        if key == "gdn_chunk":
            try:
                n = int(v, 10)
            except ValueError:
                n = -1
            if n < 0 or n >= 2 ** 31:
                raise ArgumentError(f"{var}={v!r}: expected an integer >= 0 (0: never chunked)")
            out[key] = n
        elif key == "cpu_split":
            if v.lower() == "auto":
                out[key] = -1.0
                continue
            try:
                f = float(v)
            except ValueError:
                f = math.nan
            if not 0.0 <= f <= 1.0:
                raise ArgumentError(f"{var}={v!r}: expected auto, 0 or a fraction in (0, 1]")
            out[key] = f
        else:
            out[key] = _flag(var, v)
    return out
