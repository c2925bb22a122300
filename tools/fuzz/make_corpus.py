"""Regenerate the seed corpora under tools/fuzz/corpus/ (small files, committed):
`python tools/fuzz/make_corpus.py`. Needs torch + transformers (tests/tiny_models.py)."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))


def main():
    import fuzzlib
    from pyflashmoe.synth import PRESETS
    c = os.path.join(HERE, "corpus")
    # config: the tiny test configs of each arch, the synth presets, a multimodal wrapper
    import tempfile
    from tiny_models import ARCHS, make_tiny_hf
    with tempfile.TemporaryDirectory() as t:
        for arch in ARCHS:
            _, cfg = make_tiny_hf(arch, os.path.join(t, arch))
            json.dump(cfg, open(os.path.join(c, "config", f"{arch}.json"), "w"))
            if arch == "qwen3_5_moe":
                outer = {"model_type": "qwen3_5_moe", "text_config": cfg, "tie_word_embeddings": False,
                         "__generation_config__": {"eos_token_id": [2, 3], "do_sample": True}}
                json.dump(outer, open(os.path.join(c, "config", "qwen3_5_moe_multimodal.json"), "w"))
    for name, cfg in PRESETS.items():
        json.dump(cfg, open(os.path.join(c, "config", f"synth-{name}.json"), "w"))
    # manifest: the two tiny model dirs' manifests
    for d in fuzzlib.model_dirs():
        with open(os.path.join(d, "pyflashmoe.json"), "rb") as f:
            data = f.read()
        open(os.path.join(c, "manifest", os.path.basename(d) + ".json"), "wb").write(data)
    # st_header: a few small safetensors files and an index
    def st(entries, data_len, meta=None):
        h = {}
        if meta:
            h["__metadata__"] = meta
        h.update(entries)
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)
    seeds = {
        "two_tensors.bin": st({"model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
                               "model.embed_tokens.weight": {"dtype": "BF16", "shape": [16, 8],
                                                             "data_offsets": [32, 288]}}, 288,
                              {"format": "pt"}),
        "fp8.bin": st({"w": {"dtype": "F8_E4M3", "shape": [4, 8], "data_offsets": [0, 32]},
                       "w_scale_inv": {"dtype": "F32", "shape": [1, 1], "data_offsets": [32, 36]}}, 36),
        "u32.bin": st({"q": {"dtype": "U32", "shape": [2, 2, 2], "data_offsets": [0, 32]},
                       "e": {"dtype": "I64", "shape": [0], "data_offsets": [32, 32]}}, 32),
        "index.json": json.dumps({"metadata": {"total_size": 8},
                                  "weight_map": {"a": "model.safetensors"}}).encode(),
    }
    for n, b in seeds.items():
        open(os.path.join(c, "st_header", n), "wb").write(b)


if __name__ == "__main__":
    main()
