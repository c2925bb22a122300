"""The `flashmoe` command. Each subcommand's work lives in its own module; this file only parses.

Errors from pyflashmoe (FlashMoEError) print one line naming what is wrong and exit 2, with no
traceback; --debug shows the traceback.
"""
import argparse
import sys


def _cmd_convert(a):
    from pyflashmoe.convert import convert
    from pyflashmoe.errors import ArgumentError
    if a.recipe and (a.bits is not None or a.dense_bits is not None):
        raise ArgumentError(f"--recipe {a.recipe} sets the format of every weight: drop --bits / "
                            f"--dense-bits, or change single tensors with --quant")
    convert(a.src, a.dst, bits=4 if a.bits is None else a.bits, group_size=a.group_size,
            dense_bits=16 if a.dense_bits is None else a.dense_bits, force=a.force,
            progress=not a.quiet, recipe=a.recipe, quant=a.quant or ())
    return 0


class _ConvertHelp(argparse.RawDescriptionHelpFormatter):
    """`flashmoe convert --help`: the recipes (pyflashmoe/convert/recipes.py) are listed only when
    the help is shown, so that parsing any command does not import the converter."""
    EPILOG = "<recipes>"

    def add_text(self, text):
        if text == self.EPILOG:
            from pyflashmoe.convert.recipes import recipes_help
            text = recipes_help()
        super().add_text(text)


def _cmd_info(a):
    from pyflashmoe.format import info_text
    print(info_text(a.dir))
    return 0


def _cmd_verify(a):
    from pyflashmoe.format import verify
    r = verify(a.dir, progress=not a.quiet, quick=a.quick, sample=a.sample, seed=a.seed)
    mb = r["bytes_read"] / 1e6
    if r["mode"] == "quick":
        print(f"{a.dir}: quick check passed: manifest digest, sha256 of {', '.join(r['files_hashed'])}, "
              f"crc32 of {r['blocks_checked']} sampled expert blocks ({mb:.1f} MB read, "
              f"{r['seconds']:.2f} s); run without --quick to hash every file")
    else:
        print(f"{a.dir}: all files match the manifest (manifest digest, {len(r['files_hashed'])} files, "
              f"{r['blocks_checked']} expert block checksums; {mb:.1f} MB read, {r['seconds']:.2f} s)")
    if r["layers_without_crc"]:
        print(f"{a.dir}: note: {len(r['layers_without_crc'])} expert layers have no block checksums "
              f"(block_crc32); their blocks are checked only by the full-file sha256"
              + ("" if r["mode"] == "full" else ", which --quick skips") + "; reconvert to add them",
              file=sys.stderr)
    return 0


def _cmd_run(a):
    from pyflashmoe.generate import run_cli
    return run_cli(a)


def _cmd_chat(a):
    from pyflashmoe.chat import chat_cli
    return chat_cli(a)


def _cmd_serve(a):
    from pyflashmoe.server import serve_cli
    return serve_cli(a)


def _add_load_args(p):
    p.add_argument("--k", type=int, default=None, help="experts per token (override)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--io-threads", type=int, default=None)
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--ram-budget", default=None, help="e.g. 16GiB")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length (default: min(max_position_embeddings, 4096))")
    p.add_argument("--vram-budget", default=None, help="CUDA: VRAM for the expert cache, e.g. 16GiB")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])


def _cmd_synth(a):
    from pyflashmoe.synth import run_cli
    return run_cli(a)


def _cmd_bench(a):
    from pyflashmoe.bench import run_cli
    return run_cli(a)


def _cmd_eval(a):
    from pyflashmoe.eval import run_cli
    return run_cli(a)


