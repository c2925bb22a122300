#!/usr/bin/env python3
"""Tool-call validity of the demo model at every bits x K setting, with and without the grammar
(issue 11 item 6).

    python bench/toolcalls_demo.py [DIR ...] [--k 1 2 4 8] [--max-tokens 160] [--json out.jsonl]

DIRs default to the conversions demo_out/demo-q2, -q3, -q4, -q8 (tools/demo, docs/DEMO.md) and
the shipped pyflashmoe/demo/model. Each prompt of tests/data/toolcalls_demo.json (32 prompts,
13 tools, tool_choice "required" or a named function) is rendered with the model's chat template
(tools, generation prompt; thinking as the record says) and decoded greedily, at most
--max-tokens new tokens, once freely and once with pyflashmoe.constrain.tool_call_constraint
(llguidance grammar of "a call to one of these tools whose arguments match its JSON schema",
closed before the token budget). The output is parsed with pyflashmoe.toolcalls; a prompt counts
as valid when there is at least one call and every call names an offered function (the named
one, when tool_choice names one) with arguments that match its schema (jsonschema).

Columns: parsed = share with at least one parsed call; valid = share whose calls are all valid;
closed = share where the budget closing forced tokens (constrained only); s = wall seconds.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_set(model, records, constrained: bool, max_tokens: int):
    from pyflashmoe.constrain import tool_call_constraint
    from pyflashmoe.toolcalls import parse_output, prompt_opens_thinking, tool_call_errors
    c_parsed = c_valid = c_closed = 0
    fails = []
    for i, r in enumerate(records):
        name = None if r["tool_choice"] == "required" else r["tool_choice"]
        kw = {} if r.get("enable_thinking", True) else {"enable_thinking": False}
        prompt = model.tokenizer.apply_chat_template(r["messages"], tools=r["tools"],
                                                     add_generation_prompt=True, **kw)
        think = prompt_opens_thinking(prompt)
        proc = tool_call_constraint(model, r["tools"], name=name, reasoning=think,
                                    max_tokens=max_tokens) if constrained else None
        text = model.generate_text(model.tokenizer.encode(prompt), max_tokens=max_tokens,
                                   temperature=0, logits_processor=proc)
        out = parse_output(text, in_reasoning=think, tools=r["tools"])
        errs = tool_call_errors(out.tool_calls, r["tools"], name)
        c_parsed += bool(out.tool_calls)
        c_valid += not errs
        c_closed += bool(proc is not None and proc.forced_close)
        if errs:
            fails.append({"i": i, "errors": errs[:2], "text": text[:200]})
    n = len(records)
    return {"prompts": n, "parsed": c_parsed / n, "valid": c_valid / n, "closed": c_closed / n,
            "fails": fails}


def main():
    from pyflashmoe import Model
    demo = os.path.join(ROOT, "pyflashmoe", "demo", "model")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="*", default=[os.path.join(ROOT, "demo_out", f"demo-q{b}")
                                                 for b in (2, 3, 4, 8)] + [demo])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--data", default=os.path.join(ROOT, "tests", "data", "toolcalls_demo.json"))
    ap.add_argument("--modes", nargs="+", default=["free", "constrained"],
                    choices=["free", "constrained"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="append one JSON line per (dir, K, mode)")
    a = ap.parse_args()
    with open(a.data, encoding="utf-8") as f:
        records = json.load(f)["records"]
    rows = []
    for d in a.dirs:
        if not os.path.isdir(d):
            print(f"skip {d}: not found", file=sys.stderr)
            continue
        for k in a.k:
            m = Model.load(d, experts_per_token=k, threads=a.threads)
            q = (m.manifest.get("quantization") or {}).get("experts") or {}
            for mode in a.modes:
                t0 = time.perf_counter()
                res = run_set(m, records, mode == "constrained", a.max_tokens)
                row = {"dir": os.path.relpath(d, ROOT), "expert_bits": q.get("bits"), "k": k,
                       "mode": mode, "max_tokens": a.max_tokens,
                       "s": round(time.perf_counter() - t0, 1), **res}
                rows.append(row)
                print(json.dumps({x: v for x, v in row.items() if x != "fails"}), flush=True)
                if a.json:
                    with open(a.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            m.close()
    print("\n| model dir | expert bits | K | free: parsed | free: valid | constrained: parsed "
          "| constrained: valid | closed by budget |")
    print("|---|---|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault((r["dir"], r["k"]), {})[r["mode"]] = r
    for (d, k), v in by.items():
        fr, co = v.get("free"), v.get("constrained")
        pct = lambda r, key: f"{100 * r[key]:.0f}%" if r else "-"  # noqa: E731
        bits = (fr or co)["expert_bits"]
        print(f"| {d} | {bits} | {k} | {pct(fr, 'parsed')} | {pct(fr, 'valid')} | "
              f"{pct(co, 'parsed')} | {pct(co, 'valid')} | {pct(co, 'closed')} |")


if __name__ == "__main__":
    main()
