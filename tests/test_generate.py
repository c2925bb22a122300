"""Model / generate / `flashmoe run`.

Part 1 runs Model over a fake engine (the `_core.Session` contract: eval(int32 tokens,
all_logits) -> float32 logits, pos, reset, stats) to test stop strings, pieces, EOS, validation and
recovery. Part 2 (skipped until the engine and converter are built) runs a tiny converted model
against transformers.
"""
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from pyflashmoe import generate as G
from pyflashmoe.errors import (ArgumentError, BackendError, ContextFullError, FlashMoEError,
                               FormatError, ModelIOError)
from pyflashmoe.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fake engine
class FakeEngine:
    """A deterministic toy LM. Next-token logits depend on the whole history (hash-seeded noise);
    when `script` is set the token script[len(history) - prompt_len] gets a large bump, so greedy
    decoding replays the script."""

    def __init__(self, n_vocab, script=None, prompt_len=None):
        self.n_vocab = n_vocab
        self.n_layers = 2
        self.hidden = 8
        self.experts_per_token = 2
        self.script = script
        self.prompt_len = prompt_len
        self.fail_at_call = None  # raise ModelIOError on this eval call number
        self.calls = 0

    def logits_for(self, hist):
        seed = zlib.crc32(np.asarray(hist, dtype=np.int64).tobytes())
        x = np.random.default_rng(seed).standard_normal(self.n_vocab).astype(np.float32)
        if self.script is not None and self.prompt_len is not None:
            k = len(hist) - self.prompt_len
            if 0 <= k < len(self.script):
                x[self.script[k]] += 40.0
        return x


class FakeSession:
    def __init__(self, engine, n_ctx):
        self.engine, self.n_ctx = engine, n_ctx
        self.hist = []
        self._stats = dict.fromkeys(G._STAT_KEYS, 0)

    @property
    def pos(self):
        return len(self.hist)

    def reset(self):
        self.hist = []

    def stats(self):
        return dict(self._stats)

    def reset_stats(self):
        self._stats = dict.fromkeys(G._STAT_KEYS, 0)

    def eval(self, tokens, all_logits=False):
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int32 and tokens.ndim == 1
        assert tokens.flags.c_contiguous and tokens.size > 0
        e = self.engine
        e.calls += 1
        if self.pos + tokens.size > self.n_ctx:
            raise ContextFullError("fake: context full")
        if tokens.min() < 0 or tokens.max() >= e.n_vocab:
            raise ArgumentError("fake: token id out of range")
        if e.fail_at_call is not None and e.calls == e.fail_at_call:
            self.hist = self.hist + [int(t) for t in tokens[:1]]  # half-done state
            raise ModelIOError("fake: expert read failed")
        rows = []
        for t in tokens:
            self.hist.append(int(t))
            if all_logits:
                rows.append(e.logits_for(self.hist))
        self._stats["n_eval_calls"] += 1
        self._stats["n_tokens"] += int(tokens.size)
        self._stats["ms_total"] += 1.0 * tokens.size
        return np.stack(rows) if all_logits else e.logits_for(self.hist)


@pytest.fixture(scope="module")
def tok(test_data):
    return Tokenizer.from_dir(test_data.qwen3_tokenizer)


def make_model(tok, script_text=None, prompt=None, ctx=4096, gen_cfg=None, eos=True):
    script = tok.encode(script_text) if script_text is not None else None
    if script is not None and eos:
        script = script + [tok.eos_token_id]
    plen = len(tok.encode(prompt)) if prompt is not None else None
    eng = FakeEngine(tok.vocab_size, script, plen)
    m = G.Model(eng, FakeSession, tokenizer=tok, spec={"max_position_embeddings": 32768},
                context_length=ctx, generation_config=gen_cfg)
    return m, eng


PROMPT = "Tell me something."
TEXT = "Hello world! 你好，世界 🚀 The quick brown fox jumps over the lazy dog. END of story."


def _run(m, prompt=PROMPT, **kw):
    pieces = list(m.generate(prompt, **kw))
    return "".join(p.text for p in pieces), pieces


