"""Token ids the tokenizer does not have are never sampled (issue 11 item 8).

Checkpoints pad the embedding / LM head past the tokenizer (Qwen3.5: 248,320 rows for 248,077
ids). Before the fix a padded id could be drawn (greedy, sampling, constrained decoding) and the
stream decoder then raised "token id ... is not in the vocabulary": `run` ended, `chat` lost the
conversation and a server request failed.

Part 1 uses a fake engine whose padded ids get a large logit bonus, so greedy decoding and every
sampling setting would pick them without the mask. Part 2 converts a tiny random Qwen3.5-MoE whose
vocab_size (embedding rows) is 1,024 past the shipped demo's 4,096-id tokenizer and runs
`generate`, `flashmoe run`, `flashmoe chat` and a server request at temperature 50. Everything
reads only the repository (the demo tokenizer is package data).
"""
import io
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import pyflashmoe
from pyflashmoe import generate as G
from pyflashmoe.errors import ContextFullError, ModelIOError, NumericalError
from pyflashmoe.sampling import Sampler, SamplingParams, VocabMask, vocab_mask
from pyflashmoe.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(pyflashmoe.__file__), "demo", "model")
PAD = 1024  # embedding rows past the tokenizer

SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=50.0),
    dict(temperature=50.0, top_k=2000),
    dict(temperature=50.0, top_p=0.999),
    dict(temperature=50.0, min_p=0.001),
    dict(temperature=5.0, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.3),
]


@pytest.fixture(scope="module")
def demo_tok():
    return Tokenizer.from_dir(DEMO)


# ----------------------------------------------------------------------------- the mask itself
def _wordlevel_with_gap(tmp_path):
    """A tokenizer.json whose ids are 0..9 and 15 (ids 10..14 are holes)."""
    vocab = {f"w{i}": i for i in range(10)}
    vocab["<|end|>"] = 15
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": 15, "content": "<|end|>", "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}],
          "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
          "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj))
    return Tokenizer(p, {"eos_token": "<|end|>"})


def test_vocab_mask_padding_and_holes(demo_tok, tmp_path):
    n_tok = demo_tok.vocab_size
    assert vocab_mask(demo_tok, n_tok) is None  # nothing to mask: no cost at all
    assert vocab_mask(None, n_tok + 5) is None  # token ids in, token ids out
    m = vocab_mask(demo_tok, n_tok + PAD)
    assert m.n == n_tok and m.holes.size == 0
    gap = _wordlevel_with_gap(tmp_path)
    m = vocab_mask(gap, 20)
    assert m.n == 16 and m.holes.tolist() == [10, 11, 12, 13, 14]
    x = np.arange(20, dtype=np.float32)
    y = m.apply(x)
    assert y.shape == (16,) and np.isneginf(y[10:15]).all() and y[15] == 15 and x[12] == 12


@pytest.mark.parametrize("kw", SETTINGS)
def test_sampler_never_draws_masked_ids(kw, tmp_path):
    gap = _wordlevel_with_gap(tmp_path)
    mask = vocab_mask(gap, 40)
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(seed=1, **kw), mask=mask)
    unmasked = Sampler(SamplingParams(seed=1, **kw))
    bad = set(range(10, 15)) | set(range(16, 40))
    hits_without = 0
    for _ in range(300):
        x = rng.standard_normal(40).astype(np.float32)
        x[10:15] += 6.0
        x[16:] += 6.0  # the masked ids are the likeliest
        assert s.sample(x) not in bad
        hits_without += unmasked.sample(x) in bad
    assert hits_without > 0  # the test would catch a sampler without the mask


def test_sampler_mask_after_processor():
    # a processor (grammar) that allows only padded ids plus one real id: the real id is drawn;
    # one that allows only padded ids: NumericalError, never a padded id
    mask = VocabMask(8, np.zeros(0, np.int64))
    x = np.zeros(12, np.float32)
    x[:] = -np.inf
    x[[3, 9, 10]] = [0.0, 50.0, 50.0]
    for kw in SETTINGS:
        assert Sampler(SamplingParams(seed=0, **kw), mask=mask).sample(x) == 3
    x[3] = -np.inf
    with pytest.raises(NumericalError, match="tokenizer lacks"):
        Sampler(SamplingParams(), mask=mask).sample(x)


