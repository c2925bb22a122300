#!/usr/bin/env python3
"""Held-out perplexity of the demo model: the bf16 HF checkpoint (transformers, CPU, fp32 compute)
and/or a converted pyflashmoe model dir (`pyflashmoe.Model.logits`).

    python tools/demo/eval_ppl.py --hf demo_out/ckpt --dir demo_out/demo-q4 [--dir ...] [--text demo_out/corpus/heldout.txt]

The text is tokenized with the tokenizer.json of the checkpoint (or dir) and cut into
non-overlapping windows of --seq+1 tokens; each window is scored from a fresh state (the same
windows train.py scores). Prints one JSON line per model: mean loss (nats/token), perplexity,
tokens scored, and the top-1 agreement / mean KL(ref || dir) of the dir against the HF checkpoint
when both are given.
"""
import argparse
import json
import math
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def windows(path_tok, text_path, seq, limit):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(path_tok, "tokenizer.json"))
    with open(text_path, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read(), add_special_tokens=False).ids, dtype=np.int64)
    n = (len(ids) - 1) // seq
    if limit:
        n = min(n, limit)
    return [ids[i * seq:i * seq + seq + 1] for i in range(n)]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", help="HF checkpoint dir (bf16 safetensors)")
    ap.add_argument("--dir", action="append", default=[], help="converted pyflashmoe model dir (repeatable)")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "..", "demo_out", "corpus", "heldout.txt"))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--limit", type=int, default=0, help="at most this many windows (0: all)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if not (a.hf or a.dir):
        ap.error("give --hf and/or --dir")
    wins = windows(a.hf or a.dir[0], a.text, a.seq, a.limit)
    ref_lp = []
    results = []
    if a.hf:
        import torch
        import transformers as tf
        if a.threads:
            torch.set_num_threads(a.threads)
        model = tf.Qwen3_5MoeForCausalLM.from_pretrained(a.hf, dtype=torch.bfloat16).float().eval()
        t0 = time.time()
        tot = 0.0
        with torch.no_grad():
            for w in wins:
                x = torch.from_numpy(w)[None]
                lp = torch.log_softmax(model(input_ids=x[:, :-1]).logits[0].float(), -1)
                tot -= float(lp.gather(-1, x[0, 1:, None]).sum())
                if a.dir:
                    ref_lp.append(lp.numpy())
        n = sum(len(w) - 1 for w in wins)
        results.append({"model": a.hf, "kind": "hf-bf16 (transformers, fp32 compute)", "loss": round(tot / n, 4),
                        "ppl": round(math.exp(tot / n), 3), "tokens": n, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)
    for d in a.dir:
        from pyflashmoe import Model
        m = Model.load(d, threads=a.threads, context_length=max(a.seq + 1, 1024))
        t0 = time.time()
        tot, agree, kl = 0.0, 0, 0.0
        for i, w in enumerate(wins):
            lp = log_softmax(m.logits(w[:-1].tolist()).astype(np.float64))
            tot -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
            if ref_lp:
                r = ref_lp[i].astype(np.float64)
                agree += int((r.argmax(-1) == lp.argmax(-1)).sum())
                kl += float((np.exp(r) * (r - lp)).sum())
        n = sum(len(w) - 1 for w in wins)
        res = {"model": d, "kind": "pyflashmoe dir", "loss": round(tot / n, 4),
               "ppl": round(math.exp(tot / n), 3), "tokens": n, "seconds": round(time.time() - t0, 1)}
        if ref_lp:
            res.update(top1_agreement=round(agree / n, 4), mean_kld=round(kl / n, 5))
        results.append(res)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
