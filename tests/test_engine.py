"""The C forward pass (pyflashmoe._core.Engine / Session) against transformers, in fp32.

For each architecture a tiny random model is built with transformers' own classes
(tests/tiny_models.py: bf16-exact parameters, saved with save_pretrained), converted with
pyflashmoe.convert, and run through both. References are transformers' Qwen3_5Moe / Qwen3Next /
Qwen3Moe ForCausalLM (fp32) and, for 4-bit experts, mlx.core.quantize (the MLX affine layout the
model dir uses).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import ARCHS, load_tiny_hf, make_tiny_hf  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.convert import convert  # noqa: E402
from pyflashmoe.errors import ArgumentError, ContextFullError  # noqa: E402

if not hasattr(core, "Engine"):
    pytest.skip("pyflashmoe._core was built without the engine", allow_module_level=True)

N_PROMPT = 12
N_GEN = 32


def _prompt(vocab, n=N_PROMPT, seed=1):
    return np.random.default_rng(seed).integers(3, vocab, size=n).astype(np.int32)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    hf_dir, cfg = make_tiny_hf(arch, str(root / "hf"), seed=0)
    out = convert(hf_dir, str(root / "fm16"), bits=16, progress=False)
    return {"arch": arch, "hf": hf_dir, "cfg": cfg, "fm16": out, "root": root}


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens[None].astype(np.int64))).logits[0].float().numpy()


def _close(ours, ref, rel=1e-4):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def test_prompt_logits_match_transformers(tiny):
    ref_model = load_tiny_hf(tiny["arch"], tiny["hf"])
    eng = core.Engine(tiny["fm16"], n_threads=2)
    toks = _prompt(eng.n_vocab)
    ref = _hf_logits(ref_model, toks)
    ses = core.Session(eng, 64)
    ours = ses.eval(toks, all_logits=True)
    assert ours.shape == (N_PROMPT, eng.n_vocab) and ours.dtype == np.float32
    assert ses.pos == N_PROMPT
    _close(ours, ref)
    # the non-all_logits path gives the last row
    ses.reset()
    last = ses.eval(toks)
    np.testing.assert_allclose(last, ours[-1], rtol=0, atol=1e-5 * float(np.abs(ours).max()))
    st = ses.stats()
    assert st["n_eval_calls"] == 2 and st["n_tokens"] == 2 * N_PROMPT
    assert st["last_n_tokens"] == N_PROMPT and st["last_expert_loads"] + st["last_expert_hits"] > 0


def test_greedy_generation_matches_transformers(tiny):
    ref_model = load_tiny_hf(tiny["arch"], tiny["hf"])
    eng = core.Engine(tiny["fm16"], n_threads=2)
    toks = _prompt(eng.n_vocab, seed=2)
    with torch.no_grad():
        gen = ref_model.generate(torch.tensor(toks[None].astype(np.int64)), max_new_tokens=N_GEN,
                                 min_new_tokens=N_GEN, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    ref_new = gen[0, N_PROMPT:].numpy().tolist()
    assert len(ref_new) == N_GEN
    ses = core.Session(eng, N_PROMPT + N_GEN)
    logits = ses.eval(toks)
    ours = []
    for _ in range(N_GEN):
        t = int(np.argmax(logits))
        ours.append(t)
        if len(ours) < N_GEN:
            logits = ses.eval([t])
    assert ours == ref_new


def test_prefill_then_decode_equals_full_forward(tiny):
    eng = core.Engine(tiny["fm16"], n_threads=2)
    toks = _prompt(eng.n_vocab, n=20, seed=3)
    full = core.Session(eng, 32).eval(toks, all_logits=True)
    ses = core.Session(eng, 32)
    part = [ses.eval(toks[:7], all_logits=True), ses.eval(toks[7:9], all_logits=True)]
    for t in toks[9:]:
        part.append(ses.eval([t], all_logits=True))
    inc = np.concatenate(part, axis=0)
    assert ses.pos == 20
    np.testing.assert_allclose(inc, full, rtol=0, atol=2e-5 * float(np.abs(full).max()))


def test_experts_per_token_override(tiny):
    cfg = tiny["cfg"]
    k2 = cfg["num_experts_per_tok"] + 2
    cls = {"qwen3_5_moe": transformers.Qwen3_5MoeForCausalLM,
           "qwen3_next": transformers.Qwen3NextForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM}[tiny["arch"]]
    ref_model = cls.from_pretrained(tiny["hf"], dtype="float32", num_experts_per_tok=k2).eval()
    assert ref_model.config.num_experts_per_tok == k2
    eng = core.Engine(tiny["fm16"], n_threads=2, experts_per_token=k2)
    assert eng.experts_per_token == k2
    toks = _prompt(eng.n_vocab, seed=4)
    ours = core.Session(eng, 32).eval(toks, all_logits=True)
    ref = _hf_logits(ref_model, toks)
    _close(ours, ref)
    # and it really differs from the model's own K
    base = core.Session(core.Engine(tiny["fm16"], n_threads=2), 32).eval(toks, all_logits=True)
    assert np.abs(base - ours).max() > 1e-3 * np.abs(ref).max()
    with pytest.raises(ArgumentError, match="experts_per_token"):
        core.Engine(tiny["fm16"], experts_per_token=10_000)


def _mlx_fake_quant(w, bits, gs):
    """Dequantized copy of w [..., in] through mlx.core.quantize (bf16 scales/biases as stored)."""
    import mlx.core as mx
    shp = w.shape
    w2 = mx.array(w.reshape(-1, shp[-1]).astype(np.float32))
    q, s, b = mx.quantize(w2, group_size=gs, bits=bits)
    q = np.array(q).view(np.uint32)
    s = np.array(s.astype(mx.bfloat16).astype(mx.float32))
    b = np.array(b.astype(mx.bfloat16).astype(mx.float32))
    per = 32 // bits
    vals = (q[:, :, None] >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    vals = vals.reshape(q.shape[0], -1).astype(np.float32)
    deq = vals * np.repeat(s, gs, axis=1) + np.repeat(b, gs, axis=1)
    return deq.reshape(shp)


def test_4bit_experts_match_mlx_quantized_reference(tiny):
    """bits=4 quantizes the routed experts only (dense stays bf16). Reference: transformers with
    every routed-expert weight replaced by its mlx.core.quantize round trip -> the same fp32
    tolerance as the bf16 model. Also a sanity bound against the bf16 model itself."""
    pytest.importorskip("mlx.core")
    bits, gs = 4, 32
    out4 = convert(tiny["hf"], str(tiny["root"] / "fm4"), bits=bits, group_size=gs, progress=False)
    ref_model = load_tiny_hf(tiny["arch"], tiny["hf"])
    eng16 = core.Engine(tiny["fm16"], n_threads=2)
    toks = _prompt(eng16.n_vocab, seed=5)
    l16 = core.Session(eng16, 32).eval(toks, all_logits=True)
    n_q = 0
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if ".mlp.experts." in name and p.dim() == 3:
                p.copy_(torch.from_numpy(_mlx_fake_quant(p.numpy(), bits, gs)))
                n_q += 1
    assert n_q > 0
    ref = _hf_logits(ref_model, toks)
    eng4 = core.Engine(out4, n_threads=2)
    assert eng4.expert_block_bytes(0) < eng16.expert_block_bytes(0)
    l4 = core.Session(eng4, 32).eval(toks, all_logits=True)
    _close(l4, ref)
    # 4-bit experts perturb but do not wreck the model: relative L2 distance to bf16 below 0.5
    # (random weights, group 32: each weight carries ~0.1 sigma of error; the residual stream and
    # the bf16 dense path keep the logits mostly intact). The exact check is the mlx one above.
    rel = np.linalg.norm(l4 - l16) / np.linalg.norm(l16)
    assert 0 < rel < 0.5, rel


def test_bad_token_and_context_overflow_leave_session_usable(tiny):
    eng = core.Engine(tiny["fm16"], n_threads=2)
    V = eng.n_vocab
    toks = _prompt(V, n=6, seed=6)
    ref = core.Session(eng, 8).eval(np.concatenate([toks, toks[:2]]), all_logits=True)
    ses = core.Session(eng, 8)
    ses.eval(toks[:4])
    with pytest.raises(ArgumentError, match=rf"token id {V}\b.*position 1"):
        ses.eval([5, V, 7])
    with pytest.raises(ArgumentError, match="token id -1"):
        ses.eval([-1])
    with pytest.raises(ArgumentError):
        ses.eval([2**40])
    assert ses.pos == 4
    with pytest.raises(ContextFullError, match="n_ctx 8"):
        ses.eval(np.concatenate([toks, toks]))
    assert ses.pos == 4
    got = ses.eval(np.concatenate([toks[4:], toks[:2]]), all_logits=True)
    assert ses.pos == 8
    np.testing.assert_allclose(got, ref[4:], rtol=0, atol=2e-5 * float(np.abs(ref).max()))
    with pytest.raises(ContextFullError):
        ses.eval([1])
    ses.reset()
    assert ses.pos == 0
    np.testing.assert_allclose(ses.eval(toks, all_logits=True), ref[:6], rtol=0,
                               atol=2e-5 * float(np.abs(ref).max()))


def test_open_errors(tmp_path, tiny):
    from pyflashmoe.errors import FormatError
    with pytest.raises(FormatError, match="pyflashmoe.json"):
        core.Engine(str(tmp_path))
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny["fm16"], bad)
    man = json.loads((bad / "pyflashmoe.json").read_text())
    man["tensors"]["blk.0.attn_norm"]["shape"] = [3]
    (bad / "pyflashmoe.json").write_text(json.dumps(man))
    with pytest.raises(FormatError, match=r'blk\.0\.attn_norm.*shape'):
        core.Engine(str(bad))
    with pytest.raises(ArgumentError):
        core.Session(core.Engine(tiny["fm16"]), 0)


def test_io_error_mid_eval_resets_session(tmp_path, tiny):
    import json
    import shutil
    from pyflashmoe.errors import ModelIOError
    d = tmp_path / "m"
    shutil.copytree(tiny["fm16"], d)
    man = json.loads((d / "pyflashmoe.json").read_text())
    layers = man["experts"]["layers"]
    last = layers[max(layers, key=int)]
    path = d / last["file"]
    good = path.read_bytes()
    eng = core.Engine(str(d), n_threads=2)
    toks = _prompt(eng.n_vocab, n=10, seed=7)
    ref = core.Session(eng, 16).eval(toks, all_logits=True)
    ses = core.Session(eng, 16)
    ses.eval(toks[:3])
    with open(path, "r+b") as f:  # cut the last MoE layer's file after its first expert
        f.truncate(last["data_offset"] + last["block_bytes"])
    with pytest.raises(ModelIOError, match="reset"):
        ses.eval(toks[3:])
    assert ses.pos == 0
    path.write_bytes(good)
    np.testing.assert_allclose(ses.eval(toks, all_logits=True), ref, rtol=0,
                               atol=2e-5 * float(np.abs(ref).max()))


def test_long_prompt_spans_internal_batches(tiny):
    """Prompts longer than the internal 512-token pass give the same logits however they are split."""
    eng = core.Engine(tiny["fm16"], n_threads=2)
    toks = _prompt(eng.n_vocab, n=600, seed=8)
    full = core.Session(eng, 600).eval(toks, all_logits=True)
    ses = core.Session(eng, 600)
    a = ses.eval(toks[:300], all_logits=True)
    b = ses.eval(toks[300:], all_logits=True)
    assert full.shape == (600, eng.n_vocab)
    np.testing.assert_allclose(np.concatenate([a, b]), full, rtol=0,
                               atol=2e-5 * float(np.abs(full).max()))
    np.testing.assert_allclose(core.Session(eng, 600).eval(toks), full[-1], rtol=0,
                               atol=2e-5 * float(np.abs(full).max()))


VARIANTS = [
    ("qwen3_moe", dict(mlp_only_layers=[1], tie_word_embeddings=True)),
    ("qwen3_moe", dict(norm_topk_prob=False, num_experts_per_tok=3)),
    ("qwen3_next", dict(decoder_sparse_step=2, num_experts_per_tok=3)),
    ("qwen3_5_moe", dict(linear_num_value_heads=2, head_dim=32, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)),
]


@pytest.mark.parametrize("arch,over", VARIANTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_layer_variants_match_transformers(tmp_path, arch, over):
    """Dense-MLP layers (mlp_only_layers / decoder_sparse_step), tied embeddings, nv == nk,
    MQA, a larger head_dim with partial RoPE: prompt logits vs transformers."""
    hf_dir, _ = make_tiny_hf(arch, str(tmp_path / "hf"), seed=3, **over)
    out = convert(hf_dir, str(tmp_path / "fm"), bits=16, progress=False)
    ref_model = load_tiny_hf(arch, hf_dir)
    eng = core.Engine(out, n_threads=2)
    toks = _prompt(eng.n_vocab, n=10, seed=9)
    ses = core.Session(eng, 16)
    ours = np.concatenate([ses.eval(toks[:6], all_logits=True), ses.eval(toks[6:], all_logits=True)])
    _close(ours, _hf_logits(ref_model, toks))
    if "mlp_only_layers" in over or "decoder_sparse_step" in over:
        assert 0 in [eng.expert_block_bytes(i) for i in range(eng.n_layers)]


def test_sessions_of_one_engine_from_two_threads(tiny):
    import threading
    eng = core.Engine(tiny["fm16"], n_threads=2)
    prompts = [_prompt(eng.n_vocab, n=9, seed=s) for s in (10, 11)]
    serial = [core.Session(eng, 16).eval(p, all_logits=True) for p in prompts]
    got = [None, None]

    def run(i):
        ses = core.Session(eng, 16)
        out = [ses.eval(prompts[i][:4], all_logits=True)]
        out += [ses.eval([t], all_logits=True) for t in prompts[i][4:]]
        got[i] = np.concatenate(out)

    th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for i in range(2):
        np.testing.assert_allclose(got[i], serial[i], rtol=0, atol=2e-5 * float(np.abs(serial[i]).max()))


@pytest.mark.parametrize("opts", [dict(ram_budget=64 << 20), dict(direct_io=True, io_threads=3)],
                         ids=["ram_cache", "direct_io"])
def test_io_options_give_the_same_logits(tiny, opts):
    toks = _prompt(512, n=8, seed=12)
    base = core.Session(core.Engine(tiny["fm16"], n_threads=2), 16).eval(toks, all_logits=True)
    ses = core.Session(core.Engine(tiny["fm16"], n_threads=2, **opts), 16)
    for rep in range(2):
        ses.reset()
        np.testing.assert_array_equal(ses.eval(toks, all_logits=True), base)
    st = ses.stats()
    if "ram_budget" in opts:  # the second pass is served from the engine's cache
        assert st["last_expert_hits"] > 0 and st["last_expert_loads"] == 0
    else:
        assert st["last_expert_loads"] > 0
