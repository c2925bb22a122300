"""Multi-sequence decode (Engine.eval_batch, C fm_session_eval_batch): several sessions, each at its
own position, advance one token together through the one layer loop.

Reference: the same tokens evaluated session by session (Session.eval), which the rest of the suite
checks against transformers. The batched step runs the matmul kernels on n rows where the single
step runs the matrix-vector ones, so the logits agree to float rounding, not bit for bit. The MoE
layers read the union of the batch's routed experts once: checked against the routing that the
reference sessions record (trace) and the step's expert-load counter.
"""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import ARCHS, make_tiny_hf  # noqa: E402

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.convert import convert  # noqa: E402
from pyflashmoe.errors import ArgumentError, ContextFullError, ModelIOError  # noqa: E402

PROMPTS = (5, 9, 2, 14)  # prompt lengths of the sessions (different positions in every step)


@pytest.fixture(scope="module", params=[(a, b) for a in ARCHS for b in (16, 4)],
                ids=[f"{a}-{'bf16' if b == 16 else 'q4'}" for a in ARCHS for b in (16, 4)])
def model_dir(request, tmp_path_factory):
    arch, bits = request.param
    root = tmp_path_factory.mktemp(f"batch_{arch}_{bits}")
    hf, _ = make_tiny_hf(arch, str(root / "hf"), seed=0)
    kw = {} if bits == 16 else {"group_size": 32}
    return convert(hf, str(root / "fm"), bits=bits, progress=False, **kw)


def _close(ours, ref, rel=2e-4):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert np.all(np.isfinite(ours))
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def _prompts(vocab, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).astype(np.int32) for n in PROMPTS]


def _schedule(n_seq, steps=6):
    """Which sessions take part in each step: all, then subsets in changing order (a request
    joining or leaving the running batch between steps)."""
    out = []
    for s in range(steps):
        if s % 3 == 0:
            out.append(list(range(n_seq)))
        elif s % 3 == 1:
            out.append(list(range(n_seq - 1, -1, -2)))
        else:
            out.append([i for i in range(n_seq) if i != s % n_seq])
    return out


def run_both(eng, prompts, steps=6, n_ctx=64, trace=False):
    """(batched logits, reference logits, per-step loads of the batched step, reference traces)."""
    bat = [core.Session(eng, n_ctx) for _ in prompts]
    ref = [core.Session(eng, n_ctx) for _ in prompts]
    if trace:
        for r in ref:
            r.set_trace(cap_tokens=64, counts=False, layer_ms=False)
    nxt = []
    for p, b, r in zip(prompts, bat, ref):
        lb = b.eval(p)
        lr = r.eval(p)
        _close(lb, lr, rel=0)  # the same call on both sides: bit-identical
        nxt.append(int(np.argmax(lr)))
    got, want, loads = [], [], []
    for who in _schedule(len(prompts), steps):
        toks = np.array([nxt[i] for i in who], dtype=np.int32)
        out = eng.eval_batch([bat[i] for i in who], toks)
        loads.append(bat[who[0]].stats()["last_expert_loads"])
        exp = np.stack([ref[i].eval([nxt[i]]) for i in who])
        got.append(out)
        want.append(exp)
        for j, i in enumerate(who):
            assert bat[i].pos == ref[i].pos
            nxt[i] = int(np.argmax(exp[j]))
    return got, want, loads, ref, bat


def test_batched_decode_matches_session_by_session(model_dir):
    eng = core.Engine(model_dir, n_threads=2)
    got, want, _, _, _ = run_both(eng, _prompts(eng.n_vocab))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        _close(g, w)
        assert np.array_equal(np.argmax(g, axis=1), np.argmax(w, axis=1))


def test_moe_layers_read_the_union_of_the_batch_experts_once(model_dir):
    """No RAM cache: every expert block a step needs is one load. The batched step loads the union
    of its rows' experts per MoE layer; the rows evaluated one by one load K per row and layer."""
    eng = core.Engine(model_dir, n_threads=2)
    prompts = _prompts(eng.n_vocab, seed=3)
    _, _, loads, ref, _ = run_both(eng, prompts, steps=3, trace=True)
    traces = [r.trace()["ids"] for r in ref]
    K = eng.experts_per_token
    n_moe = sum(1 for il in range(eng.n_layers) if eng.expert_block_bytes(il) > 0)
    for step, who in enumerate(_schedule(len(prompts), 3)):
        union = 0
        for il in range(eng.n_layers):
            if eng.expert_block_bytes(il) == 0:
                continue
            ids = set()
            for i in who:
                row = len(prompts[i]) + sum(1 for w in _schedule(len(prompts), 3)[:step] if i in w)
                ids |= set(int(e) for e in traces[i][row, il])
            union += len(ids)
        assert loads[step] == union, (step, loads[step], union)
        assert union <= len(who) * K * n_moe
    assert any(loads[s] < len(w) * K * n_moe for s, w in enumerate(_schedule(len(prompts), 3)))


