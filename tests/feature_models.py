"""Rewrite a converted model dir into one that uses the spec's model features (tests only).

`rebuild(src, dst, spec=..., layers=..., dense=..., parts=..., part_bias=...)` copies the model dir
`src` (bf16 or f32 experts) to `dst` with:
  spec       {key: value} merged into the manifest's spec (router, expert_act, ...)
  layers     {key: value} merged into every spec.layers[i] (sliding_window, attn_sinks)
  dense      {name: float32 array} extra dense tensors stored F32 (blk.i.ffn_router_bias, ...)
  parts      fn(il) -> {"gate"|"up"|"down": ("bf16"|"f32",) or ("affine", bits, group_size)}
  part_bias  fn(il, e, part, rows) -> float32 [rows] or None
  drop       dense tensor names to leave out (blk.i.shexp_router with shared_gate "none")
and returns {(il, e): {part: (float32 weight as the engine sees it, bias or None)}}: the affine
parts dequantized with format.dequantize_affine, bf16 rounded, so a reference model can use them.
dense.safetensors, the expert files, sizes, sha256, block CRCs and the manifest digest are all
rewritten, so format.validate accepts dst.
"""
import copy
import hashlib
import json
import os
import zlib

import numpy as np

from pyflashmoe import format as fmt
from pyflashmoe.quant import quantize


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def _part_bytes(w, kind):
    """-> (manifest fields, {field: bytes}, float32 weight as stored)"""
    if kind[0] == "bf16":
        b = fmt.f32_to_bf16(w)
        return {"dtype": "bf16"}, {"data": b.tobytes()}, fmt.bf16_to_f32(b).reshape(w.shape)
    if kind[0] == "f32":
        w = np.ascontiguousarray(w, np.float32)
        return {"dtype": "f32"}, {"data": w.tobytes()}, w
    _, bits, gs = kind
    q, s, b = quantize(np.ascontiguousarray(w, np.float32), bits, gs)
    deq = fmt.dequantize_affine(q, s, b, bits, gs)
    return ({"dtype": "affine", "bits": bits, "group_size": gs},
            {"q": q.tobytes(), "scales": s.tobytes(), "biases": b.tobytes()}, deq)


def rebuild(src, dst, spec=None, layers=None, dense=None, parts=None, part_bias=None, drop=()):
    md = fmt.ModelDir(src)
    m = copy.deepcopy(md.manifest)
    os.makedirs(os.path.join(dst, "experts"), exist_ok=True)
    m["spec"].update(spec or {})
    for L in m["spec"]["layers"]:
        L.update(layers or {})
    # dense: every tensor as it was, then the new F32 ones
    dense = dense or {}
    entries, blobs = [], {}
    for name in drop:
        del m["tensors"][name]
    for name, e in md.manifest["tensors"].items():
        if name in drop:
            continue
        assert e["dtype"] in ("bf16", "f32"), "rebuild reads unquantized dense tensors only"
        raw = np.ascontiguousarray(md.dense_raw(name))
        entries.append((name, fmt.MANIFEST_DTYPE[e["dtype"]], e["shape"], raw.nbytes))
        blobs[name] = raw
    for name, a in dense.items():
        a = np.ascontiguousarray(a, np.float32)
        entries.append((name, "F32", list(a.shape), a.nbytes))
        blobs[name] = a
        m["tensors"][name] = {"dtype": "f32", "shape": list(a.shape)}
    dp = os.path.join(dst, fmt.DENSE_FILE)
    w = fmt.SafetensorsWriter(dp, entries, {"format": fmt.FORMAT_NAME})
    for name, *_ in entries:
        w.write(name, blobs[name])
        m["tensors"][name]["offset"] = w.offsets[name]
        m["tensors"][name]["nbytes"] = int(blobs[name].nbytes)
    w.close()
    files = {fmt.DENSE_FILE: _sha(dp)}
    seen, formats = {}, []
    for k, L in sorted(m["experts"]["layers"].items(), key=lambda kv: int(kv[0])):
        il = int(k)
        kinds = (parts or (lambda i: {}))(il)
        ne = L["n_experts"]
        layout, blocks = {}, []
        for e in range(ne):
            ws = md.expert(il, e)
            pos, blk, lay = 0, {}, {}
            seen[(il, e)] = {}
            for pn in ("gate", "up", "down"):
                kind = kinds.get(pn, (L["parts"][pn]["dtype"],))
                fields, data, deq = _part_bytes(ws[pn], kind)
                ent = dict(fields, shape=list(ws[pn].shape))
                bias = part_bias(il, e, pn, ws[pn].shape[0]) if part_bias else None
                if bias is not None:
                    data["bias"] = np.ascontiguousarray(bias, np.float32).tobytes()
                for fk, b in data.items():
                    pos = fmt.align(pos, fmt.PART_ALIGN)
                    ent[fk] = [pos, len(b)]
                    blk[pos] = b
                    pos += len(b)
                lay[pn] = ent
                seen[(il, e)][pn] = (deq, None if bias is None else np.asarray(bias, np.float32))
            layout = lay
            blocks.append((blk, pos))
        bb = fmt.align(max(p for _, p in blocks), fmt.PAGE)
        rel = L["file"]
        p = os.path.join(dst, rel)
        hdr = fmt.expert_file_header(ne, bb)
        crcs = []
        with open(p, "wb") as f:
            f.write(hdr)
            for blk, _ in blocks:
                buf = bytearray(bb)
                for off, b in blk.items():
                    buf[off:off + len(b)] = b
                crcs.append(zlib.crc32(buf) & 0xFFFFFFFF)
                f.write(buf)
        L.update(parts=layout, block_bytes=bb, data_offset=len(hdr), block_crc32=crcs)
        files[rel] = _sha(p)
        for pe in layout.values():
            f = ({"bits": pe["bits"], "group_size": pe["group_size"]} if pe["dtype"] == "affine"
                 else {"bits": 16 if pe["dtype"] == "bf16" else 32})
            if f not in formats:
                formats.append(f)
    # quantization.experts: the first format, and the list of all when the parts differ
    m["quantization"]["experts"] = dict(formats[0], **({"formats": formats} if len(formats) > 1 else {}))
    for name in os.listdir(src):   # tokenizer, config: as they were
        if os.path.isfile(os.path.join(src, name)) and name != fmt.MANIFEST and name not in files:
            with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
                b.write(a.read())
    for rel in m["files"]:
        if rel not in files:
            files[rel] = _sha(os.path.join(dst, rel))
    m["files"] = files
    fmt.write_manifest(dst, m)
    json.loads(open(os.path.join(dst, fmt.MANIFEST)).read())
    return seen