# ----------------------------------------------------------------------------- unit tests
def test_greedy_replays_script_and_eos(tok):
    m, _ = make_model(tok, TEXT, PROMPT)
    text, pieces = _run(m, max_tokens=200)
    assert text == TEXT
    assert pieces[-1].finish_reason == "stop" and pieces[-1].token == tok.eos_token_id
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert all("\ufffd" not in p.text for p in pieces)
    assert [p.token for p in pieces[:-1]] == tok.encode(TEXT)
    assert m.stats["generated_tokens"] == len(pieces) and m.stats["finish_reason"] == "stop"
    assert all(p.logprob is not None and p.logprob <= 0 for p in pieces)


def test_length(tok):
    m, _ = make_model(tok, TEXT, PROMPT)
    text, pieces = _run(m, max_tokens=7)
    assert len(pieces) == 7 and pieces[-1].finish_reason == "length"
    assert text == tok.decode(tok.encode(TEXT)[:7])
    _, pieces0 = _run(m, max_tokens=0)
    assert len(pieces0) == 1 and pieces0[0].finish_reason == "length" and pieces0[0].text == ""
    # ignore_eos runs past the EOS token
    n = len(tok.encode(TEXT)) + 3
    _, pieces = _run(m, max_tokens=n, ignore_eos=True)
    assert len(pieces) == n and pieces[-1].finish_reason == "length"


def test_stop_strings_everywhere(tok):
    """For many stop strings (spanning token boundaries, inside multi-byte chars' tokens, at the
    very start), the text is the full output cut before the first occurrence."""
    m, _ = make_model(tok, TEXT, PROMPT)
    rng = np.random.default_rng(0)
    stops = ["world", "o w", "! 你", "界 🚀", "🚀", "fox jumps", "H", ".", "END of story.",
             "lazy dog. E", "not there", "x" * 40]
    for _ in range(25):
        a = int(rng.integers(0, len(TEXT) - 1))
        b = int(rng.integers(a + 1, min(len(TEXT), a + 12) + 1))
        stops.append(TEXT[a:b])
    for s in stops:
        text, pieces = _run(m, max_tokens=200, stop=s)
        i = TEXT.find(s)
        if i < 0:
            assert text == TEXT and pieces[-1].finish_reason == "stop"
        else:
            assert text == TEXT[:i], s
            assert pieces[-1].finish_reason == "stop"
        # nothing emitted before the end may contain a stop string's beginning that later completed
        assert s not in text
    # several stops: the earliest occurrence wins
    text, _ = _run(m, max_tokens=200, stop=["lazy", "quick", "zzz"])
    assert text == TEXT[:TEXT.find("quick")]
    # stop + length: held-back text is released on the last token
    n = len(tok.encode("Hello world"))
    text, pieces = _run(m, max_tokens=n, stop="world!!")
    assert text == "Hello world" and pieces[-1].finish_reason == "length"


def test_streaming_holds_back_only_what_it_must(tok):
    m, _ = make_model(tok, TEXT, PROMPT)
    _, pieces = _run(m, max_tokens=200, stop="zzz")
    # no stop-prefix in the text: every piece but byte-split ones is emitted immediately
    ids = tok.encode(TEXT)
    for k, p in enumerate(pieces[:-1]):
        assert "".join(q.text for q in pieces[:k + 1]) == tok.decode(ids[:k + 1]).rstrip("\ufffd")


def test_chat_messages_use_template(tok):
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    eng = FakeEngine(tok.vocab_size, tok.encode("Hello!") + [tok.eos_token_id], len(ids))
    m = G.Model(eng, FakeSession, tokenizer=tok, context_length=256)
    text, _ = _run(m, msgs, max_tokens=20)
    assert text == "Hello!"
    assert m.session.hist[:len(ids)] == ids
    ids2 = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, enable_thinking=False)
    assert len(ids2) > len(ids)
    m.generate(msgs, max_tokens=1, chat_template_kwargs={"enable_thinking": False}).__next__()
    assert m.session.hist == ids2  # the template saw enable_thinking
    # token-id prompts are accepted as is
    text, _ = _run(m, ids, max_tokens=20)
    assert text == "Hello!"


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=3), "stop"),
])
def test_validation_and_still_usable(tok, kw, name):
    m, eng = make_model(tok, TEXT, PROMPT)
    with pytest.raises(ArgumentError, match=name):
        m.generate(PROMPT, **kw)  # raises at call time, before iterating
    assert eng.calls == 0
    text, _ = _run(m, max_tokens=200)
    assert text == TEXT


