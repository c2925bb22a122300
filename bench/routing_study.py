#!/usr/bin/env python3
"""Routing on real text (issue 11 item 7): what the demo model's router does on held-out text, and
what that means for the expert cache and the decode prefetch. Write-up: docs/ROUTING.md.

    python bench/routing_study.py --dir pyflashmoe/demo/model --hf demo_out/ckpt \\
        --text demo_out/corpus/heldout.txt [--text demo_out/corpus/heldout_chat.txt] --json out.json

Routing: the engine's own routing trace (Session.set_trace: the K expert ids of every layer for every
token, exactly what the 4-bit model dir routes), over non-overlapping windows of --seq tokens, each
from a fresh session. Measured per layer: pick frequency (entropy in bits against log2 E, the share
of the hottest expert / of the hottest 20%, experts needed for half the picks), and how often an
expert picked for token t is picked again for token t+1 (same layer; random routing gives K/E).

Cache: the decode access stream (token by token, layer by layer, the K picks of each) replayed
through simulated caches holding 10-50% of all (layer, expert) blocks: LRU over all layers (what
csrc/fm_io.c's RAM cache is: one LRU keyed by (layer, expert), hits move to the front, misses are
inserted evicting the least recent; the prefetch never touches it), LRU with an equal share per
layer, LFU (counts over everything seen so far, ties by recency), a static cache of the experts
hottest on the first half of the text (evaluated on the second half), and Belady's optimum (an
upper bound no online policy reaches).

Prefetch predictor: the engine's decode prefetch (csrc/fm_forward.c prefetch_predict) applies the
next MoE layer's router, under that layer's ffn_norm, to the residual after the current layer's token
mixer (the first MoE layer from the embedding). The engine cannot hand out its residual, so this is
measured on the bf16 checkpoint with transformers (hooks on each layer's post_attention_layernorm
input and on its router): precision of the top n predicted (n = 1..2K, per rank) and recall of the
true top-K by the top K and top 2K predicted. The bf16 routing is also compared with the engine's.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import OrderedDict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tokenize(tok_dir, path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    with open(path, encoding="utf-8") as f:
        return np.asarray(tok.encode(f.read(), add_special_tokens=False).ids, dtype=np.int32)


def engine_trace(model_dir, windows, threads):
    """ids [n_windows, seq, L, K] from the engine's routing trace (prefill per window)."""
    from pyflashmoe import _core as core
    eng = core.Engine(model_dir, n_threads=threads)
    seq = windows.shape[1]
    ses = core.Session(eng, seq)
    out = np.empty((len(windows), seq, eng.n_layers, eng.experts_per_token), dtype=np.int32)
    for i, w in enumerate(windows):
        ses.reset()
        ses.set_trace(cap_tokens=seq, counts=False, layer_ms=False)
        ses.eval(w)
        tr = ses.trace()
        assert tr["n_tokens"] == seq
        out[i] = tr["ids"]
    ses.clear_trace()
    return out, eng.n_experts


def hf_routing(hf_dir, windows, K):
    """From the bf16 checkpoint: actual top-K [W, S, L, K] and the prefetch prediction ranks
    [W, S, L, 2K] (layer l predicted from the residual after layer l-1's mixer, layer 0 from the
    embedding), as the engine's prefetch_predict computes them."""
    import torch
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    L = len(layers)
    cap = {}
    hooks = []
    for il, layer in enumerate(layers):
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda mod, inp, out, il=il: cap.__setitem__(("res", il), inp[0].detach())))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda mod, inp, out, il=il: cap.__setitem__(("logit", il), out[0].detach())))
        hooks.append(layer.register_forward_hook(
            lambda mod, inp, out, il=il: cap.__setitem__(("out", il), (out[0] if isinstance(out, tuple) else out).detach())))
    hooks.append(model.model.embed_tokens.register_forward_hook(
        lambda mod, inp, out: cap.__setitem__(("emb",), out.detach())))
    W, S = windows.shape
    act = np.empty((W, S, L, K), dtype=np.int32)
    pred = np.empty((W, S, L, 2 * K), dtype=np.int32)
    pred_b = np.empty((W, S, L, 2 * K), dtype=np.int32)  # from the residual after layer l-1's whole block
    with torch.no_grad():
        for i, w in enumerate(windows):
            cap.clear()
            model(torch.tensor(w[None].astype(np.int64)))
            got = dict(cap)  # the calls below fire the same hooks: read only this snapshot
            for il in range(L):
                lg = got[("logit", il)].reshape(S, -1)
                act[i, :, il] = torch.topk(lg, K, dim=-1).indices.numpy()  # top-K logits == top-K softmax
                src = got[("emb",)] if il == 0 else got[("res", il - 1)]
                x = layers[il].post_attention_layernorm(src).reshape(S, -1)
                pl = layers[il].mlp.gate(x)[0].reshape(S, -1)
                pred[i, :, il] = torch.topk(pl, 2 * K, dim=-1).indices.numpy()
                src = got[("emb",)] if il == 0 else got[("out", il - 1)]
                pl = layers[il].mlp.gate(layers[il].post_attention_layernorm(src).reshape(S, -1))[0]
                pred_b[i, :, il] = torch.topk(pl.reshape(S, -1), 2 * K, dim=-1).indices.numpy()
    for h in hooks:
        h.remove()
    return act, pred, pred_b


