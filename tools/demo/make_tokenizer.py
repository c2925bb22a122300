#!/usr/bin/env python3
"""Train the demo model's byte-level BPE tokenizer on the train split (deterministic).

    python tools/demo/make_tokenizer.py [--corpus demo_out/corpus] [--out demo_out/tokenizer]

The pipeline copies Qwen3.5's: NFC normalizer, the Qwen3.5 split regex, ByteLevel (no prefix
space), ByteLevel decoder. 4,063 BPE ids (256 bytes + merges) are followed by the 33 Qwen3.5 added
tokens in Qwen3.5's order (ids 4063..4095; `<tool_call>`, `<think>`, ... are non-special added
tokens as in Qwen3.5), 4,096 ids in all. Writes tokenizer.json, tokenizer_config.json (the Qwen3.5
chat template, eos `<|im_end|>`, pad `<|endoftext|>`, no bos) and chat_template.jinja.
"""
import argparse
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 4096
# Qwen3.5's added tokens, in id order, with their `special` flag (from the Qwen3.5 tokenizer)
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
         ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
         ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
         ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
         ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
         ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
         ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
         ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
         ("<think>", False), ("</think>", False), ("<|audio_start|>", True), ("<|audio_end|>", True),
         ("<tts_pad>", True), ("<tts_text_bos>", True), ("<tts_text_eod>", True),
         ("<tts_text_bos_single>", True), ("<|audio_pad|>", True)]
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
               r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def training_texts(path):
    """The train split, cut at every added token (the markup is not learned as merges)."""
    import re
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pat = "|".join(re.escape(t) for t, _ in ADDED)
    for doc in re.split(pat, text):
        if doc:
            yield doc


def main():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
        pre_tokenizers, trainers
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "..", "demo_out", "corpus"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "demo_out", "tokenizer"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(ADDED), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(training_texts(os.path.join(a.corpus, "train.txt")), trainer=trainer)
    n_bpe = tok.get_vocab_size()
    if n_bpe != VOCAB - len(ADDED):
        raise SystemExit(f"BPE vocabulary came out at {n_bpe}, expected {VOCAB - len(ADDED)}")
    for content, special in ADDED:   # one at a time: ids follow the list order
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                        special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<|endoftext|>") == VOCAB - len(ADDED)
    tok.save(os.path.join(a.out, "tokenizer.json"))

    with open(os.path.join(HERE, "qwen35_chat_template.jinja")) as f:
        template = f.read()
    decoder = {}
    for content, special in ADDED:
        decoder[str(tok.token_to_id(content))] = {"content": content, "lstrip": False,
                                                  "normalized": False, "rstrip": False,
                                                  "single_word": False, "special": special}
    cfg = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
           "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
           "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 4096,
           "pad_token": "<|endoftext|>", "split_special_tokens": False,
           "tokenizer_class": "TokenizersBackend", "unk_token": None}
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(a.out, "chat_template.jinja"), "w") as f:
        f.write(template)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        with open(os.path.join(a.out, name), "rb") as f:
            print(hashlib.sha256(f.read()).hexdigest(), name)


if __name__ == "__main__":
    main()
