"""`flashmoe chat DIR`: an interactive chat on a terminal, or over piped stdin/stdout.

Each turn renders the whole conversation with the model's chat template; when the new prompt
extends the tokens the model's session already holds (the previous prompt and answer), only the
new tokens are evaluated (Model.generate's prefix reuse), so turns are incremental. With templates
that rewrite earlier turns (e.g. dropping old reasoning) the prompt is evaluated afresh.

On a terminal (stdin and stdout both TTYs) input goes through prompt_toolkit: line editing,
Up/Down history (kept in memory, and in $XDG_DATA_HOME/flashmoe/chat_history when that is
writable), Alt+Enter or Esc then Enter inserts a newline (multi-line messages). The answer is
rendered as Markdown with rich while it streams; reasoning is shown dimmed. With piped stdin each
line is one user message, the answer goes plainly to stdout and notices to stderr.

Commands (a line starting with "/"; "//text" sends "/text" to the model) are parsed by
`parse_command`; an unknown one is an error and is never sent to the model. See HELP.
A turn that fails (an engine error, a full context) prints the error to stderr and leaves the
conversation as it was before that message; the REPL goes on.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from pyflashmoe.errors import ArgumentError, FormatError
from pyflashmoe.sampling import SamplingParams, validate_max_tokens
from pyflashmoe.toolcalls import OutputParser, prompt_opens_thinking

COMMANDS = {
    "/help": "this help",
    "/save PATH": "save the conversation and settings to a JSON file",
    "/load PATH": "load a conversation saved with /save",
    "/think on|off": "enable_thinking in the chat template (off: no reasoning)",
    "/system TEXT": "set the system prompt (no TEXT: clear it)",
    "/clear": "forget the conversation (alias /reset)",
    "/exit": "leave (alias /quit; end of input also exits)",
}
_ALIASES = {"/reset": "/clear", "/quit": "/exit", "/bye": "/exit", "/?": "/help"}
_NAMES = sorted({k.split()[0] for k in COMMANDS})
HELP = ("commands:\n" + "\n".join(f"  {k:<15} {v}" for k, v in COMMANDS.items()) +
        "\ninput: Enter sends; Alt+Enter (or Esc then Enter) inserts a newline;"
        "\n  Up/Down recall earlier messages; a line starting with '/' is a command"
        "\n  (start a message with '//' to send a literal '/')")
SAVE_FORMAT = "flashmoe-chat"
SAVE_VERSION = 1
_ROLES = ("system", "user", "assistant")


def parse_command(line: str):
    """(name, arg) for a command line, or None for a message to send to the model.

    name is the canonical command ("/clear" for "/reset"); arg is the rest of the line, stripped.
    "//text" is the message "/text" (returned as ("", "/text")). Raises ArgumentError naming the
    command for an unknown command or a bad argument."""
    s = line.strip()
    if not s.startswith("/"):
        return None
    if s.startswith("//"):
        return ("", line.lstrip()[1:])
    name, _, arg = s.partition(" ")
    if "\n" in name:
        name, _, rest = name.partition("\n")
        arg = (rest + " " + arg).strip()
    name = _ALIASES.get(name.lower(), name.lower())
    arg = arg.strip()
    if name not in _NAMES:
        raise ArgumentError(f"unknown command {name!r} (not sent to the model); commands: "
                            + " ".join(_NAMES))
    if name in ("/save", "/load") and not arg:
        raise ArgumentError(f"{name}: needs a file path, e.g. {name} chat.json")
    if name == "/think":
        if arg.lower() not in ("on", "off"):
            raise ArgumentError(f"/think: expected 'on' or 'off', got {arg!r}")
        arg = arg.lower()
    if name in ("/help", "/clear", "/exit") and arg:
        raise ArgumentError(f"{name}: takes no argument (got {arg!r})")
    return (name, arg)


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

    def set_system(self, text: str | None):
        """Set (or with None/"" clear) the system prompt, keeping the conversation."""
        self.system = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system}] if self.system else []) + rest

    # -- /save and /load -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION,
                "messages": [dict(m) for m in self.messages],
                "settings": {"system": self.system, "think": self.think,
                             "max_tokens": self.max_tokens, "seed": self.seed,
                             "sampling": dict(self.sampling)}}

    def save(self, path: str):
        """Write to_dict() as JSON, atomically (a temp file in the same dir, then os.replace)."""
        from pyflashmoe.errors import ModelIOError
        path = os.path.expanduser(path)
        d = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".chat-", suffix=".tmp", dir=d)
        except OSError as e:
            raise ModelIOError(f"{path}: cannot save the conversation: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ModelIOError(f"{path}: cannot save the conversation: {e.strerror or e}") from e

    def load(self, path: str):
        """Replace the conversation and settings with a file written by save(). Raises
        FormatError naming the file and the field; on error nothing is changed."""
        from pyflashmoe.errors import ModelIOError
        path = os.path.expanduser(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except OSError as e:
            raise ModelIOError(f"{path}: cannot read: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not UTF-8 text ({e.reason})") from e
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(d, dict):
            raise FormatError(f"{path}: expected a JSON object with 'messages' and 'settings'")
        if d.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise FormatError(f"{path}: field 'format' is {d.get('format')!r}, "
                              f"expected {SAVE_FORMAT!r}")
        if d.get("version", SAVE_VERSION) != SAVE_VERSION:
            raise FormatError(f"{path}: field 'version' is {d.get('version')!r}, "
                              f"expected {SAVE_VERSION}")
        msgs = d.get("messages")
        if not isinstance(msgs, list):
            raise FormatError(f"{path}: field 'messages' must be a list")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise FormatError(f"{path}: field 'messages[{i}]' must be an object")
            if m.get("role") not in _ROLES:
                raise FormatError(f"{path}: field 'messages[{i}].role' is {m.get('role')!r}, "
                                  f"expected one of {', '.join(_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise FormatError(f"{path}: field 'messages[{i}].content' must be a string")
            clean.append({"role": m["role"], "content": m["content"]})
        st = d.get("settings", {})
        if not isinstance(st, dict):
            raise FormatError(f"{path}: field 'settings' must be an object")
        system = st.get("system")
        if system is not None and not isinstance(system, str):
            raise FormatError(f"{path}: field 'settings.system' must be a string or null")
        think = st.get("think", self.think)
        if think is not None and not isinstance(think, bool):
            raise FormatError(f"{path}: field 'settings.think' must be true, false or null")
        max_tokens = st.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                raise FormatError(f"{path}: field 'settings.max_tokens' must be an integer or null")
            try:
                validate_max_tokens(max_tokens)
            except ArgumentError as e:
                raise FormatError(f"{path}: field 'settings.max_tokens': {e}") from e
        seed = st.get("seed", self.seed)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FormatError(f"{path}: field 'settings.seed' must be an integer or null")
        sampling = st.get("sampling", self.sampling)
        if not isinstance(sampling, dict):
            raise FormatError(f"{path}: field 'settings.sampling' must be an object")
        try:
            SamplingParams(seed=seed, **sampling)
        except (ArgumentError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: field 'settings.sampling': {e}") from e
        self.system, self.think, self.max_tokens = system, think, max_tokens
        self.seed, self.sampling = seed, dict(sampling)
        sys_msgs = [{"role": "system", "content": system}] if system else []
        self.messages = sys_msgs + [m for m in clean if m["role"] != "system"]

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


def run_command(sess: ChatSession, name: str, arg: str, note) -> bool:
    """Apply a parsed command to sess; note(str) reports. False means exit."""
    if name == "/exit":
        return False
    if name == "/help":
        note(HELP)
    elif name == "/clear":
        sess.reset()
        note("[conversation reset]")
    elif name == "/think":
        sess.think = arg == "on"
        note(f"[thinking {arg}]")
    elif name == "/system":
        sess.set_system(arg)
        note("[system prompt set]" if arg else "[system prompt cleared]")
    elif name == "/save":
        sess.save(arg)
        note(f"[saved {len(sess.messages)} messages to {arg}]")
    elif name == "/load":
        sess.load(arg)
        note(f"[loaded {len(sess.messages)} messages from {arg}]")
    return True


def _history_path() -> str | None:
    """A writable history file under the user's data dir, or None (then history is in memory)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "share")
    path = os.path.join(base, "flashmoe", "chat_history")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError:
        return None
    return path