def test_demo_model_batched_greedy_equals_alone():
    import pyflashmoe
    m = pyflashmoe.Model.load()
    eng = m.engine
    tok = m.tokenizer
    prompts = [np.array(tok.encode(t), dtype=np.int32) for t in
               ("Once upon a time", "In the beginning God created", "The king said unto", "Holmes")]
    got, want, _, _, _ = run_both(eng, prompts, steps=9, n_ctx=128)
    for g, w in zip(got, want):
        _close(g, w, rel=5e-4)
        assert np.array_equal(np.argmax(g, axis=1), np.argmax(w, axis=1))


def test_eval_batch_errors_leave_sessions_untouched(model_dir, tmp_path):
    eng = core.Engine(model_dir, n_threads=2)
    a, b = core.Session(eng, 8), core.Session(eng, 4)
    a.eval([5, 6, 7])
    b.eval([5, 6, 7, 8])  # full
    with pytest.raises(ContextFullError, match="session 1 holds 4 tokens"):
        eng.eval_batch([a, b], [1, 2])
    assert (a.pos, b.pos) == (3, 4)
    with pytest.raises(ArgumentError, match="appears twice|also session"):
        eng.eval_batch([a, a], [1, 2])
    with pytest.raises(ArgumentError, match="one id per session"):
        eng.eval_batch([a], [1, 2])
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        eng.eval_batch([a, core.Session(eng, 8)], [1, eng.n_vocab])
    with pytest.raises(ArgumentError, match="empty"):
        eng.eval_batch([], [])
    other = core.Engine(model_dir, n_threads=1)
    with pytest.raises(ArgumentError, match="another Engine"):
        eng.eval_batch([a, core.Session(other, 8)], [1, 2])
    with pytest.raises(ArgumentError, match="not a Session"):
        eng.eval_batch([a, "b"], [1, 2])
    t = core.Session(eng, 8)
    t.set_trace(cap_tokens=4)
    with pytest.raises(ArgumentError, match="routing trace"):
        eng.eval_batch([a, t], [1, 2])
    assert a.pos == 3
    out = eng.eval_batch([a], [1])  # one session: a plain decode step
    assert out.shape == (1, eng.n_vocab) and a.pos == 4


def test_io_error_mid_step_resets_every_session(model_dir, tmp_path):
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    man = json.loads((d / "pyflashmoe.json").read_text())
    layers = man["experts"]["layers"]
    last = layers[max(layers, key=int)]
    path = d / last["file"]
    eng = core.Engine(str(d), n_threads=2)
    ses = [core.Session(eng, 16) for _ in range(3)]
    for i, s in enumerate(ses):
        s.eval(np.arange(3 + i, 6 + 2 * i, dtype=np.int32))
    with open(path, "r+b") as f:  # the last MoE layer keeps only its first expert
        f.truncate(last["data_offset"] + last["block_bytes"])
    with pytest.raises(ModelIOError, match="every session of the batch was reset"):
        eng.eval_batch(ses, [7, 8, 9])
    assert [s.pos for s in ses] == [0, 0, 0]


# ---------------------------------------------------------------- CUDA backend

HAVE_CUDA = hasattr(core, "cuda_available") and core.cuda_available()
CUDA_WHY = ("pyflashmoe._core has no CUDA API" if not hasattr(core, "cuda_available") else
            "this build has no CUDA backend (built without nvcc or FLASHMOE_CUDA=0)"
            if not core.cuda_compiled() else core.cuda_describe())


@pytest.mark.skipif(not HAVE_CUDA, reason=CUDA_WHY)
@pytest.mark.parametrize("tier", ["resident", "vram_lru"])
def test_cuda_batched_decode_matches_cpu(model_dir, tier):
    """CUDA multi-sequence steps (each row's attention / conv / recurrent state in its own session's
    VRAM, the MoE union through the resident table or the VRAM LRU) against the CPU backend one
    session at a time."""
    cpu = core.Engine(model_dir, backend=0, n_threads=2)
    kw = {}
    if tier == "vram_lru":
        bb = max(cpu.expert_block_bytes(i) for i in range(cpu.n_layers))
        kw["vram_budget"] = 3 * bb  # fewer slots than a batch's union: several chunks per layer
    gpu = core.Engine(model_dir, backend=1, **kw)
    prompts = _prompts(cpu.n_vocab, seed=5)
    bat = [core.Session(gpu, 64) for _ in prompts]
    ref = [core.Session(cpu, 64) for _ in prompts]
    nxt = []
    for p, b, r in zip(prompts, bat, ref):
        lr = r.eval(p)
        _close(b.eval(p), lr)
        nxt.append(int(np.argmax(lr)))
    for who in _schedule(len(prompts), 6):
        out = gpu.eval_batch([bat[i] for i in who], np.array([nxt[i] for i in who], dtype=np.int32))
        exp = np.stack([ref[i].eval([nxt[i]]) for i in who])
        _close(out, exp)
        for j, i in enumerate(who):
            assert bat[i].pos == ref[i].pos
            nxt[i] = int(np.argmax(exp[j]))
    # single-session decode after batched steps still agrees (graph path, state carried)
    for i in range(len(prompts)):
        _close(bat[i].eval([nxt[i]]), ref[i].eval([nxt[i]]))
