"""`flashmoe synth`: random-weight Qwen3.5-MoE models at real dimensions (model dir, optional GGUF).

Owns: the presets (the Qwen3.5-MoE family's published text configs), the streaming writer of a
random model dir (manifest, dense.safetensors, experts/L###.safetensors; atomic through
pyflashmoe.format.AtomicDir) and the GGUF writer of the same dimensions for llama.cpp (arch
`qwen35moe`, Q4_0 experts). Does not own: the layout itself (pyflashmoe.format) or the spec keys
(pyflashmoe.models).

How the weights are made (bounded memory, disk-speed):
* Dense matrices are N(0, 1/fan_in) (so every projection maps unit-RMS inputs to unit-RMS
  outputs); a small pool of bf16 normals per std is generated once and every chunk of rows is a
  window of the pool at a random offset, so nothing bigger than one chunk is ever materialised.
* Zero-centred norms are 0 (x̂*(1+0) = identity), the plain ssm_norm is 1, A_log = log U(1, 16),
  dt_bias = 1 (the transformers initialisation).
* Expert blocks are group-affine with uniformly random codes q and per-group scales
  s = g / (std(uniform codes) * sqrt(fan_in)), biases = -s * (2^bits - 1) / 2 (zero mean, std
  ~1/sqrt(fan_in)), g ~ U(0.75, 1.25). A few base blocks per layer are generated and each expert
  is one of them with its codes XOR'd with a per-expert random word (uniform codes stay uniform),
  so every block on disk is distinct and the routed experts compute different functions.
The activations stay O(1) through every layer (checked by `flashmoe run` on the 35B preset).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zlib

import numpy as np

from pyflashmoe import format as fmt
from pyflashmoe.errors import ArgumentError, ModelIOError
from pyflashmoe.models import spec_from_config, tensor_map

VOCAB = 248320
EOS_IDS = [248046, 248044]  # <|im_end|>, <|endoftext|>
TOKENIZER_VOCAB = 248077      # ids used by the Qwen3.5 tokenizer (248,044 BPE + 33 special)

# Text configs of the Qwen3.5-MoE family (HF `qwen3_5_moe_text` keys). DESIGN.md section 3 plus the
# published configs: linear key/value head dims 128, full-attention head_dim 256 with 25% rotary,
# theta 1e7, shared expert intermediate = moe intermediate, vocab 248320.
_COMMON = {
    "model_type": "qwen3_5_moe_text", "vocab_size": VOCAB, "head_dim": 256,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "rope_type": "default"},
    "max_position_embeddings": 262144, "eos_token_id": EOS_IDS[0],
}
PRESETS = {
    "qwen3.5-397b-a17b": dict(_COMMON, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                              num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=64,
                              num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
                              shared_expert_intermediate_size=1024),
    "qwen3.5-122b-a10b": dict(_COMMON, hidden_size=3072, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=64,
                              num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
                              shared_expert_intermediate_size=1024),
    "qwen3.5-35b-a3b": dict(_COMMON, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                            num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=32,
                            num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                            shared_expert_intermediate_size=512),
    # small enough for tests (~150 MB, mostly the real-size vocabulary), same layer pattern
    "tiny": dict(_COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=32, linear_value_head_dim=32, num_experts=16,
                 num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                 max_position_embeddings=4096),
}
DENSE_Q_EXCLUDE = ("ffn_router", "shexp_router")  # as the converter: routers and tok_embd stay bf16
POOL_ELEMS = 1 << 21   # bf16 normals per pool (4 MiB)
CHUNK_ELEMS = 1 << 20  # elements per written chunk of a dense tensor
N_BASE_BLOCKS = 4      # distinct random expert blocks per layer before per-expert XOR


def preset_config(preset: str, layers: int | None = None, vocab: int | None = None) -> dict:
    if preset not in PRESETS:
        raise ArgumentError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if vocab is not None:
        if not isinstance(vocab, int) or vocab < 16 or vocab % 16:
            raise ArgumentError(f"--vocab must be a multiple of 16, >= 16 (got {vocab!r})")
        cfg["vocab_size"] = vocab
    if layers is not None:
        if not isinstance(layers, int) or layers < 1 or layers > cfg["num_hidden_layers"]:
            raise ArgumentError(f"--layers must be in [1, {cfg['num_hidden_layers']}] for {preset} "
                                f"(got {layers!r})")
        cfg["num_hidden_layers"] = layers
    return cfg


def preset_spec(preset: str, layers: int | None = None, vocab: int | None = None):
    return spec_from_config(preset_config(preset, layers, vocab), {"eos_token_id": EOS_IDS})


def _default_tokenizer_dir():
    """FLASHMOE_SYNTH_TOKENIZER, else none: a synthetic model needs no tokenizer (benchmarks feed
    token ids); nothing outside the package is looked up."""
    return os.environ.get("FLASHMOE_SYNTH_TOKENIZER") or None


def _find_tokenizer(tok):
    """-> (tokenizer.json path or None, chat_template path or None)."""
    d = tok if tok is not None else _default_tokenizer_dir()
    if d is None or d == "":
        return None, None
    if os.path.isfile(d):
        tj, d = d, os.path.dirname(d)
    else:
        tj = None
        for n in ("tokenizer.json", "tokenizer.derived.json"):
            if os.path.isfile(os.path.join(d, n)):
                tj = os.path.join(d, n)
                break
    if tj is None:
        if tok is not None:
            raise ArgumentError(f"--tokenizer {tok}: no tokenizer.json / tokenizer.derived.json there")
        return None, None
    ct = None
    for c in (os.path.join(d, "chat_template.jinja"),
              os.path.join(os.path.dirname(d), "qwen35_chat_template", "chat_template.jinja")):
        if os.path.isfile(c):
            ct = c
            break
    return tj, ct


# ---- random sources ----------------------------------------------------------------------------

class _Pools:
    """bf16 N(0, std^2) pools, one per std; chunks are windows at random offsets."""

    def __init__(self, rng):
        self.rng = rng
        self.base = rng.standard_normal(POOL_ELEMS + CHUNK_ELEMS, dtype=np.float32)
        self.pools = {}

    def pool(self, std):
        key = round(float(std), 12)
        p = self.pools.get(key)
        if p is None:
            p = fmt.f32_to_bf16(self.base * np.float32(std))
            self.pools[key] = p
        return p

    def chunks(self, n, std):
        """Yield bf16 (uint16) arrays covering n elements."""
        p = self.pool(std)
        done = 0
        while done < n:
            k = min(CHUNK_ELEMS, n - done)
            off = int(self.rng.integers(0, len(p) - k + 1))
            yield p[off:off + k]
            done += k


def _code_std(bits):
    L = (1 << bits)
    return math.sqrt((L * L - 1) / 12.0), (L - 1) / 2.0


def _affine_random(rng, shape, bits, gs, gain=1.0):
    """Random group-affine tensor (q uint32 rows, scales, biases bf16) with std ~gain/sqrt(in)."""
    out, inn = shape
    sd, mid = _code_std(bits)
    words = out * inn * bits // 32
    q = np.frombuffer(rng.bytes(words * 4), dtype="<u4").reshape(out, inn * bits // 32)
    g = rng.uniform(0.75, 1.25, size=(out, inn // gs)).astype(np.float32)
    s = g * np.float32(gain / (sd * math.sqrt(inn)))
    return q, fmt.f32_to_bf16(s), fmt.f32_to_bf16(-s * np.float32(mid))


# ---- the model dir -----------------------------------------------------------------------------

def _dense_plan(spec, dense_bits, gs):
    """[(TensorMap, storage)] with storage 'f32' | 'bf16' | 'affine'."""
    plan = []
    for t in tensor_map(spec):
        if t.kind in ("vector", "conv"):
            st = "f32"
        elif (t.kind == "matrix" and dense_bits == 8 and not t.name.endswith(DENSE_Q_EXCLUDE)
              and t.shape[1] % gs == 0):
            st = "affine"
        else:
            st = "bf16"
        plan.append((t, st))
    return plan


def _vector_value(spec, name, n, rng):
    leaf = name.split(".")[-1]
    if leaf in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm") or name == "output_norm":
        return np.zeros(n, np.float32)  # zero-centred norms: x̂ * (1 + 0)
    if leaf == "ssm_norm":
        return np.ones(n, np.float32)   # plain gated norm
    if leaf == "ssm_A_log":
        return np.log(rng.uniform(1.0, 16.0, size=n)).astype(np.float32)
    if leaf == "ssm_dt_bias":
        return np.ones(n, np.float32)
    raise AssertionError(f"synth: no rule for vector {name}")


def _write_dense(path, spec, plan, rng, pools, gs):
    ents = []
    for t, st in plan:
        shp = t.shape
        if st == "affine":
            sz = fmt.affine_sizes(shp, 8, gs)
            ents += [(t.name + ".q", "U32", (shp[0], shp[1] * 8 // 32), sz["q"]),
                     (t.name + ".scales", "BF16", (shp[0], shp[1] // gs), sz["scales"]),
                     (t.name + ".biases", "BF16", (shp[0], shp[1] // gs), sz["biases"])]
        else:
            nb = int(np.prod(shp)) * (4 if st == "f32" else 2)
            ents.append((t.name, "F32" if st == "f32" else "BF16", shp, nb))
    w = fmt.SafetensorsWriter(path, ents, metadata={"format": fmt.FORMAT_NAME})
    table = {}
    for t, st in plan:
        n, shp = t.name, t.shape
        if st == "f32":
            if t.kind == "conv":
                v = (rng.standard_normal(shp, dtype=np.float32) / np.float32(math.sqrt(shp[1])))
            else:
                v = _vector_value(spec, n, shp[0], rng)
            w.write_chunks(n, [v.astype(np.float32)])
            table[n] = {"dtype": "f32", "shape": list(shp), "offset": w.offsets[n], "nbytes": w.sizes[n]}
        elif st == "bf16":
            std = 1.0 if t.kind == "embedding" else 1.0 / math.sqrt(shp[1])
            w.write_chunks(n, pools.chunks(int(np.prod(shp)), std))
            table[n] = {"dtype": "bf16", "shape": list(shp), "offset": w.offsets[n], "nbytes": w.sizes[n]}
        else:
            e = {"dtype": "affine", "shape": list(shp), "bits": 8, "group_size": gs}
            rows_per = max(1, (1 << 22) // shp[1])
            # generate row chunks lazily, writing q then scales then biases needs three passes
            # with the same random stream: regenerate from a saved seed
            seed = int(rng.integers(0, 2**63))
            for k, idx in (("q", 0), ("scales", 1), ("biases", 2)):
                r2 = np.random.default_rng(seed)

                def gen(r2=r2, idx=idx):
                    for r0 in range(0, shp[0], rows_per):
                        rr = min(rows_per, shp[0] - r0)
                        yield _affine_random(r2, (rr, shp[1]), 8, gs)[idx]
                w.write_chunks(f"{n}.{k}", gen())
                e[k] = [w.offsets[f"{n}.{k}"], w.sizes[f"{n}.{k}"]]
            table[n] = e
    return table, w.close()


def _expert_layer_layout(spec, bits, gs):
    I, H = spec.moe_intermediate_size, spec.hidden_size
    d = {"dtype": "affine", "bits": bits, "group_size": gs}
    return fmt.expert_block_layout([("gate", dict(d, shape=[I, H])), ("up", dict(d, shape=[I, H])),
                                    ("down", dict(d, shape=[H, I]))])


def _base_blocks(rng, spec, layout, bb, bits, gs):
    I, H = spec.moe_intermediate_size, spec.hidden_size
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    base = np.zeros((N_BASE_BLOCKS, bb), np.uint8)
    for j in range(N_BASE_BLOCKS):
        for pn in ("gate", "up", "down"):
            q, s, b = _affine_random(rng, shapes[pn], bits, gs)
            L = layout[pn]
            for k, arr in (("q", q), ("scales", s), ("biases", b)):
                o, n = L[k]
                base[j, o:o + n] = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    return base


def _write_expert_file(path, spec, layout, bb, rng, bits, gs):
    """One expert file, one block at a time (HashingFile hashes and writes on its own threads,
    holding a bounded number of copies). -> (data offset, {size, sha256}, [crc32 of each block])."""
    E = spec.n_experts
    base = _base_blocks(rng, spec, layout, bb, bits, gs)
    qr = [layout[pn]["q"] for pn in ("gate", "up", "down")]
    hf = fmt.HashingFile(path)
    try:
        hdr = fmt.expert_file_header(E, bb)
        hf.write(hdr)
        buf = np.empty(bb, np.uint8)
        xw = rng.integers(0, 2**63, size=E, dtype=np.uint64)
        crcs = []
        for e in range(E):
            buf[:] = base[e % N_BASE_BLOCKS]
            if e >= N_BASE_BLOCKS:
                for o, n in qr:
                    v = buf[o:o + n].view(np.uint64)
                    np.bitwise_xor(v, xw[e], out=v)
            crcs.append(zlib.crc32(buf))
            hf.write(buf)
    except BaseException:
        abort = getattr(hf, "abort", None)
        if abort:
            abort()
        raise
    return len(hdr), hf.close(), crcs


def synth(out, preset="qwen3.5-35b-a3b", layers=None, bits=4, group_size=64, dense_bits=16,
          seed=0, force=False, tokenizer=None, progress=True, gguf=None, vocab=None):
    """Write a random-weight model dir at `out` (atomic). Returns out. `gguf`: also write a GGUF."""
    if bits not in (2, 3, 4, 8):
        raise ArgumentError(f"--bits must be 2, 3, 4 or 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise ArgumentError(f"--group-size must be 32, 64 or 128 (got {group_size})")
    if dense_bits not in (8, 16):
        raise ArgumentError(f"--dense-bits must be 16 or 8 (got {dense_bits})")
    spec = preset_spec(preset, layers, vocab)
    if spec.hidden_size % group_size or spec.moe_intermediate_size % group_size:
        raise ArgumentError(f"--group-size {group_size} does not divide the preset's dims")
    from pyflashmoe import __version__
    rng = np.random.default_rng(seed)
    pools = _Pools(rng)
    plan = _dense_plan(spec, dense_bits, group_size)
    layout, bb = _expert_layer_layout(spec, bits, group_size)
    moe = spec.moe_layers()
    tj, ct = _find_tokenizer(tokenizer)
    if spec.vocab_size < TOKENIZER_VOCAB:
        tj = ct = None  # a cut vocabulary cannot hold the tokenizer's ids: token ids only
    est = sum(int(np.prod(t.shape)) * (4 if st == "f32" else 2) for t, st in plan) + len(moe) * spec.n_experts * bb
    parent = os.path.dirname(os.path.abspath(out)) or "."
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = None
    if free is not None and est > free:
        raise ModelIOError(f"{out}: needs about {est / 1e9:.1f} GB but {parent} has {free / 1e9:.1f} GB free")
    t0 = time.time()
    log = (lambda *a: print("flashmoe synth:", *a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    log(f"{preset} ({spec.n_layers} layers, {len(moe)} MoE x {spec.n_experts} experts of {bb} B, "
        f"{bits}-bit) ~{est / 1e9:.2f} GB -> {out}")
    with fmt.AtomicDir(out, force) as tmp:
        try:
            os.makedirs(os.path.join(tmp, "experts"))
            files = {}
            table, files[fmt.DENSE_FILE] = _write_dense(os.path.join(tmp, fmt.DENSE_FILE), spec, plan,
                                                        rng, pools, group_size)
            del pools  # the dense pools are not needed for the experts
            log(f"dense.safetensors {files[fmt.DENSE_FILE]['size'] / 1e9:.2f} GB "
                f"({time.time() - t0:.1f} s)")
            lay = {}
            for j, il in enumerate(moe):
                rel = f"experts/L{il:03d}.safetensors"
                doff, files[rel], crcs = _write_expert_file(os.path.join(tmp, rel), spec, layout, bb,
                                                            rng, bits, group_size)
                lay[str(il)] = {"file": rel, "n_experts": spec.n_experts, "block_bytes": bb,
                                "data_offset": doff, "parts": layout, "block_crc32": crcs}
                if progress and (j + 1) % max(1, len(moe) // 10) == 0:
                    done = sum(f["size"] for f in files.values())
                    dt = time.time() - t0
                    log(f"layer {il + 1}/{spec.n_layers}: {done / 1e9:.2f} GB in {dt:.1f} s "
                        f"({done / 1e6 / max(dt, 1e-9):.0f} MB/s)")
            if tj:
                shutil.copyfile(tj, os.path.join(tmp, "tokenizer.json"))
                with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                               "add_bos_token": False, "model_max_length": 262144}, f)
            if ct:
                shutil.copyfile(ct, os.path.join(tmp, "chat_template.jinja"))
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"eos_token_id": EOS_IDS, "do_sample": False}, f)
            cfg = preset_config(preset, layers, vocab)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(dict(cfg, architectures=["Qwen3_5MoeForCausalLM"]), f, indent=1)
            dq = {"bits": dense_bits}
            if dense_bits == 8:
                dq["group_size"] = group_size
            manifest = {
                "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
                "created_by": f"pyflashmoe {__version__}",
                "spec": spec.to_dict(),
                "source": {"path": f"synthetic:{preset}", "kind": "synth", "model_type": "qwen3_5_moe",
                           "preset": preset, "seed": seed, "layers": spec.n_layers,
                           "vocab": spec.vocab_size},
                "quantization": {"experts": {"bits": bits, "group_size": group_size}, "dense": dq},
                "tensors": table,
                "experts": {"layers": lay},
                "files": files,
            }
            fmt.write_manifest(tmp, manifest)
        except OSError as e:
            raise ModelIOError(f"{getattr(e, 'filename', None) or out}: write failed: "
                               f"{e.strerror or e}") from None
    total = sum(f["size"] for f in files.values())
    dt = time.time() - t0
    log(f"done: {total / 1e9:.2f} GB in {dt:.1f} s ({total / 1e6 / max(dt, 1e-9):.0f} MB/s)")
    if gguf:
        write_gguf(gguf, preset=preset, layers=layers, seed=seed, force=force, progress=progress)
    return out


# ---- GGUF for llama.cpp ------------------------------------------------------------------------

GGUF_ALIGN = 32


def _q4_0_random(rng, rows, cols, std):
    """Random Q4_0 blocks [rows*cols/32, 18] (f16 d, 16 bytes of nibbles): w = (q - 8) * d."""
    nb = rows * cols // 32
    blk = np.empty((nb, 18), np.uint8)
    d = (rng.uniform(0.75, 1.25, size=nb) * (std / _code_std(4)[0])).astype(np.float16)
    blk[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    blk[:, 2:] = np.frombuffer(rng.bytes(nb * 16), np.uint8).reshape(nb, 16)
    return blk


def _gguf_plan(spec):
    """[(gguf name, numpy-order shape, kind, std)] kinds: f32, f16, router, q4exp, vec:<leaf>."""
    H, V = spec.hidden_size, spec.vocab_size
    hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    nk, nv, dk, dv = spec.linear_n_k_heads, spec.linear_n_v_heads, spec.linear_k_dim, spec.linear_v_dim
    I, Ish, E, K = spec.moe_intermediate_size, spec.shared_expert_intermediate_size, spec.n_experts, \
        spec.linear_conv_kernel
    C = 2 * nk * dk + nv * dv
    out = [("token_embd.weight", (V, H), "f16", 1.0)]
    for i, L in enumerate(spec.layers):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (H,), "one", 0))
        out.append((b + "post_attention_norm.weight", (H,), "one", 0))
        if L.attn == "full":
            out += [(b + "attn_q.weight", (nh * hd * 2, H), "f16", H ** -0.5),
                    (b + "attn_k.weight", (nkv * hd, H), "f16", H ** -0.5),
                    (b + "attn_v.weight", (nkv * hd, H), "f16", H ** -0.5),
                    (b + "attn_output.weight", (H, nh * hd), "f16", (nh * hd) ** -0.5),
                    (b + "attn_q_norm.weight", (hd,), "one", 0),
                    (b + "attn_k_norm.weight", (hd,), "one", 0)]
        else:
            out += [(b + "attn_qkv.weight", (C, H), "f16", H ** -0.5),
                    (b + "attn_gate.weight", (nv * dv, H), "f16", H ** -0.5),
                    (b + "ssm_conv1d.weight", (C, K), "f32", K ** -0.5),
                    (b + "ssm_dt.bias", (nv,), "one", 0),
                    (b + "ssm_a", (nv,), "ssm_a", 0),
                    (b + "ssm_beta.weight", (nv, H), "f16", H ** -0.5),
                    (b + "ssm_alpha.weight", (nv, H), "f16", H ** -0.5),
                    (b + "ssm_norm.weight", (dv,), "one", 0),
                    (b + "ssm_out.weight", (H, nv * dv), "f16", (nv * dv) ** -0.5)]
        out += [(b + "ffn_gate_inp.weight", (E, H), "f32", H ** -0.5),
                (b + "ffn_gate_exps.weight", (E, I, H), "q4exp", H ** -0.5),
                (b + "ffn_up_exps.weight", (E, I, H), "q4exp", H ** -0.5),
                (b + "ffn_down_exps.weight", (E, H, I), "q4exp", I ** -0.5),
                (b + "ffn_gate_inp_shexp.weight", (H,), "f32", H ** -0.5),
                (b + "ffn_gate_shexp.weight", (Ish, H), "f16", H ** -0.5),
                (b + "ffn_up_shexp.weight", (Ish, H), "f16", H ** -0.5),
                (b + "ffn_down_shexp.weight", (H, Ish), "f16", Ish ** -0.5)]
    out += [("output_norm.weight", (H,), "one", 0), ("output.weight", (V, H), "f16", H ** -0.5)]
    return out


def _gguf_nbytes(shape, kind):
    n = int(np.prod(shape))
    if kind == "q4exp":
        return n // 32 * 18
    if kind == "f16":
        return n * 2
    return n * 4


def _gguf_vocab(w, tj, V):
    """The Qwen3.5 BPE vocabulary (ids < V; a cut vocabulary keeps the merges it can express and
    uses id V-1 as EOS)."""
    import gguf
    with open(tj, encoding="utf-8") as f:
        d = json.load(f)
    toks = [None] * V
    types = [gguf.TokenType.UNUSED] * V
    for t, i in d["model"]["vocab"].items():
        if i < V:
            toks[i] = t
            types[i] = gguf.TokenType.NORMAL
    for a in d.get("added_tokens", []):
        if a["id"] < V:
            toks[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(V):
        if toks[i] is None:
            toks[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    eos, pad = EOS_IDS
    if V < TOKENIZER_VOCAB:
        have = set(toks)
        merges = [m for m in merges if all(x in have for x in m.split(" ")) and m.replace(" ", "") in have]
        eos = pad = V - 1
        types[eos] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    w.add_add_bos_token(False)


def write_gguf(path, preset="qwen3.5-35b-a3b", layers=None, seed=0, force=False, progress=True,
               tokenizer=None, vocab=None):
    """A GGUF of the preset's dims for llama.cpp (arch qwen35moe): Q4_0 routed experts (4.5 bits
    per weight, the same bytes as 4-bit group-64 affine), F16 dense matrices, F32 norms/router/conv.
    Random weights drawn like the model dir's (not the same values). Written to PATH.tmp, renamed."""
    try:
        import gguf
    except ImportError as e:
        raise ArgumentError(f"--gguf needs the `gguf` package ({e})") from None
    spec = preset_spec(preset, layers, vocab)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise ArgumentError(f"{path}: exists; pass --force to replace it")
    tj, _ = _find_tokenizer(tokenizer)
    if tj is None:
        raise ArgumentError("--gguf needs the Qwen3.5 tokenizer.json (set FLASHMOE_SYNTH_TOKENIZER)")
    plan = _gguf_plan(spec)
    total = sum(_gguf_nbytes(s, k) for _, s, k, _ in plan)
    free = shutil.disk_usage(os.path.dirname(path)).free
    if total > free:
        raise ModelIOError(f"{path}: needs about {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB free")
    tmp = path + f".tmp-{os.getpid()}"
    rng = np.random.default_rng(seed + 1)
    pools = _Pools(rng)
    log = (lambda *a: print("flashmoe synth:", *a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    log(f"GGUF {preset} ({spec.n_layers} layers) ~{total / 1e9:.2f} GB -> {path}")
    t0 = time.time()
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE])
    w.add_name(f"synthetic {preset}")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.moe_intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.rotary_dim)
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_expert_count(spec.n_experts)
    w.add_expert_used_count(spec.n_experts_per_tok)
    w.add_expert_feed_forward_length(spec.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(spec.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(spec.linear_conv_kernel)
    w.add_ssm_state_size(spec.linear_k_dim)
    w.add_ssm_group_count(spec.linear_n_k_heads)
    w.add_ssm_time_step_rank(spec.linear_n_v_heads)
    w.add_ssm_inner_size(spec.linear_v_dim * spec.linear_n_v_heads)
    w.add_full_attention_interval(4)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _gguf_vocab(w, tj, spec.vocab_size)
    for name, shape, kind, _ in plan:
        nb = _gguf_nbytes(shape, kind)
        if kind == "q4exp":
            w.add_tensor_info(name, (*shape[:-1], shape[-1] // 32 * 18), np.dtype(np.uint8), nb,
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16 if kind == "f16" else np.float32), nb)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]

        def pad():
            p = (-fout.tell()) % GGUF_ALIGN
            if p:
                fout.write(b"\0" * p)

        done = 0
        for name, shape, kind, std in plan:
            pad()
            if kind == "f16":
                for c in pools.chunks(int(np.prod(shape)), std):
                    # bf16 pool bits -> float32 -> float16 (values ~N(0, std^2), in f16 range)
                    fout.write(fmt.bf16_to_f32(c).astype(np.float16).tobytes())
            elif kind == "f32":
                fout.write((rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).tobytes())
            elif kind == "one":
                fout.write(np.ones(shape, np.float32).tobytes())
            elif kind == "ssm_a":
                fout.write((-rng.uniform(1.0, 16.0, size=shape)).astype(np.float32).tobytes())
            else:  # q4exp [E, rows, cols]
                E, rows, cols = shape
                base = [_q4_0_random(rng, rows, cols, std) for _ in range(N_BASE_BLOCKS)]
                for e in range(E):
                    blk = base[e % N_BASE_BLOCKS].copy()
                    if e >= N_BASE_BLOCKS:
                        x = np.frombuffer(rng.bytes(16), np.uint8)
                        blk[:, 2:] ^= x
                    fout.write(blk.tobytes())
            done += _gguf_nbytes(shape, kind)
            pad()
        fout.flush()
        os.fsync(fout.fileno())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            w.close()
        except Exception:
            pass
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dt = time.time() - t0
    log(f"GGUF done: {os.path.getsize(path) / 1e9:.2f} GB in {dt:.1f} s")
    return path


def run_cli(a) -> int:
    if a.gguf_only:
        if not a.gguf:
            raise ArgumentError("--gguf-only needs --gguf FILE")
        write_gguf(a.gguf, preset=a.preset, layers=a.layers, seed=a.seed, force=a.force,
                   progress=not a.quiet, tokenizer=a.tokenizer, vocab=a.vocab)
        return 0
    synth(a.out, preset=a.preset, layers=a.layers, bits=a.bits, group_size=a.group_size,
          dense_bits=a.dense_bits, seed=a.seed, force=a.force, tokenizer=a.tokenizer,
          progress=not a.quiet, gguf=None, vocab=a.vocab)
    if a.gguf:
        write_gguf(a.gguf, preset=a.preset, layers=a.layers, seed=a.seed, force=a.force,
                   progress=not a.quiet, tokenizer=a.tokenizer, vocab=a.vocab)
    return 0
