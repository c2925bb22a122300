"""Fuzz target (c): the safetensors header reader and the convert reader's checkpoint parsing.

An input starting with "{" is a model.safetensors.index.json (beside a valid one-tensor shard
"model.safetensors"); any other input is a safetensors file. Runs `format.read_st_header` on the
file and `convert.reader.Checkpoint` on a directory holding it (plus a fixed config.json), then
reads every tensor of at most 1 MiB back. Oracle: only project errors; every accepted tensor lies
inside the file and its byte count matches dtype x shape; reading it back returns that many bytes.

    python tools/fuzz/fuzz_st_header.py -atheris_runs=500000 /tmp/fuzz-work/st_header tools/fuzz/corpus/st_header
"""
import atexit
import json
import os
import random
import shutil
import struct
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzlib  # noqa: E402

with atheris.instrument_imports(include=["pyflashmoe"]):
    from pyflashmoe.models import registry
    registry()   # imports every model family module, instrumented
    from pyflashmoe import format as fmt
    from pyflashmoe.convert.reader import Checkpoint
    from pyflashmoe.errors import FlashMoEError

CONFIG = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 2,
          "num_experts_per_tok": 1, "moe_intermediate_size": 8}
WORK = tempfile.mkdtemp(prefix="fuzz-st-", dir=fuzzlib.fast_tmp())
atexit.register(shutil.rmtree, WORK, True)
ST = os.path.join(WORK, "model.safetensors")
IDX = os.path.join(WORK, "model.safetensors.index.json")
with open(os.path.join(WORK, "config.json"), "w") as f:
    json.dump(CONFIG, f)
_h = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
VALID_SHARD = struct.pack("<Q", len(_h)) + _h + b"\0" * 8


COUNTS = {"header accepted": 0, "header rejected": 0, "checkpoint accepted": 0, "checkpoint rejected": 0}
atexit.register(lambda: print(f"fuzz_st_header: {COUNTS}", file=sys.stderr))


def TestOneInput(data):
    if data[:1] == b"{":
        with open(ST, "wb") as f:
            f.write(VALID_SHARD)
        with open(IDX, "wb") as f:
            f.write(data)
    else:
        if os.path.exists(IDX):
            os.remove(IDX)
        with open(ST, "wb") as f:
            f.write(data)
        size = len(data)
        try:
            st, meta = fmt.read_st_header(ST)
            COUNTS["header accepted"] += 1
        except FlashMoEError:
            st = None
            COUNTS["header rejected"] += 1
        if st is not None:
            for name, (dt, shape, a, b) in st.items():
                n = 1
                for s in shape:
                    n *= s
                if not (8 <= a <= b <= size) or b - a != n * fmt.ST_DTYPES[dt].itemsize:
                    raise AssertionError(f"accepted tensor {name!r} {dt} {shape} [{a}, {b}) in {size} bytes")
            if not isinstance(meta, dict):
                raise AssertionError("metadata is not a dict")
    try:
        ck = Checkpoint(WORK)
    except FlashMoEError:
        COUNTS["checkpoint rejected"] += 1
        return
    COUNTS["checkpoint accepted"] += 1
    try:
        for name, (p, raw, dt, shape, a, b) in ck.tensors.items():
            if b - a > (1 << 20):
                continue
            try:
                arr = ck.read_raw(name)
            except FlashMoEError:
                continue
            if arr.nbytes != b - a:
                raise AssertionError(f"read_raw({name!r}) gave {arr.nbytes} bytes, header says {b - a}")
    finally:
        ck.close()


def _repair(hdr, rest, rnd):
    """Give the (mutated) header consistent data_offsets where dtype and shape allow, and the
    data the length they add up to, so that inputs with odd names, dtypes and shapes get
    accepted and reach the readers past the header checks."""
    try:
        h = json.loads(hdr)
    except (ValueError, RecursionError):
        return hdr, rest
    if not isinstance(h, dict):
        return hdr, rest
    pos = 0
    for e in h.values():
        if not isinstance(e, dict):
            continue
        dt, shape = e.get("dtype"), e.get("shape")
        if not isinstance(dt, str) or dt not in fmt.ST_DTYPES or not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 64 for x in shape):
            continue
        n = fmt.ST_DTYPES[dt].itemsize
        for x in shape:
            n *= x
        if pos + n > (1 << 16):
            continue
        e["data_offsets"] = [pos, pos + n]
        pos += n
    data = (rest * (pos // max(len(rest), 1) + 1))[:pos] if rest else bytes(pos)
    return json.dumps(h).encode(), data


SEEDS = [open(os.path.join(fuzzlib.HERE, "corpus", "st_header", n), "rb").read()
         for n in sorted(os.listdir(os.path.join(fuzzlib.HERE, "corpus", "st_header")))]


def CustomMutator(data, max_size, seed):
    rnd = random.Random(seed)
    if seed % 3 == 0:               # a third of the time restart from a seed file
        data = SEEDS[(seed // 3) % len(SEEDS)]
    if data[:1] == b"{" or len(data) < 8 or rnd.random() < 0.15:
        if data[:1] == b"{":
            return fuzzlib.mutate_json_bytes(data, max_size, seed, atheris.Mutate)
        return atheris.Mutate(data, max_size)
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return atheris.Mutate(data, max_size)
    hdr, rest = data[8:8 + n], data[8 + n:]
    hdr = fuzzlib.mutate_json_bytes(hdr, max(len(hdr) * 2, 64), seed, atheris.Mutate)
    if rnd.random() < 0.5:
        try:
            hdr, rest = _repair(hdr, rest, rnd)
        except Exception:       # the mutator's own problem, not a finding
            pass
    if rnd.random() < 0.2:
        rest = rest[:rnd.randrange(len(rest) + 1)] if rnd.random() < 0.5 else rest + bytes(rnd.randrange(64))
    ln = len(hdr) if rnd.random() < 0.9 else rnd.choice([0, len(hdr) + 1, len(hdr) - 1, 1 << 63, 1 << 40])
    out = struct.pack("<Q", ln % (1 << 64)) + hdr + rest
    return out[:max_size]


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()
