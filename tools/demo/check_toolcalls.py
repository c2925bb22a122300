#!/usr/bin/env python3
"""Unconstrained tool-call rate of a converted demo dir on the held-out tool-call prompts.

    python tools/demo/check_toolcalls.py demo_out/demo-q4 [--n 50] [--k K]

Each record of heldout_toolcalls.jsonl (make_corpus.py) is rendered with the chat template
(tools, generation prompt), decoded greedily (at most 160 tokens, stopping at the eos ids) and
parsed with pyflashmoe.toolcalls. Reports: the share with at least one parsed call ("parsed"),
with the expected function name ("name"), with every required argument present ("required"), and
with arguments equal to the expected ones ("exact"). No grammar constraint: this is the baseline
for issue 11 item 6.
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    from pyflashmoe import Model
    from pyflashmoe.toolcalls import parse_output
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "demo_out", "corpus",
                                                   "heldout_toolcalls.jsonl"))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--k", type=int, default=None, help="experts per token")
    ap.add_argument("--show", type=int, default=2, help="print this many outputs")
    a = ap.parse_args()
    with open(a.data) as f:
        recs = [json.loads(ln) for ln in f][:a.n]
    m = Model.load(a.dir, experts_per_token=a.k)
    c = {"parsed": 0, "name": 0, "required": 0, "exact": 0}
    for i, r in enumerate(recs):
        ids = m.tokenizer.apply_chat_template(r["messages"], tools=r["tools"], add_generation_prompt=True,
                                              tokenize=True)
        text = m.generate_text(ids, max_tokens=160, temperature=0)
        out = parse_output(text, in_reasoning=True, tools=r["tools"])
        exp = r["expected_call"]
        calls = [tc.get("function", tc) for tc in out.tool_calls]
        if i < a.show:
            print(json.dumps({"expected": exp, "output": text[:400]}, ensure_ascii=False))
        if not calls:
            continue
        c["parsed"] += 1
        fn = calls[0]
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if fn.get("name") == exp["name"]:
            c["name"] += 1
            schema = next(t["function"]["parameters"] for t in r["tools"] if t["function"]["name"] == exp["name"])
            if isinstance(args, dict) and all(k in args for k in schema.get("required", [])):
                c["required"] += 1
            if args == exp["arguments"]:
                c["exact"] += 1
    n = len(recs)
    print(json.dumps({"dir": a.dir, "k": a.k, "prompts": n, **{k: round(v / n, 3) for k, v in c.items()}}))


if __name__ == "__main__":
    main()