# ---------------------------------------------------------------- statistics

def freq_stats(ids, E):
    """ids [N, K] of one layer -> frequency statistics."""
    c = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
    f = c / c.sum()
    nz = f[f > 0]
    ent = float(-(nz * np.log2(nz)).sum())
    srt = np.sort(f)[::-1]
    top20 = max(1, int(round(0.2 * E)))
    return {"entropy_bits": ent, "entropy_frac": ent / math.log2(E), "max_share": float(srt[0]),
            "max_over_uniform": float(srt[0] * E), "min_share": float(srt[-1]),
            "top20pct_share": float(srt[:top20].sum()),
            "experts_for_half": int(np.searchsorted(np.cumsum(srt), 0.5) + 1),
            "unused": int((c == 0).sum())}


def repeat_rate(ids_w):
    """ids_w [W, S, K] of one layer: mean fraction of token t+1's K experts that token t also used."""
    W, S, K = ids_w.shape
    a = ids_w[:, 1:, :, None] == ids_w[:, :-1, None, :]
    return float(a.any(-1).sum(-1).mean() / K)


def sim_lru(reqs, cap, E, per_layer=False):
    """reqs [T, L, K] in decode order; a request is one layer's K blocks (pinned together, as the
    engine's fm_io_submit). Returns the hit rate."""
    T, L, K = reqs.shape
    hits = tot = 0
    if per_layer:
        caps = [cap // L + (1 if l < cap % L else 0) for l in range(L)]
        caches = [OrderedDict() for _ in range(L)]
    else:
        caches = [OrderedDict()]
    for t in range(T):
        for l in range(L):
            c = caches[l] if per_layer else caches[0]
            cp = caps[l] if per_layer else cap
            keys = reqs[t, l] + l * E
            for k in keys:
                k = int(k)
                tot += 1
                if k in c:
                    hits += 1
                    c.move_to_end(k)
                elif cp > 0:
                    c[k] = None
                    if len(c) > cp:
                        # evict the least recent one not in this request
                        for old in c:
                            if old not in keys:
                                del c[old]
                                break
    return hits / tot


def sim_lfu(reqs, cap, E):
    T, L, K = reqs.shape
    cnt = np.zeros(L * E, dtype=np.int64)
    last = np.zeros(L * E, dtype=np.int64)
    inc = set()
    hits = tot = 0
    clock = 0
    for t in range(T):
        for l in range(L):
            keys = [int(k) + l * E for k in reqs[t, l]]
            for k in keys:
                clock += 1
                tot += 1
                cnt[k] += 1
                last[k] = clock
                if k in inc:
                    hits += 1
                elif cap > 0:
                    if len(inc) >= cap:
                        cand = [x for x in inc if x not in keys]
                        v = min(cand, key=lambda x: (cnt[x], last[x]))
                        inc.discard(v)
                    inc.add(k)
    return hits / tot


def sim_static(reqs, cap, E, hot):
    """hot: keys ordered hottest first (from other text); the top cap are always cached."""
    T, L, K = reqs.shape
    keep = np.zeros(L * E, dtype=bool)
    keep[hot[:cap]] = True
    keys = reqs + (np.arange(L) * E)[None, :, None]
    return float(keep[keys].mean())


def sim_belady(reqs, cap, E):
    """Belady's optimum (evict the block whose next use is furthest; never one of the current
    request's): an upper bound for any online policy."""
    import heapq
    T, L, K = reqs.shape
    seq = (reqs + (np.arange(L) * E)[None, :, None]).reshape(-1).tolist()
    n = len(seq)
    nxt = [0] * n
    seen = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = seen.get(seq[i], n + 1)
        seen[seq[i]] = i
    inc, heap, hits = {}, [], 0
    for i in range(n):
        k = seq[i]
        if i % K == 0:
            req = set(seq[i:i + K])
        if k in inc:
            hits += 1
        elif cap <= 0:
            continue
        elif len(inc) >= cap:
            skipped = []
            while True:
                nu, v = heapq.heappop(heap)
                if inc.get(v) != -nu:
                    continue  # stale entry
                if v in req:
                    skipped.append((nu, v))
                    continue
                del inc[v]
                break
            for x in skipped:
                heapq.heappush(heap, x)
        inc[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return hits / n


def prefetch_stats(act, pred, K):
    """act [N, L, K], pred [N, L, 2K] -> per layer: precision of the top n (n = 1..2K), marginal
    precision by rank, recall of the true top-K by the top K and 2K predicted."""
    N, L, _ = act.shape
    inact = (pred[..., :, None] == act[..., None, :]).any(-1)  # [N, L, 2K]
    rank_prec = inact.mean(0)  # [L, 2K]
    cum = np.cumsum(inact, -1) / np.arange(1, 2 * K + 1)  # precision of the top n
    out = []
    for l in range(L):
        out.append({"rank_precision": rank_prec[l].tolist(), "top_n_precision": cum[:, l].mean(0).tolist(),
                    "recall_at_K": float(inact[:, l, :K].sum(-1).mean() / K),
                    "recall_at_2K": float(inact[:, l, :].sum(-1).mean() / K),
                    "all_K_at_2K": float((inact[:, l, :].sum(-1) == K).mean())})
    return out


def tables(res):
    """Markdown tables of a result (docs/ROUTING.md, bench/RESULTS.md)."""
    out = []
    for name, r in res["texts"].items():
        L, E, K = r["L"], r["E"], r["K"]
        out.append(f"#### {name}: {r['tokens']} tokens ({r['windows']} windows of {res['seq']}), "
                   f"{L} layers, E={E}, K={K}\n")
        out.append("| layer | entropy bits (of %.0f) | hottest expert share (x uniform) | hottest 20%% share | experts for half the picks | never picked | next-token repeat (random %.3f) |" % (math.log2(E), r["repeat_random"]))
        out.append("|---|---|---|---|---|---|---|")
        for l in range(L):
            f = r["freq"][l]
            out.append(f"| {l} | {f['entropy_bits']:.2f} ({100 * f['entropy_frac']:.0f}%) | "
                       f"{100 * f['max_share']:.1f}% ({f['max_over_uniform']:.1f}x) | {100 * f['top20pct_share']:.0f}% | "
                       f"{f['experts_for_half']} | {f['unused']} | {r['repeat'][l]:.3f} |")
        c = r["cache"]
        out.append(f"\nHit rate, decode stream of {c['tokens']} tokens (second half of the text), "
                   f"{c['blocks']} blocks in all:\n")
        out.append("| cached | blocks | LRU, all layers (engine RAM cache) | LRU, equal share per layer | LFU | static hottest (first half) | Belady optimum |")
        out.append("|---|---|---|---|---|---|---|")
        for row in c["rows"]:
            out.append(f"| {100 * row['frac']:.0f}% | {row['cap']} | {100 * row['lru_global']:.1f}% | "
                       f"{100 * row['lru_per_layer']:.1f}% | {100 * row['lfu']:.1f}% | "
                       f"{100 * row['static_hot']:.1f}% | {100 * row['belady']:.1f}% |")
        if "prefetch" in r:
            out.append("\nPrefetch predictor (bf16 checkpoint; layer l predicted from the residual after "
                       "layer l-1's token mixer, layer 0 from the embedding):\n")
            hdr = " | ".join(f"rank {i + 1}" for i in range(2 * K))
            out.append(f"| layer | {hdr} | top-{K} recall | top-{2 * K} recall | all {K} in top {2 * K} |")
            out.append("|---|" + "---|" * (2 * K + 3))
            for l, p in enumerate(r["prefetch"]):
                out.append(f"| {l} | " + " | ".join(f"{100 * x:.0f}%" for x in p["rank_precision"]) +
                           f" | {100 * p['recall_at_K']:.1f}% | {100 * p['recall_at_2K']:.1f}% | {100 * p['all_K_at_2K']:.1f}% |")
            pf = r["prefetch"]
            mean = lambda key: float(np.mean([p[key] for p in pf]))  # noqa: E731
            mr = np.mean([p["rank_precision"] for p in pf], 0)
            out.append("| mean | " + " | ".join(f"{100 * x:.0f}%" for x in mr) +
                       f" | {100 * mean('recall_at_K'):.1f}% | {100 * mean('recall_at_2K'):.1f}% | {100 * mean('all_K_at_2K'):.1f}% |")
            if "prefetch_after_block" in r:
                pb = r["prefetch_after_block"]
                mr = np.mean([p["rank_precision"] for p in pb], 0)
                out.append("| mean, predicted after layer l-1's whole block (alternative) | "
                           + " | ".join(f"{100 * x:.0f}%" for x in mr)
                           + f" | {100 * np.mean([p['recall_at_K'] for p in pb]):.1f}% | "
                           f"{100 * np.mean([p['recall_at_2K'] for p in pb]):.1f}% | "
                           f"{100 * np.mean([p['all_K_at_2K'] for p in pb]):.1f}% |")
            ev = r["engine_vs_bf16"]
            out.append("\nEngine (4-bit experts, 8-bit dense) vs bf16 routing, per layer: same set of K "
                       + ", ".join(f"{100 * x:.0f}%" for x in ev["same_set"]) + "; overlap "
                       + ", ".join(f"{100 * x:.0f}%" for x in ev["overlap"]) + "; same top-1 "
                       + ", ".join(f"{100 * x:.0f}%" for x in ev["same_top1"]) + ".")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(ROOT, "pyflashmoe", "demo", "model"))
    ap.add_argument("--hf", default=None, help="bf16 HF checkpoint (prefetch predictor, cross-check)")
    ap.add_argument("--text", action="append", required=True)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=60000, help="per text")
    ap.add_argument("--cache-tokens", type=int, default=4096, help="decode tokens replayed through the caches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tables", default=None, metavar="JSON", help="print the markdown tables of a saved result")
    if "--tables" in sys.argv:
        with open(sys.argv[sys.argv.index("--tables") + 1]) as f:
            print(tables(json.load(f)))
        return
    a = ap.parse_args()
    res = {"dir": a.dir, "hf": a.hf, "seq": a.seq, "texts": {}}
    for path in a.text:
        t0 = time.time()
        ids = tokenize(a.dir, path)[:a.max_tokens]
        n = len(ids) // a.seq
        wins = ids[:n * a.seq].reshape(n, a.seq)
        tr, E = engine_trace(a.dir, wins, a.threads)
        W, S, L, K = tr.shape
        r = {"tokens": int(W * S), "windows": int(W), "L": L, "E": E, "K": K}
        print(f"{os.path.basename(path)}: {W * S} tokens, engine trace {time.time() - t0:.1f} s", file=sys.stderr)
        flat = tr.reshape(-1, L, K)
        r["freq"] = [freq_stats(flat[:, l], E) for l in range(L)]
        r["repeat"] = [repeat_rate(tr[:, :, l]) for l in range(L)]
        r["repeat_random"] = K / E
        # caches: decode stream of the first --cache-tokens tokens (windows in order)
        nt = min(a.cache_tokens, W * S)
        half = (W * S) // 2
        reqs = flat[half:half + nt] if half + nt <= W * S else flat[-nt:]
        hot_c = np.zeros(L * E)
        for l in range(L):
            hot_c[l * E:(l + 1) * E] = np.bincount(flat[:half, l].ravel(), minlength=E)
        hot = np.argsort(-hot_c, kind="stable")
        r["cache"] = {"tokens": int(nt), "blocks": L * E, "rows": []}
        for frac in (0.1, 0.2, 0.3, 0.4, 0.5):
            cap = int(round(frac * L * E))
            t1 = time.time()
            row = {"frac": frac, "cap": cap,
                   "lru_global": sim_lru(reqs, cap, E), "lru_per_layer": sim_lru(reqs, cap, E, per_layer=True),
                   "lfu": sim_lfu(reqs, cap, E), "static_hot": sim_static(reqs, cap, E, hot),
                   "belady": sim_belady(reqs, cap, E)}
            r["cache"]["rows"].append(row)
            print(f"  cache {frac:.0%}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("frac", "cap"))
                  + f" ({time.time() - t1:.1f} s)", file=sys.stderr)
        if a.hf:
            t1 = time.time()
            act, pred, pred_b = hf_routing(a.hf, wins, K)
            r["prefetch"] = prefetch_stats(act.reshape(-1, L, K), pred.reshape(-1, L, 2 * K), K)
            r["prefetch_after_block"] = prefetch_stats(act.reshape(-1, L, K), pred_b.reshape(-1, L, 2 * K), K)
            hf_flat = act.reshape(-1, L, K)
            same = (np.sort(hf_flat, -1) == np.sort(flat, -1)).all(-1)  # [N, L]
            ov = (hf_flat[..., :, None] == flat[..., None, :]).any(-1).sum(-1) / K
            r["engine_vs_bf16"] = {"same_set": same.mean(0).tolist(), "overlap": ov.mean(0).tolist(),
                                   "same_top1": (hf_flat[..., 0] == flat[..., 0]).mean(0).tolist()}
            print(f"  bf16 routing + predictor {time.time() - t1:.1f} s", file=sys.stderr)
        res["texts"][os.path.basename(path)] = r
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(tables(res))


if __name__ == "__main__":
    main()