def test_bad_prompts(tok):
    m, _ = make_model(tok, TEXT, PROMPT, ctx=64)
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        m.generate([1, 2, tok.vocab_size + 5])
    with pytest.raises(ArgumentError):
        m.generate(3.5)
    with pytest.raises(ContextFullError, match="context length"):
        m.generate("word " * 100)
    with pytest.raises(ArgumentError):
        m.logits([[1, 2]])
    with pytest.raises(ArgumentError):
        m.logits([])
    assert _run(m, max_tokens=200)[0] == TEXT
    with m:
        pass
    with pytest.raises(FlashMoEError, match="closed"):
        _run(m, max_tokens=2)


def test_context_limit_ends_with_length(tok):
    plen = len(tok.encode(PROMPT))
    m, _ = make_model(tok, TEXT, PROMPT, ctx=plen + 5)
    text, pieces = _run(m, max_tokens=100)
    assert pieces[-1].finish_reason == "length"
    assert len(pieces) == 6  # 5 tokens fit after the prompt, the 6th is sampled but not evaluated
    assert text == tok.decode(tok.encode(TEXT)[:6])


def test_io_error_midway_then_usable(tok):
    m, eng = make_model(tok, TEXT, PROMPT)
    ref, _ = _run(m, max_tokens=200)
    eng.calls = 0
    eng.fail_at_call = 4
    with pytest.raises(ModelIOError):
        _run(m, max_tokens=200)
    eng.fail_at_call = None
    assert m.session.pos == 0  # reset after the error
    text, _ = _run(m, max_tokens=200)
    assert text == ref
    eng.calls = 0
    eng.fail_at_call = 1  # during prefill
    with pytest.raises(ModelIOError):
        m.generate(PROMPT, max_tokens=5).__next__()
    eng.fail_at_call = None
    assert _run(m, max_tokens=200)[0] == ref


def test_logits_fresh_state_and_argmax_chain(tok):
    m, eng = make_model(tok)
    ids = tok.encode("Some prompt text")
    lg = m.logits(ids)
    assert lg.dtype == np.float32 and lg.shape == (len(ids), tok.vocab_size)
    for k in range(len(ids)):
        np.testing.assert_array_equal(lg[k], eng.logits_for(ids[:k + 1]))
    _run(m, ids, max_tokens=3)
    np.testing.assert_array_equal(m.logits(ids), lg)  # fresh state, not appended
    # greedy generate == argmax chaining of logits()
    seq = list(ids)
    for _ in range(8):
        seq.append(int(np.argmax(m.logits(seq)[-1])))
    got = [p.token for p in m.generate(ids, max_tokens=8, ignore_eos=True)]
    assert got == seq[len(ids):]


def test_prefix_reuse_matches_fresh(tok):
    m, eng = make_model(tok)
    ids = tok.encode("A conversation turn")
    first = [p.token for p in m.generate(ids, max_tokens=6, ignore_eos=True)]
    ids2 = ids + first + tok.encode(" and a follow-up")
    second = [p.token for p in m.generate(ids2, max_tokens=6, ignore_eos=True)]
    assert m.stats["cached_tokens"] == len(ids) + len(first) - 1
    fresh, _ = make_model(tok)
    assert [p.token for p in fresh.generate(ids2, max_tokens=6, ignore_eos=True)] == second
    # a prompt that does not extend the held tokens is evaluated from scratch
    third = [p.token for p in m.generate(ids, max_tokens=6, ignore_eos=True)]
    assert third == first and m.stats["cached_tokens"] == 0


