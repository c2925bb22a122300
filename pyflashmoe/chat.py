"""`flashmoe chat DIR`: an interactive chat over stdin/stdout.

Each turn renders the whole conversation with the model's chat template; when the new prompt
extends the tokens the model's session already holds (the previous prompt and answer), only the
new tokens are evaluated (Model.generate's prefix reuse), so turns are incremental. With templates
that rewrite earlier turns (e.g. dropping old reasoning) the prompt is evaluated afresh.

Commands (a line on its own): /reset (forget the conversation), /exit or /quit (or end of input).
Works with a terminal or piped stdin (one user message per line). Reasoning text is shown dimmed
on a terminal and is not kept in the history (as the templates expect). Speeds go to stderr with
--verbose. A turn that fails (an engine error, a full context) prints the error to stderr and
leaves the conversation as it was before that message; the REPL goes on.
"""
from __future__ import annotations

import sys

from pyflashmoe.sampling import SamplingParams, validate_max_tokens
from pyflashmoe.toolcalls import OutputParser, prompt_opens_thinking

HELP = "commands: /reset  /exit  (end of input also exits)"


def _sampling_args(a) -> dict:
    given = {"temperature": getattr(a, "temp", None), "top_k": getattr(a, "top_k", None),
             "top_p": getattr(a, "top_p", None), "min_p": getattr(a, "min_p", None),
             "repetition_penalty": getattr(a, "repeat_penalty", None)}
    return {k: v for k, v in given.items() if v is not None}


class ChatSession:
    """The conversation state and one-turn generation (no I/O), reusable from Python."""

    def __init__(self, model, system: str | None = None, think: bool | None = None,
                 max_tokens: int | None = None, seed: int | None = None, **sampling):
        self.model = model
        self.system = system
        self.think = think
        self.max_tokens = max_tokens
        self.seed = seed
        self.sampling = sampling
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, user_text: str):
        """Yield (kind, text) pieces, kind "reasoning" or "content"; the answer is added to the
        history when the generator finishes."""
        tok = self.model.tokenizer
        msgs = self.messages + [{"role": "user", "content": user_text}]
        kw = {}
        if self.think is not None:
            kw["enable_thinking"] = self.think
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, **kw)
        ids = tok.encode(text, add_special_tokens=False)
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = max(self.model.context_length - len(ids), 0)
        gen = self.model.generate(ids, max_tokens=max_tokens, seed=self.seed, **self.sampling)
        parser = OutputParser(in_reasoning=prompt_opens_thinking(text))
        for piece in gen:
            if piece.text:
                yield from parser.feed(piece.text)
        events, _ = parser.finish()
        yield from events
        res = parser.result()
        self.messages = msgs + [{"role": "assistant", "content": res.content}]


def chat_cli(a) -> int:
    sampling = _sampling_args(a)
    SamplingParams(seed=getattr(a, "seed", None), **sampling)  # validate before the slow load
    if a.max_tokens is not None:
        validate_max_tokens(a.max_tokens)
    from pyflashmoe.errors import FlashMoEError, FormatError
    from pyflashmoe.generate import load_from_args
    model = load_from_args(a)
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise FormatError(f"{a.dir}: flashmoe chat needs tokenizer.json and a chat template")
    think = False if getattr(a, "no_think", False) else None
    sess = ChatSession(model, system=a.system, think=think, max_tokens=a.max_tokens,
                       seed=getattr(a, "seed", None), **sampling)
    stdin, out, err = sys.stdin, sys.stdout, sys.stderr
    tty = stdin.isatty() and out.isatty()
    dim, undim = ("\x1b[2m", "\x1b[0m") if tty else ("", "")
    if tty:
        print(f"flashmoe chat: {a.dir} ({HELP})", file=err)
    while True:
        if tty:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            break
        if cmd == "/reset":
            sess.reset()
            print("[conversation reset]", file=err, flush=True)
            continue
        if cmd in ("/help", "/?"):
            print(HELP, file=err, flush=True)
            continue
        in_reasoning = False
        try:
            for kind, text in sess.turn(line):
                if kind == "reasoning":
                    if not in_reasoning:
                        out.write(dim)
                        in_reasoning = True
                    out.write(text)
                else:
                    if in_reasoning:
                        out.write(undim + "\n")
                        in_reasoning = False
                    out.write(text)
                out.flush()
        except KeyboardInterrupt:
            model._reset()
            out.write(undim + "\n[interrupted]\n")
            out.flush()
            continue
        except FlashMoEError as e:
            # the turn failed (an I/O error, a full context, ...): the conversation so far is
            # kept (the failed message is not added), and the REPL goes on
            out.write(undim + "\n")
            out.flush()
            print(f"[error: {e}; the conversation is kept: send another message, or /reset]",
                  file=err, flush=True)
            continue
        if in_reasoning:
            out.write(undim)
        out.write("\n")
        out.flush()
        if getattr(a, "verbose", False):
            s = model.stats
            print(f"[prompt {s['prompt_tokens']} tokens ({s['cached_tokens']} reused), "
                  f"{s['prompt_tps']:.2f} tok/s | decode {s['generated_tokens']} tokens, "
                  f"{s['decode_tps']:.2f} tok/s | finish {s['finish_reason']}]", file=err, flush=True)
    return 0
