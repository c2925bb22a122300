#!/usr/bin/env python3
"""Regenerate what `flashmoe eval` ships for the embedded demo: the held-out text
(`pyflashmoe/demo/heldout.txt.xz`) and the bf16 reference (`pyflashmoe/demo/heldout_ref.npz.xz`:
per scored token the top-k log-probs of the bf16 checkpoint, the exact NLL, the window tokens).

    python tools/demo/make_reference.py --ckpt demo_out/ckpt --text demo_out/corpus/heldout.txt \\
        [--check demo_out/demo-q2 --check pyflashmoe/demo/model ...] [--sweep-top-k 8,16,32,64]

The reference file holds, per scored token, the checkpoint's final hidden state (the lm_head input)
in fp16, plus the bf16 lm_head once: `flashmoe eval` recomputes the exact log-probs from them.
The checkpoint runs through transformers (bf16 weights, fp32 compute, CPU), on the same windows
`flashmoe eval` scores (non-overlapping windows of --ctx tokens, the second half of each scored).
--check DIR compares, for that model dir at its own K, the exact KL divergence (full bf16
log-probs) with the one `flashmoe eval` computes from the saved top-k file, for each --sweep-top-k
and for the shipped file, and prints one JSON line each (sizes, KLD exact vs approximate).
"""
import argparse
import json
import lzma
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)

from pyflashmoe import eval as ev  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "demo_out", "ckpt"))
    ap.add_argument("--text", default=os.path.join(ROOT, "demo_out", "corpus", "heldout.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "pyflashmoe", "demo"))
    ap.add_argument("--ctx", type=int, default=ev.DEFAULT_CTX)
    ap.add_argument("--max-tokens", type=int, default=4080,
                    help="scored tokens in the shipped reference (default 4080: the first 16 windows)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", action="append", default=[], help="model dir to measure the KLD error on")
    ap.add_argument("--sweep-top-k", default="", help="also measure these top-k (comma list)")
    a = ap.parse_args()

    raw = ev.read_text(a.text)
    data = raw.encode("utf-8")
    txt_out = os.path.join(a.out, "heldout.txt.xz")
    with lzma.open(txt_out, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(data)
    print(json.dumps({"file": txt_out, "bytes": os.path.getsize(txt_out), "text_bytes": len(data),
                      "text_sha256": ev._sha256(data)}), flush=True)

    from pyflashmoe.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(a.ckpt).encode(raw)
    windows, total = ev.make_windows(ids, a.ctx, a.max_tokens)
    t0 = time.time()
    src = ev._HFSource(a.ckpt, a.threads)
    meta = {"source": "demo bf16 HF checkpoint (transformers, fp32 compute)", "source_kind": "hf",
            "n_vocab": int(src.n_vocab), "k": src.k, "text_sha256": ev._sha256(data),
            "tokenizer_sha256": ev._tokenizer_digest(a.ckpt), "created_by": "tools/demo/make_reference.py"}
    ref = ev.compute_reference(src, windows, total, exact=True, meta=meta)
    src.close()
    print(json.dumps({"reference": a.ckpt, "tokens": total, "windows": int(windows.shape[0]),
                      "ppl": ref.ppl, "seconds": round(time.time() - t0, 1)}), flush=True)
    ref_out = os.path.join(a.out, "heldout_ref.npz.xz")
    size = ev.save_reference(ref, ref_out)
    print(json.dumps({"file": ref_out, "bytes": size, "payload": "hidden"}), flush=True)

    sweep = sorted({int(x) for x in a.sweep_top_k.split(",") if x.strip()})
    approx = {}
    with tempfile.TemporaryDirectory() as td:
        for k in sweep:
            p = os.path.join(td, f"ref{k}.npz.xz")
            approx[k] = (ev.save_reference(ref, p, top_k=k, payload="topk"), ev.load_reference(p))
        approx["shipped"] = (size, ev.load_reference(ref_out))
    tgt = ev._targets(windows, total)
    for d in a.check:
        src = ev._DirSource(d, None, a.threads, a.ctx)
        kl_exact = np.empty(total)
        kinds = sweep + ["shipped"]
        kl_apx = {k: np.empty(total) for k in kinds}
        for pos, lq in ev.iter_rows(src, windows, total):
            n = len(lq)
            _, kl_exact[pos:pos + n], _ = ev.token_metrics(lq, ref, pos, tgt[pos:pos + n])
            for k in kinds:
                _, kl_apx[k][pos:pos + n], _ = ev.token_metrics(lq, approx[k][1], pos, tgt[pos:pos + n])
        src.close()
        for k in kinds:
            e, x = kl_exact, kl_apx[k]
            print(json.dumps({"dir": d, "saved_as": "hidden+lm_head (shipped)" if k == "shipped" else f"top-{k}",
                              "ref_bytes": approx[k][0],
                              "kld_mean_exact": round(float(e.mean()), 6),
                              "kld_mean_topk": round(float(x.mean()), 6),
                              "rel_err_mean": round(float((x.mean() - e.mean()) / e.mean()), 4),
                              "kld_p99_exact": round(float(np.percentile(e, 99)), 5),
                              "kld_p99_topk": round(float(np.percentile(x, 99)), 5),
                              "tail_mass_mean": None if k == "shipped" else
                              round(float(1 - np.exp(approx[k][1].lp).sum(-1).mean()), 4)}),
                  flush=True)


if __name__ == "__main__":
    main()
