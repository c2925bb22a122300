#!/usr/bin/env python3
"""Train the demo Qwen3.5-MoE model from scratch (transformers' Qwen3_5MoeForCausalLM).

    python tools/demo/make_corpus.py && python tools/demo/make_tokenizer.py
    python tools/demo/train.py --data demo_out --out demo_out/ckpt [--minutes 7.5] [--steps N]

Seeded (torch, data sampling); AdamW, linear warm-up then cosine decay to 10%, bf16 autocast on a
GPU (fp32 master weights), packed random windows of --seq tokens from the train split (documents
joined by <|endoftext|>), the router trained with the model's load-balancing aux loss
(output_router_logits, router_aux_loss_coef). With --steps unset, the step count is fixed after
--probe-steps from the measured step time so that training ends inside --minutes (capped at
--max-epochs passes over the train tokens); the chosen count is logged, and `--steps N` replays it.
The last 1% of the train token stream is a validation slice: the weights with the best validation
loss are the ones saved. The held-out split (make_corpus.py) is evaluated at every eval point for
the log only. Saves a bf16 safetensors checkpoint (config.json, generation_config.json) and
train_log.json to --out.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# The demo architecture: Qwen3.5-MoE scaled down. 8 layers in the 3:1 pattern (GatedDeltaNet x3,
# gated full attention x1), 32 routed experts (top-4) + a gated shared expert in every layer.
MODEL_CONFIG = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=8, full_attention_interval=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64,
    linear_num_key_heads=2, linear_num_value_heads=4,
    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64,
    shared_expert_intermediate_size=128,
    hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
    partial_rotary_factor=0.25,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    router_aux_loss_coef=0.01, output_router_logits=True, initializer_range=0.02,
    bos_token_id=None, eos_token_id=4063, pad_token_id=4063,  # <|endoftext|>
)
IM_END = 4065


def log(*a):
    print(*a, flush=True)


def build_model(cfg_over=None):
    import transformers as tf
    c = dict(MODEL_CONFIG, **(cfg_over or {}))
    return tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**c))


def load_tokens(data_dir):
    """uint16 token ids of train/heldout, cached as .npy beside the corpus."""
    from tokenizers import Tokenizer
    tok = None
    out = {}
    for split in ("train", "heldout"):
        npy = os.path.join(data_dir, "tokens", f"{split}.npy")
        if not os.path.exists(npy):
            if tok is None:
                tok = Tokenizer.from_file(os.path.join(data_dir, "tokenizer", "tokenizer.json"))
            with open(os.path.join(data_dir, "corpus", f"{split}.txt"), encoding="utf-8") as f:
                ids = tok.encode(f.read(), add_special_tokens=False).ids
            os.makedirs(os.path.dirname(npy), exist_ok=True)
            np.save(npy, np.asarray(ids, dtype=np.uint16))
        out[split] = torch.from_numpy(np.load(npy).astype(np.int64))
    return out


@torch.no_grad()
def evaluate(model, ids, seq, batch, device, amp, max_windows=256):
    """Mean next-token loss over non-overlapping windows of seq+1 tokens (fixed, deterministic)."""
    model.eval()
    n = min((len(ids) - 1) // seq, max_windows)
    tot, cnt = 0.0, 0
    for s in range(0, n, batch):
        idx = torch.arange(s, min(n, s + batch)) * seq
        x = torch.stack([ids[i:i + seq + 1] for i in idx.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x[:, :-1], output_router_logits=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        tot += float(loss)
        cnt += x[:, 1:].numel()
    model.train()
    return tot / max(cnt, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "demo_out"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (0: fit --minutes)")
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget for training")
    ap.add_argument("--max-epochs", type=float, default=12.0)
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--experts-impl", default="auto", help="auto | grouped_mm | eager")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t_start = time.time()

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    device = torch.device(a.device)
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = load_tokens(a.data)
    train_all, heldout = data["train"], data["heldout"]
    n_val = len(train_all) // 100
    train, val = train_all[:-n_val], train_all[-n_val:]
    log(f"tokens: train {len(train):,}  val {len(val):,}  heldout {len(heldout):,}")

    import transformers
    model = build_model().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    log(f"transformers {transformers.__version__}  torch {torch.__version__}  params {n_params:,} "
        f"(routed experts {n_expert:,})")

    g = torch.Generator().manual_seed(a.seed)

    def get_batch():
        ix = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([train[i:i + a.seq + 1] for i in ix.tolist()])
        return x.to(device, non_blocking=True)

    coef = MODEL_CONFIG["router_aux_loss_coef"]

    def loss_fn(x):
        """(total, next-token cross-entropy, load-balancing aux loss) of a batch of windows."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x[:, :-1], output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                               x[:, 1:].reshape(-1))
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros((), device=x.device)
        return ce + coef * aux.float(), ce.detach(), aux.detach()

    # experts implementation: grouped_mm on the GPU when it works, else the eager loop
    impls = ["grouped_mm", "eager"] if a.experts_impl == "auto" else [a.experts_impl]
    if not amp and a.experts_impl == "auto":
        impls = ["eager"]
    chosen = None
    for impl in impls:
        try:
            model.config._experts_implementation = impl
            for m in model.modules():
                if hasattr(m, "config") and m is not model:
                    m.config._experts_implementation = impl
            xb = get_batch()[:2]
            loss_fn(xb)[0].backward()
            model.zero_grad(set_to_none=True)
            chosen = impl
            break
        except Exception as e:  # noqa: BLE001 - any failure means: try the next implementation
            log(f"experts implementation {impl} failed: {type(e).__name__}: {str(e)[:200]}")
            model.zero_grad(set_to_none=True)
    if chosen is None:
        sys.exit("no experts implementation works")
    log(f"experts implementation: {chosen}")
    g.manual_seed(a.seed)  # the probe batch does not shift the data order

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp)

    tokens_per_step = a.batch * a.seq
    max_steps_epochs = int(a.max_epochs * len(train) / tokens_per_step)
    total = a.steps or max_steps_epochs   # provisional until the probe

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        p = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
        return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    hist = {"step": [], "train_loss": [], "aux_loss": [], "val_loss": [], "heldout_loss": [],
            "lr": [], "elapsed_s": []}
    best = (float("inf"), -1, None)
    model.train()
    t_train = time.time()
    run_loss, run_aux, run_n = 0.0, 0.0, 0
    step = 0
    budget_s = a.minutes * 60
    stopped_by_clock = False
    while step < total:
        x = get_batch()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        loss, ce, aux = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_loss += float(ce)
        run_aux += float(aux)
        run_n += 1
        if step == a.probe_steps and not a.steps:
            if amp:
                torch.cuda.synchronize()
            per_step = (time.time() - t_train) / step
            # leave room for the eval passes (about 4% of the time) and the save
            fit = int((budget_s - (time.time() - t_start)) / (per_step * 1.06)) + step
            total = max(step + 1, min(fit, max_steps_epochs))
            log(f"probe: {per_step * 1000:.1f} ms/step, {tokens_per_step / per_step:,.0f} tok/s -> "
                f"{total} steps ({total * tokens_per_step / len(train):.1f} epochs)")
        if step % a.eval_every == 0 or step == total:
            vl = evaluate(model, val, a.seq, 32, device, amp)
            hl = evaluate(model, heldout, a.seq, 32, device, amp)
            el = time.time() - t_train
            for k, v in (("step", step), ("train_loss", run_loss / run_n), ("aux_loss", run_aux / run_n),
                         ("val_loss", vl), ("heldout_loss", hl), ("lr", lr_at(step - 1)),
                         ("elapsed_s", round(el, 1))):
                hist[k].append(round(v, 4) if isinstance(v, float) else v)
            log(f"step {step:5d}/{total}  train {run_loss / run_n:.4f}  aux {run_aux / run_n:.3f}  "
                f"val {vl:.4f}  heldout {hl:.4f} (ppl {math.exp(hl):.2f})  lr {lr_at(step - 1):.2e}  "
                f"{el:.0f}s")
            run_loss, run_aux, run_n = 0.0, 0.0, 0
            if vl < best[0]:
                best = (vl, step, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        if time.time() - t_start > budget_s + 30 and step < total:
            log(f"wall-clock limit reached at step {step}")
            stopped_by_clock = True
            break

    if best[2] is not None:
        model.load_state_dict(best[2])
    final_val = evaluate(model, val, a.seq, 32, device, amp)
    final_held = evaluate(model, heldout, a.seq, 32, device, amp, max_windows=10 ** 9)
    log(f"saving step {best[1]}: val {final_val:.4f}  heldout (all windows) {final_held:.4f} "
        f"(ppl {math.exp(final_held):.2f})")

    os.makedirs(a.out, exist_ok=True)
    model.config.output_router_logits = False
    model.config.use_cache = True
    save = copy.deepcopy(model).to("cpu", torch.bfloat16)
    save.config.dtype = "bfloat16"
    save.save_pretrained(a.out, safe_serialization=True, max_shard_size="15MB")
    with open(os.path.join(a.out, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("_experts_implementation", None)
    cfg["full_attention_interval"] = MODEL_CONFIG["full_attention_interval"]
    cfg["rope_theta"] = MODEL_CONFIG["rope_parameters"]["rope_theta"]
    cfg["partial_rotary_factor"] = MODEL_CONFIG["partial_rotary_factor"]
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [IM_END, MODEL_CONFIG["eos_token_id"]],
                   "pad_token_id": MODEL_CONFIG["pad_token_id"], "do_sample": True,
                   "temperature": 0.8, "top_p": 0.95, "top_k": 40}, f, indent=2)
    info = {"args": vars(a), "model_config": MODEL_CONFIG, "params": n_params,
            "routed_expert_params": n_expert, "experts_implementation": chosen,
            "tokens": {"train": len(train), "val": len(val), "heldout": len(heldout)},
            "steps_run": step, "steps_planned": total, "stopped_by_clock": stopped_by_clock,
            "tokens_per_step": tokens_per_step, "saved_step": best[1],
            "final": {"val_loss": round(final_val, 4), "heldout_loss": round(final_held, 4),
                      "heldout_ppl": round(math.exp(final_held), 3)},
            "transformers": transformers.__version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if amp else "cpu",
            "train_seconds": round(time.time() - t_train, 1), "history": hist}
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
