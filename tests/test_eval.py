"""`flashmoe eval` (pyflashmoe/eval.py): perplexity, KL divergence against a reference, saved
references, argument errors, and the CLI's default run on the embedded demo. Everything runs on
the demo model shipped as package data, on short texts (ctx 64) to stay quick."""
import json
import lzma
import math
import os

import numpy as np
import pytest

from pyflashmoe import ArgumentError, FormatError
from pyflashmoe import eval as ev
from pyflashmoe.cli import main

DEMO = ev.DEMO_MODEL
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO, "pyflashmoe.json")),
                                reason="the embedded demo model is not in this tree")
CTX = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first ~6 KB of the shipped held-out text (about 4 windows of 64 tokens)."""
    with lzma.open(ev.DEMO_TEXT, "rt", encoding="utf-8") as f:
        text = f.read(6000)
    p = tmp_path_factory.mktemp("eval") / "text.txt"
    p.write_text(text, encoding="utf-8")
    return str(p)


def _run(**kw):
    kw.setdefault("ctx", CTX)
    kw.setdefault("quiet", True)
    return ev.evaluate(log=lambda m: None, **kw)


def test_ppl_is_exp_mean_nll(text_file):
    from pyflashmoe import Model
    res = _run(models=[DEMO], text=text_file, max_tokens=100)
    r = res["results"][0]
    assert r["tokens"] == 100 and res["config"]["scored_per_window"] == CTX - 1 - CTX // 2
    # independently: tokenize, windows of CTX, Model.logits, numpy log-softmax, second half
    m = Model.load(DEMO, context_length=CTX)
    with open(text_file, encoding="utf-8") as f:
        ids = m.tokenizer.encode(f.read())
    nll = []
    for w in range(len(ids) // CTX):
        win = ids[w * CTX:(w + 1) * CTX]
        z = m.logits(win[:-1]).astype(np.float64)
        lp = z - z.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        for j in range(CTX // 2, CTX - 1):
            nll.append(-lp[j, win[j + 1]])
    nll = nll[:100]
    assert r["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-9)
    assert r["k"] == 4 and r["expert_bits"] == 4 and r["dense_bits"] == 8
    assert r["size_bytes"] > 10e6 and 4 < r["bpw"] < 16


def test_self_kld_is_zero_and_k2_is_not(text_file):
    res = _run(models=[DEMO], text=text_file, ref=DEMO, ks="2,4")
    by_k = {r["k"]: r for r in res["results"]}
    # 0 up to the float32 rounding of the kept reference log-probs
    assert by_k[4]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert by_k[4]["kld_p99"] == pytest.approx(0.0, abs=1e-6)
    assert by_k[4]["top1_agreement"] == 1.0 and by_k[4]["delta_ppl"] == pytest.approx(0.0, abs=1e-9)
    assert by_k[4]["kld_exact"] is True
    assert by_k[2]["kld_mean"] > 1e-3 and by_k[2]["kld_p99"] > by_k[2]["kld_mean"]
    assert by_k[2]["top1_agreement"] < 1.0
    assert res["reference"]["ppl"] == pytest.approx(by_k[4]["ppl"], rel=1e-12)


def test_saved_reference_round_trip(text_file, tmp_path):
    # a model dir reference is saved as its top-k log-probs; eval against the file agrees with
    # eval against the dir: exact ppl / top-1, KLD a lower bound within the quantization
    p = str(tmp_path / "ref.npz.xz")
    res = _run(models=[], text=text_file, ref=DEMO, save_ref=p, ref_top_k=16)
    assert os.path.getsize(p) == res["reference"]["saved"]["bytes"] > 0
    assert res["reference"]["saved"]["payload"] == "topk"
    direct = _run(models=[DEMO], text=text_file, ref=DEMO, ks="2,4")["results"]
    saved = _run(models=[DEMO], ref=p, ks="2,4", ctx=None)["results"]    # no --text: the file's tokens
    with_text = _run(models=[DEMO], text=text_file, ref=p, ks="2,4", ctx=None)["results"]
    for d, s, t in zip(direct, saved, with_text):
        assert s["tokens"] == d["tokens"] == t["tokens"]
        assert s["ppl"] == pytest.approx(d["ppl"], rel=1e-12) and t["ppl"] == s["ppl"]
        assert s["ref_ppl"] == pytest.approx(d["ref_ppl"], rel=1e-6)
        assert s["top1_agreement"] == d["top1_agreement"]
        assert s["kld_exact"] is False
    # a reference covering fewer tokens than the text: the text is scored as far as it goes
    short = str(tmp_path / "short.npz.xz")
    _run(models=[], text=text_file, ref=DEMO, save_ref=short, max_tokens=40)
    assert _run(models=[DEMO], text=text_file, ref=short, ctx=None)["config"]["tokens"] == 40
    assert saved[1]["kld_mean"] < 1e-3                     # self, through 1/4096-nat quantization
    assert 0.5 * direct[0]["kld_mean"] < saved[0]["kld_mean"] <= direct[0]["kld_mean"] * 1.001


def test_hidden_payload_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    V, H, n = 50, 8, 7
    head = rng.standard_normal((V, H)).astype(np.float32)
    head = (head.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)   # bf16-representable
    hidden = rng.standard_normal((n, H)).astype(np.float16).astype(np.float32)
    windows = rng.integers(0, V, size=(1, 16))
    lp = ev.log_softmax(hidden @ head.T)
    tgt = ev._targets(windows, n)
    ref = ev.Reference(windows, n, -lp[np.arange(n), tgt], lp.argmax(-1), meta={"n_vocab": V},
                       hidden=hidden, head=head)
    p = str(tmp_path / "h.npz.xz")
    ev.save_reference(ref, p)
    back = ev.load_reference(p)
    assert back.exact and back.meta["payload"] == "hidden"
    np.testing.assert_allclose(back.rows(0, n)[0], lp, atol=1e-6)
    np.testing.assert_array_equal(back.windows, windows)


def test_topk_kld_is_a_lower_bound():
    rng = np.random.default_rng(1)
    V, n = 200, 30
    p = ev.log_softmax(rng.standard_normal((n, V)) * 2)
    q = ev.log_softmax(rng.standard_normal((n, V)) * 2)
    windows = np.zeros((1, 64), dtype=np.int64)
    tgt = np.zeros(n, dtype=np.int64)
    full = ev.Reference(windows, n, -p[:, 0], p.argmax(-1), full=p.astype(np.float32))
    _, kl_exact, _ = ev.token_metrics(q, full, 0, tgt)
    np.testing.assert_allclose(kl_exact, (np.exp(p) * (p - q)).sum(-1), rtol=1e-5)
    for k in (1, 10, 100, V):
        ids = np.argsort(-p, -1)[:, :k]
        topk = ev.Reference(windows, n, -p[:, 0], p.argmax(-1), ids=ids,
                            lp=ev.dequantize_lp(ev.quantize_lp(np.take_along_axis(p, ids, -1))))
        _, kl, _ = ev.token_metrics(q, topk, 0, tgt)
        assert np.all(kl <= kl_exact + 1e-3)
    assert kl == pytest.approx(kl_exact, abs=2e-3)          # k = V: exact up to quantization


@pytest.mark.parametrize("kw, err, words", [
    (dict(text="/nonexistent.txt"), ArgumentError, "--text /nonexistent.txt"),
    (dict(ks="2,x"), ArgumentError, "--k"),
    (dict(ks="0"), ArgumentError, "--k"),
    (dict(max_tokens=0), ArgumentError, "--max-tokens"),
    (dict(ctx=2), ArgumentError, "--ctx"),
    (dict(ctx=100000), ArgumentError, "fewer than one window"),
    (dict(ref="/nonexistent"), ArgumentError, "--ref /nonexistent"),
    (dict(save_ref="x.npz.xz"), ArgumentError, "--save-ref needs --ref"),
    (dict(models=["/nonexistent"]), ArgumentError, "MODEL_DIR /nonexistent"),
    (dict(ks="64"), ArgumentError, "experts_per_token=64"),
])
def test_bad_arguments(text_file, kw, err, words):
    kw = dict(dict(models=[DEMO], text=text_file), **kw)
    with pytest.raises(err, match=None) as e:
        _run(**kw)
    assert words in str(e.value)


def test_bad_reference_files(text_file, tmp_path):
    junk = tmp_path / "junk.npz.xz"
    junk.write_bytes(b"not a reference")
    with pytest.raises(FormatError, match="junk.npz.xz"):
        _run(models=[DEMO], ref=str(junk), ctx=None)
    with pytest.raises(ArgumentError, match="not the text the reference"):   # shipped ref, other text
        _run(models=[DEMO], text=text_file, ref=ev.DEMO_REF, ctx=None)
    with pytest.raises(ArgumentError, match="--ctx 64"):
        _run(models=[DEMO], ref=ev.DEMO_REF, ctx=64)
    with pytest.raises(ArgumentError, match="--plot x.pdf"):
        ev.plot({"results": []}, "x.pdf")


def test_cli_default_is_the_embedded_demo(tmp_path, capsys):
    js, svg = tmp_path / "r.json", tmp_path / "kld.svg"
    assert main(["eval", "--max-tokens", "100", "-q", "--k", "2,4", "--json", str(js),
                 "--plot", str(svg)]) == 0
    out = capsys.readouterr()
    assert "demo (embedded)" in out.out and "KLD mean" in out.out and "embedded demo" in out.err
    res = json.loads(js.read_text())
    assert res["config"]["ctx"] == 512 and res["config"]["tokens"] == 100
    assert res["reference"]["payload"] == "hidden" and res["reference"]["exact"] is True
    by_k = {r["k"]: r for r in res["results"]}
    assert 0 < by_k[4]["kld_mean"] < 0.05 and by_k[2]["kld_mean"] > by_k[4]["kld_mean"]
    assert by_k[4]["top1_agreement"] > 0.8
    head = svg.read_text()[:200]
    assert head.startswith("<svg") or head.startswith("<?xml")


def test_cli_errors_are_one_line(capsys):
    assert main(["eval", "--max-tokens", "0"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
    assert main(["eval", "--plot", "x.gif"]) == 2
    assert "--plot x.gif" in capsys.readouterr().err


def test_shipped_reference_matches_shipped_text():
    ref = ev.load_reference(ev.DEMO_REF)
    assert ref.exact and ref.meta["payload"] == "hidden" and ref.windows.shape[1] == 512
    text = ev.read_text(ev.DEMO_TEXT)
    assert ev._sha256(text.encode()) == ref.meta["text_sha256"]
    from pyflashmoe import Tokenizer
    ids = Tokenizer.from_dir(DEMO).encode(text)
    np.testing.assert_array_equal(ref.windows.reshape(-1), ids[:ref.windows.size])


def test_hf_reference_saved_as_hidden_states_is_exact(tmp_path):
    """An HF checkpoint as reference (transformers): the saved file (fp16 final hidden states +
    lm_head) reproduces the checkpoint's own log-probs, so the KLD against it is exact."""
    pytest.importorskip("torch", reason="an HF reference needs torch")
    pytest.importorskip("transformers", reason="an HF reference needs transformers")
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import make_tiny_hf
    hf, _ = make_tiny_hf("qwen3_5_moe", str(tmp_path / "hf"), seed=3)
    windows, total = ev.make_windows(np.random.default_rng(0).integers(3, 512, 200), 32, 40)
    src = ev._HFSource(hf)
    ref = ev.compute_reference(src, windows, total, exact=True, meta={"n_vocab": 512, "k": 2})
    assert ref.hidden is not None and ref.hidden.shape == (total, 64)
    p = str(tmp_path / "ref.npz.xz")
    ev.save_reference(ref, p)
    back = ev.load_reference(p)
    assert back.meta["payload"] == "hidden" and back.exact
    np.testing.assert_allclose(back.rows(0, total)[0], ref.full, atol=2e-3)
    np.testing.assert_allclose(back.nll, ref.nll, rtol=1e-6)
    # KLD of another distribution against both: equal within the fp16 rounding of h
    q = ev.log_softmax(np.asarray(ref.full, dtype=np.float64) * 0.7)
    tgt = ev._targets(windows, total)
    _, kl_full, agree = ev.token_metrics(q, ref, 0, tgt)
    _, kl_saved, agree2 = ev.token_metrics(q, back, 0, tgt)
    assert kl_full.mean() > 1e-3
    assert kl_saved.mean() == pytest.approx(kl_full.mean(), rel=1e-3)
    np.testing.assert_array_equal(agree, agree2)


def test_plot_svg_without_matplotlib(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    res = {"results": [{"bpw": b, "kld_mean": v, "k": k} for k in (2, 4)
                       for b, v in ((6.5, 0.1 * k), (8.0, 0.01 * k), (10.8, 0.001 * k))]}
    svg = tmp_path / "k.svg"
    ev.plot(res, str(svg))
    text = svg.read_text()
    assert text.startswith("<svg") and "K=2" in text and "K=4" in text and text.count("<circle") == 6
    with pytest.raises(ArgumentError, match="matplotlib"):
        ev.plot(res, str(tmp_path / "k.png"))


def test_text_without_model_dir_uses_the_embedded_demo(text_file):
    msgs = []
    res = ev.evaluate(text=text_file, ctx=CTX, max_tokens=20, quiet=True, log=msgs.append)
    assert [os.path.realpath(r["model"]) for r in res["results"]] == [os.path.realpath(DEMO)]
    assert res["reference"] is None and "embedded demo" in msgs[0]