# ----------------------------------------------------------------------------- fake engine
class PaddedEngine:
    """Logits depend on the history (hash-seeded noise); every id >= n_tok gets +30, so without
    the mask greedy decoding picks a padded id at once and sampling picks them all the time."""

    def __init__(self, n_tok, pad=PAD):
        self.n_vocab = n_tok + pad
        self.n_tok = n_tok
        self.n_layers, self.hidden, self.experts_per_token = 2, 8, 2
        self.calls = 0
        self.fail_at_call = None
        self.fail_in_prefill_no = None  # fail at the 3rd eval after this (1-based) prefill
        self.prefills = 0
        self._since = None

    def logits_for(self, hist):
        seed = zlib.crc32(np.asarray(hist, dtype=np.int64).tobytes())
        x = np.random.default_rng(seed).standard_normal(self.n_vocab).astype(np.float32)
        x[self.n_tok:] += 30.0
        return x


class PaddedSession:
    def __init__(self, engine, n_ctx):
        self.engine, self.n_ctx, self.hist = engine, n_ctx, []

    @property
    def pos(self):
        return len(self.hist)

    def reset(self):
        self.hist = []

    def stats(self):
        return dict.fromkeys(G._STAT_KEYS, 0)

    def eval(self, tokens, all_logits=False):
        e = self.engine
        e.calls += 1
        if self.pos + tokens.size > self.n_ctx:
            raise ContextFullError("fake: context full")
        assert 0 <= tokens.min() and tokens.max() < e.n_vocab
        if tokens.size > 1:
            e.prefills += 1
            e._since = 0 if e.prefills == e.fail_in_prefill_no else None
        elif e._since is not None:
            e._since += 1
        if (e.fail_at_call is not None and e.calls == e.fail_at_call) or e._since == 3:
            e._since = None
            raise ModelIOError("fake: expert read failed")
        rows = []
        for t in tokens:
            self.hist.append(int(t))
            rows.append(e.logits_for(self.hist))
        return np.stack(rows) if all_logits else rows[-1]


def _fake_model(tok, ctx=2048):
    eng = PaddedEngine(tok.vocab_size)
    return G.Model(eng, PaddedSession, tokenizer=tok, spec={"max_position_embeddings": 4096},
                   context_length=ctx), eng


@pytest.mark.parametrize("kw", SETTINGS)
def test_generate_never_emits_padded_ids(demo_tok, kw):
    m, eng = _fake_model(demo_tok)
    pieces = list(m.generate("Once upon a time", max_tokens=40, seed=3, ignore_eos=True, **kw))
    toks = [p.token for p in pieces]
    assert len(toks) == 40 and max(toks) < demo_tok.vocab_size
    assert pieces[-1].finish_reason == "length"
    assert "".join(p.text for p in pieces) == demo_tok.decode(toks)


def test_generate_constrained_json_with_padded_vocab(demo_tok):
    pytest.importorskip("llguidance", reason="JSON constraints need llguidance")
    from pyflashmoe.constrain import json_constraint
    m, _ = _fake_model(demo_tok)
    m.eos_token_ids = {demo_tok.token_to_id("<|im_end|>")}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for temp in (0.0, 50.0):
        c = json_constraint(m, schema, max_tokens=60)
        pieces = list(m.generate("JSON:", max_tokens=60, temperature=temp, seed=1,
                                 logits_processor=c))
        assert max(p.token for p in pieces) < demo_tok.vocab_size
        obj = json.loads("".join(p.text for p in pieces))
        assert isinstance(obj["a"], int)


def test_server_request_with_padded_vocab(demo_tok):
    pytest.importorskip("fastapi", reason="the server needs fastapi")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient
    from pyflashmoe.server import Server, build_app
    m, _ = _fake_model(demo_tok)
    client = TestClient(build_app(Server(m, "padded")))
    for body in ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
                  "temperature": 50},
                 {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
                  "temperature": 0, "stream": True}):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert "not in the vocabulary" not in r.text
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 30, "temperature": 50,
                                             "seed": 7})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def _chat_cli(model, lines, monkeypatch, *extra):
    """Run pyflashmoe.chat.chat_cli in process on `model` with piped stdin; (rc, stdout, stderr)."""
    from pyflashmoe import chat as C
    monkeypatch.setattr(G, "load_from_args", lambda a: model)
    stdin, out, err = io.StringIO("".join(x + "\n" for x in lines)), io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    ns = type("A", (), dict(dir="fake", system=None, max_tokens=12, temp=50.0, top_k=None,
                            top_p=None, min_p=None, repeat_penalty=None, seed=5, verbose=True,
                            no_think=True))()
    rc = C.chat_cli(ns)
    return rc, out.getvalue(), err.getvalue()