def _make_prompt():
    """A prompt_toolkit read function: Enter sends, Alt+Enter / Esc Enter inserts a newline."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    path = _history_path()
    history = FileHistory(path) if path else InMemoryHistory()
    ps = PromptSession(history=history, key_bindings=kb, multiline=False,
                       prompt_continuation=lambda width, n, soft: "." * (width - 1) + " ")
    return lambda: ps.prompt("> ")


def _stream_rich(console, pieces):
    """Render (kind, text) pieces live: reasoning dimmed, the answer as Markdown."""
    from rich.console import Group
    from rich.live import Live
    from rich.markdown import Markdown
    from rich.text import Text

    reasoning, content = [], []

    def view():
        parts = []
        if reasoning:
            parts.append(Text("".join(reasoning).strip("\n"), style="dim italic"))
        if content:
            parts.append(Markdown("".join(content).lstrip("\n")))
        return Group(*parts)

    with Live(view(), console=console, auto_refresh=False, vertical_overflow="visible",
              transient=False) as live:
        for kind, text in pieces:
            (reasoning if kind == "reasoning" else content).append(text)
            live.update(view(), refresh=True)


def chat_cli(a) -> int:
    sampling = _sampling_args(a)
    SamplingParams(seed=getattr(a, "seed", None), **sampling)  # validate before the slow load
    if a.max_tokens is not None:
        validate_max_tokens(a.max_tokens)
    from pyflashmoe.errors import FlashMoEError
    from pyflashmoe.generate import load_from_args
    model = load_from_args(a)
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise FormatError(f"{a.dir}: flashmoe chat needs tokenizer.json and a chat template")
    think = False if getattr(a, "no_think", False) else None
    sess = ChatSession(model, system=a.system, think=think, max_tokens=a.max_tokens,
                       seed=getattr(a, "seed", None), **sampling)
    stdin, out, err = sys.stdin, sys.stdout, sys.stderr
    tty = stdin.isatty() and out.isatty()
    console = None
    if tty:
        from rich.console import Console
        console = Console(highlight=False)
        read = _make_prompt()
        print(f"flashmoe chat: {a.dir or 'demo model'} (/help for commands; Alt+Enter for a "
              "newline)", file=err, flush=True)
    else:
        def read():
            line = stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")

    def note(msg):
        print(msg, file=err, flush=True)

    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl+C at the prompt: drop the line
            continue
        if not line.strip():
            continue
        try:
            cmd = parse_command(line)
            if cmd is not None and cmd[0]:
                if not run_command(sess, cmd[0], cmd[1], note):
                    break
                continue
        except FlashMoEError as e:
            note(f"[error: {e}]")
            continue
        if cmd is not None:
            line = cmd[1]  # "//text": the literal message "/text"
        try:
            if console is not None:
                _stream_rich(console, sess.turn(line))
            else:
                for kind, text in sess.turn(line):
                    out.write(text)
                    out.flush()
                out.write("\n")
                out.flush()
        except KeyboardInterrupt:
            model._reset()
            out.write("\n[interrupted]\n")
            out.flush()
            continue
        except FlashMoEError as e:
            # the turn failed (an I/O error, a full context, ...): the conversation so far is
            # kept (the failed message is not added), and the REPL goes on
            out.write("\n")
            out.flush()
            note(f"[error: {e}; the conversation is kept: send another message, or /clear]")
            continue
        if getattr(a, "verbose", False):
            s = model.stats
            note(f"[prompt {s['prompt_tokens']} tokens ({s['cached_tokens']} reused), "
                 f"{s['prompt_tps']:.2f} tok/s | decode {s['generated_tokens']} tokens, "
                 f"{s['decode_tps']:.2f} tok/s | finish {s['finish_reason']}]")
    return 0