def build_parser():
    p = argparse.ArgumentParser(prog="flashmoe", description="Run MoE LLMs larger than memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF / MLX / FP8 checkpoint -> pyflashmoe model dir",
                       formatter_class=_ConvertHelp, epilog=_ConvertHelp.EPILOG)
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--bits", type=int, default=None, choices=[2, 3, 4, 5, 6, 8, 16],
                   help="routed experts' bits (default 4)")
    c.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    c.add_argument("--dense-bits", type=int, default=None, choices=[16, 8],
                   help="dense Linear weights but the embedding and routers (default 16)")
    c.add_argument("--recipe", default=None, metavar="NAME",
                   help="a mixed-precision recipe (listed below)")
    c.add_argument("--quant", action="append", default=None, metavar="PATTERN=BITS[:gGROUP]",
                   help="per-tensor override, repeatable (below)")
    c.add_argument("--force", action="store_true", help="replace an existing destination")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(fn=_cmd_convert)

    i = sub.add_parser("info", help="summarise a model dir")
    i.add_argument("dir", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    i.set_defaults(fn=_cmd_info)

    v = sub.add_parser("verify", help="recheck the manifest digest and every file's sha256 "
                                      "(--quick: dense file + sampled expert blocks)")
    v.add_argument("dir", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    v.add_argument("-q", "--quiet", action="store_true")
    v.add_argument("--quick", action="store_true",
                   help="hash only dense.safetensors and check the CRC32 of sampled expert blocks")
    v.add_argument("--sample", default=None,
                   help="--quick: expert blocks per layer: a count (default 8), a fraction like 0.1 "
                        "or 10%%, or 'all'")
    v.add_argument("--seed", type=int, default=None, help="--quick: seed of the block sample")
    v.set_defaults(fn=_cmd_verify)

    r = sub.add_parser("run", help="generate text from a prompt")
    r.add_argument("dir", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("-n", "--max-tokens", type=int, default=128)
    r.add_argument("--temp", type=float, default=None,
                   help="0 = greedy; default: generation_config.json when do_sample, else greedy")
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--min-p", type=float, default=None)
    r.add_argument("--repeat-penalty", type=float, default=None)
    r.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    r.add_argument("--timing", action="store_true", help="ms per phase, bytes read, cache hits")
    _add_load_args(r)
    r.set_defaults(fn=_cmd_run)

    ch = sub.add_parser("chat", help="interactive chat (terminal: line editing, history, /help; or piped stdin)")
    ch.add_argument("dir", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("-n", "--max-tokens", type=int, default=None,
                    help="per answer (default: the rest of the context)")
    ch.add_argument("--temp", type=float, default=None,
                    help="0 = greedy; default: generation_config.json when do_sample, else greedy")
    ch.add_argument("--top-k", type=int, default=None)
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--min-p", type=float, default=None)
    ch.add_argument("--repeat-penalty", type=float, default=None)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--no-think", action="store_true", help="enable_thinking=false in the template")
    ch.add_argument("-v", "--verbose", action="store_true", help="speeds after each answer (stderr)")
    _add_load_args(ch)
    ch.set_defaults(fn=_cmd_chat)

    se = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    se.add_argument("dir", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--model-name", default=None, help="model id in the API (default: dir name)")
    se.add_argument("--max-queue", type=int, default=256,
                    help="requests that may wait besides the --parallel running ones (default 256); beyond: 503 + "
                         "Retry-After")
    se.add_argument("--parallel", type=int, default=4,
                    help="sequences decoded together (continuous batching: requests join and leave "
                         "the running batch between steps; each holds a session, made when first "
                         "needed; default 4); the 'n' of a request counts its choices")
    se.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds a request may take, queued + running (default 3600; 0 = no limit)")
    se.add_argument("--max-body", default="4MiB", help="largest request body (default 4MiB; 413 beyond)")
    se.add_argument("--allowed-hosts", default=None,
                    help="comma-separated Host names to accept, '*' = any (default: loopback names "
                         "when bound to a loopback address, else any)")
    se.add_argument("--cors-origins", default=None,
                    help="comma-separated Origins allowed by CORS, '*' = any (default: CORS off, "
                         "requests with an Origin header are refused)")
    se.add_argument("--api-key", default=None,
                    help="require this key on /v1/ requests (Authorization: Bearer KEY or x-api-key); "
                         "default: $FLASHMOE_API_KEY, else no key")
    from pyflashmoe.prefix import add_state_args
    add_state_args(se)  # --state-ram / --state-dir / --state-disk (saved conversation states)
    _add_load_args(se)
    se.set_defaults(fn=_cmd_serve)

    from pyflashmoe.synth import PRESETS
    sy = sub.add_parser("synth", help="random-weight model at real Qwen3.5-MoE dims (benchmarks)")
    sy.add_argument("out", help="model dir to write")
    sy.add_argument("--preset", default="qwen3.5-35b-a3b", choices=list(PRESETS))
    sy.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    sy.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    sy.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    sy.add_argument("--dense-bits", type=int, default=16, choices=[16, 8])
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--vocab", type=int, default=None,
                    help="cut the vocabulary (small test models; drops the tokenizer)")
    sy.add_argument("--gguf", default=None, help="also write a llama.cpp GGUF of the same dims")
    sy.add_argument("--gguf-only", action="store_true", help="write only the GGUF")
    sy.add_argument("--tokenizer", default=None,
                    help="dir or tokenizer.json to copy (default: $FLASHMOE_SYNTH_TOKENIZER, else none)")
    sy.add_argument("--force", action="store_true", help="replace an existing destination")
    sy.add_argument("-q", "--quiet", action="store_true")
    sy.set_defaults(fn=_cmd_synth)

    b = sub.add_parser("bench", help="decode/prefill tok/s, per-phase ms, I/O, roofline")
    b.add_argument("model", nargs="?", default=None,
                   help="model dir (default: the embedded demo model)")
    b.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])
    b.add_argument("--cold", action="store_true",
                   help="drop the model files from the page cache before each repeat")
    b.add_argument("--tokens", type=int, default=16, help="decode tokens per repeat")
    b.add_argument("--prompt-tokens", type=int, default=16, help="prefill tokens per repeat")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--k", type=int, default=None, help="experts per token (override)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--io-threads", type=int, default=None)
    b.add_argument("--direct-io", action="store_true")
    b.add_argument("--ram-budget", default=None, help="engine expert cache, e.g. 4GiB")
    b.add_argument("--vram-budget", default=None, help="CUDA: VRAM for the expert cache, e.g. 16GiB")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-roofline", action="store_true", help="skip the disk/RAM bandwidth probes")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--plot", default=None, help="PNG of tok/s against RAM budget")
    b.add_argument("--plot-budgets", default=None,
                   help="comma-separated RAM budgets for --plot (default: 0, 1/8 .. 1 of the experts)")
    b.set_defaults(fn=_cmd_bench)

    # ---- flashmoe eval (pyflashmoe/eval.py)
    ev = sub.add_parser("eval", help="perplexity and KL divergence against a reference "
                        "(llama-perplexity --kl-divergence); no args: the embedded demo")
    ev.add_argument("models", nargs="*", metavar="MODEL_DIR",
                    help="model dirs to evaluate (e.g. the --bits variants); none: the embedded "
                         "demo, and with no --text and no --ref, on its held-out text against its "
                         "saved bf16 reference")
    ev.add_argument("--text", default=None, help="UTF-8 text file to score (.xz accepted)")
    ev.add_argument("--ref", default=None,
                    help="reference: a model dir, an HF checkpoint dir (needs transformers), or a "
                         "file saved by --save-ref")
    ev.add_argument("--save-ref", default=None, metavar="FILE",
                    help="save the --ref reference on --text to FILE (.npz.xz): exact (final hidden "
                         "states + lm_head) from an HF checkpoint, else the top-k log-probs")
    ev.add_argument("--ref-top-k", type=int, default=32,
                    help="log-probs kept per token when the reference is saved as top-k (default 32)")
    ev.add_argument("--k", default=None, help="experts per token, a comma list: e.g. 2,4,8 "
                    "(default: each model's own)")
    ev.add_argument("--ctx", type=int, default=None,
                    help="window length; the second half of each window is scored (default 512, "
                         "or the saved reference's)")
    ev.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])
    ev.add_argument("--ref-device", default=None, metavar="DEV",
                    help="torch device of an HF checkpoint --ref: cpu (default), cuda, cuda:1")
    ev.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    ev.add_argument("--plot", default=None, metavar="FILE",
                    help="KLD against bits per weight, one line per K (.svg; .png needs matplotlib)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=_cmd_eval)
    return p


def main(argv=None):
    from pyflashmoe.errors import FlashMoEError
    p = build_parser()
    a = p.parse_args(argv)
    try:
        # no model dir: the embedded demo model, announced once (Model.load then gets a path)
        for key in ("dir", "model"):
            if key in vars(a) and getattr(a, key) is None:
                from pyflashmoe.generate import resolve_model_dir
                setattr(a, key, resolve_model_dir(None))
        return a.fn(a) or 0
    except FlashMoEError as e:
        if a.debug:
            raise
        print(f"flashmoe {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashmoe {a.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