def test_chat_cli_high_temperature_and_errors_keep_history(demo_tok, monkeypatch):
    m, eng = _fake_model(demo_tok)
    # turn 1 ok; turn 2: the engine fails mid-answer (3rd decode step); turn 3 ok
    eng.fail_in_prefill_no = 2
    rc, out, err = _chat_cli(m, ["Hello there", "Tell me more", "And then?", "/exit"], monkeypatch)
    assert rc == 0
    assert "not in the vocabulary" not in err and "Traceback" not in err
    assert err.count("[error: ") == 1 and "expert read failed" in err
    assert "the conversation is kept" in err
    sizes = [int(ln.split("[prompt ")[1].split()[0]) for ln in err.splitlines()
             if ln.startswith("[prompt ")]
    assert len(sizes) == 2  # turns 1 and 3 report their stats
    a1 = out.split("\n")[0]
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": a1},
            {"role": "user", "content": "And then?"}]
    want = demo_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                        enable_thinking=False)
    assert sizes[1] == len(want)  # the 3rd turn's prompt holds turn 1, not the failed turn 2


def test_chat_session_error_leaves_messages(demo_tok):
    from pyflashmoe.chat import ChatSession
    m, eng = _fake_model(demo_tok)
    s = ChatSession(m, system="Be brief.", max_tokens=8, temperature=50.0, seed=1)
    list(s.turn("one"))
    before = [dict(x) for x in s.messages]
    assert len(before) == 3
    eng.fail_at_call = eng.calls + 3
    with pytest.raises(ModelIOError):
        list(s.turn("two"))
    assert s.messages == before
    list(s.turn("three"))
    assert [x["content"] for x in s.messages if x["role"] == "user"] == ["one", "three"]


# ----------------------------------------------------------------------------- real tiny model
def _engine_and_converter():
    try:
        from pyflashmoe import _core
        from pyflashmoe.convert import convert  # noqa: F401
        import transformers  # noqa: F401
        return hasattr(_core, "Engine")
    except ImportError:
        return False


e2e = pytest.mark.skipif(not _engine_and_converter(),
                         reason="needs the engine (pyflashmoe._core.Engine), the converter and "
                                "transformers")


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory, demo_tok):
    """A converted tiny random Qwen3.5-MoE with 4096 + PAD embedding rows and the demo's
    4,096-id tokenizer and chat template."""
    import shutil
    from pyflashmoe.convert import convert
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import make_tiny_hf
    base = tmp_path_factory.mktemp("padded")
    hf = base / "hf"
    eos = demo_tok.token_to_id("<|im_end|>")
    make_tiny_hf("qwen3_5_moe", str(hf), seed=11, vocab_size=demo_tok.vocab_size + PAD,
                 num_hidden_layers=2, bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(DEMO, f), hf / f)
    out = base / "fm"
    convert(str(hf), str(out), bits=16, progress=False)
    return out


@e2e
def test_e2e_padded_generate_run_chat_server(padded_dir, demo_tok):
    m = G.Model.load(padded_dir, threads=2)
    assert m.n_vocab == demo_tok.vocab_size + PAD
    # the padded rows are reachable: at temperature 50 a fifth of the mass is on them
    lg = m.logits(demo_tok.encode("Once upon a time"))[-1]
    assert np.isfinite(lg[demo_tok.vocab_size:]).all()
    for kw in SETTINGS:
        toks = [p.token for p in m.generate("Once upon a time", max_tokens=48, seed=2,
                                            ignore_eos=True, **kw)]
        assert len(toks) == 48 and max(toks) < demo_tok.vocab_size, kw
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "run", str(padded_dir), "-p", "Once",
                        "-n", "48", "--temp", "50", "--seed", "4", "--threads", "2"],
                       capture_output=True, text=True, encoding="utf-8", timeout=300, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "finish: length" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "chat", str(padded_dir), "-n", "24",
                        "--temp", "50", "--seed", "4", "--threads", "2", "-v"],
                       input="Hello\nWho are you?\nBye\n", capture_output=True, text=True,
                       encoding="utf-8", timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "[error" not in r.stderr and "Traceback" not in r.stderr
    sizes = [int(ln.split("[prompt ")[1].split()[0]) for ln in r.stderr.splitlines()
             if ln.startswith("[prompt ")]
    assert len(sizes) == 3 and sizes[0] < sizes[1] < sizes[2]  # the history grows
    pytest.importorskip("fastapi", reason="the server needs fastapi")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient
    from pyflashmoe.server import Server, build_app
    client = TestClient(build_app(Server(m, "padded")))
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 48, "temperature": 50,
        "seed": 9})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