def test_seeded_sampling_reproducible(tok):
    m, _ = make_model(tok)
    ids = tok.encode("Random")
    a = [p.token for p in m.generate(ids, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)]
    b = [p.token for p in m.generate(ids, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)]
    c = [p.token for p in m.generate(ids, max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)]
    assert a == b and a != c


def test_generation_config_defaults(tok):
    m, _ = make_model(tok, gen_cfg={"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                                    "eos_token_id": [151643, 151645]})
    assert m.default_sampling() == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert {151643, 151645} <= m.eos_token_ids
    m2, _ = make_model(tok, gen_cfg={"do_sample": False, "temperature": 0.6})
    assert m2.default_sampling() == {"temperature": 0.0}
    ids = tok.encode("x")
    # sampled by default: two seeds differ; explicit temperature=0 is greedy
    a = [p.token for p in m.generate(ids, max_tokens=8, seed=1, ignore_eos=True)]
    b = [p.token for p in m.generate(ids, max_tokens=8, seed=2, ignore_eos=True)]
    assert a != b
    g = [p.token for p in m.generate(ids, max_tokens=8, temperature=0, ignore_eos=True)]
    assert g == [p.token for p in m2.generate(ids, max_tokens=8, ignore_eos=True)]


def test_interleaved_generators_rejected(tok):
    m, _ = make_model(tok, TEXT, PROMPT)
    g1 = m.generate(PROMPT, max_tokens=50)
    next(g1)
    text, _ = _run(m, max_tokens=200)
    assert text == TEXT
    with pytest.raises(FlashMoEError, match="superseded"):
        list(g1)


def test_parse_size():
    assert G.parse_size("16GiB") == 16 * 2 ** 30
    assert G.parse_size("512MB") == 512 * 10 ** 6
    assert G.parse_size(4096) == 4096 and G.parse_size(None) == 0
    for bad in ("lots", "-1GB", "12XB", -5, True):
        with pytest.raises(ArgumentError, match="ram_budget"):
            G.parse_size(bad)


def test_load_errors(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        G.Model.load(tmp_path / "missing")
    with pytest.raises(FormatError, match="pyflashmoe.json"):
        G.Model.load(tmp_path)
    (tmp_path / "pyflashmoe.json").write_text("{not json")
    with pytest.raises(FormatError, match="invalid JSON"):
        G.Model.load(tmp_path)
    (tmp_path / "pyflashmoe.json").write_text(json.dumps({"spec": {"n_experts": 8}}))
    with pytest.raises(ArgumentError, match="backend"):
        G.Model.load(tmp_path, backend="tpu")
    if not G.cuda_available():
        with pytest.raises(BackendError, match="cuda"):
            G.Model.load(tmp_path, backend="cuda")
    with pytest.raises(ArgumentError, match="experts_per_token"):
        G.Model.load(tmp_path, experts_per_token=9)
    with pytest.raises(ArgumentError, match="ram_budget"):
        G.Model.load(tmp_path, ram_budget="much")


# ----------------------------------------------------------------------------- end to end
def _engine_available():
    try:
        from pyflashmoe import _core
        return hasattr(_core, "Engine") and hasattr(_core, "Session")
    except ImportError:
        return False


def _converter_available():
    try:
        from pyflashmoe.convert import convert  # noqa: F401
        return True
    except ImportError:
        return False


e2e = pytest.mark.skipif(not (_engine_available() and _converter_available()),
                         reason="needs the engine (pyflashmoe._core.Engine) and the converter "
                                "(pyflashmoe.convert.convert); not built yet")


def _tiny_tokenizer(dirpath, test_data, vocab=512):
    """A ByteLevel BPE tokenizer with the tiny model's vocabulary size, trained on public text,
    plus the Qwen3 chat template, so text prompts work end to end."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tr = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = test_data.text("tinyshakespeare_input_200k.txt")
    t.train_from_iterator([text], tr)
    assert t.get_vocab_size() <= vocab
    t.save(str(dirpath / "tokenizer.json"))
    qcfg = json.loads((test_data.qwen3_tokenizer / "tokenizer_config.json").read_text())
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
           "chat_template": qcfg["chat_template"]}
    (dirpath / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, test_data):
    from pyflashmoe.convert import convert
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import load_tiny_hf, make_tiny_hf
    base = tmp_path_factory.mktemp("gen_tiny")
    hf = base / "hf"
    make_tiny_hf("qwen3_5_moe", str(hf), seed=3)
    _tiny_tokenizer(hf, test_data)
    out = base / "fm"
    convert(str(hf), str(out), bits=16, progress=False)
    if not (out / "tokenizer.json").exists():  # older converter: copy by hand
        import shutil
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf / f, out / f)
    return hf, out, load_tiny_hf


@e2e
def test_e2e_greedy_matches_logits_chain_and_transformers(tiny):
    import torch
    hf, out, load_tiny_hf = tiny
    m = G.Model.load(out, threads=2)
    ids = [5, 17, 300, 42, 7, 99]
    got = [p.token for p in m.generate(ids, max_tokens=16, temperature=0, ignore_eos=True)]
    seq = list(ids)
    for _ in range(16):
        seq.append(int(np.argmax(m.logits(seq)[-1])))
    assert got == seq[len(ids):]
    ref_model = load_tiny_hf("qwen3_5_moe", str(hf))
    ref_model = ref_model.to(torch.bfloat16).to(torch.float32).eval()
    ref_model.generation_config.eos_token_id = None  # run all 16 steps, like ignore_eos
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)
    assert ref.shape[1] == len(ids) + 16
    assert got == ref[0, len(ids):].tolist()


@e2e
def test_e2e_text_and_stats(tiny):
    _, out, _ = tiny
    m = G.Model.load(out, threads=2, context_length=128)
    assert m.tokenizer is not None and m.context_length == 128
    pieces = list(m.generate("ROMEO: ", max_tokens=10, ignore_eos=True))
    assert len(pieces) == 10 and pieces[-1].finish_reason == "length"
    assert m.stats["prompt_tps"] > 0 and m.stats["decode_tps"] > 0
    assert m.stats["decode"].get("n_tokens") == 9
    pieces = list(m.generate([{"role": "user", "content": "Hi"}], max_tokens=4))
    assert 1 <= len(pieces) <= 4


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pyflashmoe", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@e2e
def test_e2e_cli_run(tiny):
    _, out, _ = tiny
    r = _cli("run", str(out), "-p", "ROMEO: ", "-n", "8", "--threads", "2", "--timing")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "I/O wait" in r.stderr and "read per token" in r.stderr
    assert "Traceback" not in r.stderr
    m = G.Model.load(out, threads=2)
    assert r.stdout.rstrip("\n") == m.generate_text("ROMEO: ", max_tokens=8)


def test_cli_bad_args_no_traceback(tmp_path):
    for args in (["run", str(tmp_path / "nope"), "-p", "x"],
                 ["run", str(tmp_path), "-p", "x", "--temp", "-1"],
                 ["run", str(tmp_path), "-p", "x", "--backend", "tpu"],
                 ["run", str(tmp_path), "-p", "x", "-n", "many"]):
        r = _cli(*args, timeout=120)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr and r.stderr.strip()


# ------------------------------------------------------------------ logit_bias (demo model)
def test_logit_bias_demo_model():
    m = G.Model.load(G.DEMO_MODEL_DIR)
    ref = [p.token for p in m.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)]
    target = 5 if ref[0] != 5 else 6  # an ordinary token of the demo vocabulary
    up = [p.token for p in m.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True,
                                      logit_bias={str(target): 100})]
    assert up == [target] * 3
    down = [p.token for p in m.generate("Hello", max_tokens=1, temperature=0, ignore_eos=True,
                                        logit_bias={ref[0]: -100})]
    assert down[0] != ref[0]
    with pytest.raises(ArgumentError, match="logit_bias"):
        m.generate("Hello", max_tokens=1, logit_bias={str(m.n_vocab): 1})
