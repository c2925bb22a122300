"""The terminal side of `flashmoe chat`: the command parser, /save and /load (fast, no model),
and a tmux-driven session on the embedded demo model (line editing, history recall, multi-line
input, an unknown command refused, /save, /exit)."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from pyflashmoe.chat import ChatSession, parse_command
from pyflashmoe.errors import ArgumentError, FlashMoEError, FormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the command parser ----------------------------------------------------------------------
def test_parse_messages_and_commands():
    assert parse_command("hello") is None
    assert parse_command("  what is 1/2?") is None
    assert parse_command("//etc/passwd is a file") == ("", "/etc/passwd is a file")
    assert parse_command("/help") == ("/help", "")
    assert parse_command("/?") == ("/help", "")
    assert parse_command("/reset") == ("/clear", "")
    assert parse_command("/quit") == ("/exit", "")
    assert parse_command("/EXIT ") == ("/exit", "")
    assert parse_command("/think ON") == ("/think", "on")
    assert parse_command("/think off") == ("/think", "off")
    assert parse_command("/system You are  terse. ") == ("/system", "You are  terse.")
    assert parse_command("/system") == ("/system", "")
    assert parse_command("/save my chat.json") == ("/save", "my chat.json")
    assert parse_command("/load x.json") == ("/load", "x.json")


@pytest.mark.parametrize("line,word", [("/bogus", "unknown command '/bogus'"),
                                       ("/sav x", "unknown command '/sav'"),
                                       ("/think maybe", "'on' or 'off'"), ("/think", "'on' or 'off'"),
                                       ("/save", "needs a file path"), ("/load  ", "needs a file path"),
                                       ("/clear now", "takes no argument")])
def test_parse_errors(line, word):
    with pytest.raises(ArgumentError) as ei:
        parse_command(line)
    assert word in str(ei.value)
    if "unknown" in word:  # the error lists the commands
        for c in ("/help", "/save", "/load", "/think", "/system", "/clear", "/exit"):
            assert c in str(ei.value)


# -- /save and /load -------------------------------------------------------------------------
def _sess(**kw):
    return ChatSession(None, **kw)  # no model: only turn() needs one


def test_save_load_round_trip(tmp_path):
    s = _sess(system="Be brief.", think=False, max_tokens=7, seed=3, temperature=0.5, top_k=4)
    s.messages += [{"role": "user", "content": "héllo\nthere"},
                   {"role": "assistant", "content": "**hi**"}]
    p = tmp_path / "c.json"
    s.save(str(p))
    assert not [f for f in os.listdir(tmp_path) if f != "c.json"]  # the temp file is gone
    d = json.loads(p.read_text(encoding="utf-8"))
    assert d["format"] == "flashmoe-chat" and d["version"] == 1
    assert d["messages"] == s.messages
    t = _sess()
    t.load(str(p))
    assert t.messages == s.messages
    assert (t.system, t.think, t.max_tokens, t.seed) == ("Be brief.", False, 7, 3)
    assert t.sampling == {"temperature": 0.5, "top_k": 4}
    # /system keeps the conversation; clearing it drops the system message
    t.set_system("")
    assert t.system is None and [m["role"] for m in t.messages] == ["user", "assistant"]
    t.set_system("New.")
    assert t.messages[0] == {"role": "system", "content": "New."} and len(t.messages) == 3


@pytest.mark.parametrize("content,field", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"messages": 3}', "'messages'"),
    ('{"messages": [5]}', "'messages[0]'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "'messages[0].role'"),
    ('{"messages": [{"role": "user", "content": 1}]}', "'messages[0].content'"),
    ('{"messages": [], "settings": {"think": "yes"}}', "'settings.think'"),
    ('{"messages": [], "settings": {"max_tokens": -2}}', "'settings.max_tokens'"),
    ('{"messages": [], "settings": {"sampling": {"temperature": -1}}}', "'settings.sampling'"),
    ('{"messages": [], "settings": {"sampling": {"bogus": 1}}}', "'settings.sampling'"),
    ('{"format": "other", "messages": []}', "'format'"),
])
def test_load_bad_file(tmp_path, content, field):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    s = _sess(system="Keep.")
    s.messages.append({"role": "user", "content": "kept"})
    before = list(s.messages)
    with pytest.raises(FormatError) as ei:
        s.load(str(p))
    assert str(p) in str(ei.value) and field in str(ei.value)
    assert s.messages == before and s.system == "Keep."  # nothing changed


def test_load_missing_and_save_unwritable(tmp_path):
    s = _sess()
    with pytest.raises(FlashMoEError) as ei:
        s.load(str(tmp_path / "nope.json"))
    assert "nope.json" in str(ei.value)
    with pytest.raises(FlashMoEError) as ei:
        s.save(str(tmp_path / "no" / "such" / "dir" / "c.json"))
    assert "c.json" in str(ei.value)


def test_piped_commands(tmp_path):
    """Piped stdin: an unknown command is refused (not sent), /save writes the file."""
    p = tmp_path / "s.json"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "chat", "-n", "4", "--temp", "0",
                        "--threads", "2"],
                       input=f"/bogus\n/system Be nice.\nHi\n/save {p}\n/exit\n", text=True,
                       capture_output=True, timeout=120, env=env, cwd=ROOT, encoding="utf-8")
    assert r.returncode == 0, r.stderr
    assert "unknown command '/bogus'" in r.stderr and "Traceback" not in r.stderr
    d = json.loads(p.read_text(encoding="utf-8"))
    assert [m["role"] for m in d["messages"]] == ["system", "user", "assistant"]
    assert d["messages"][1]["content"] == "Hi"
    assert r.stdout.count("\n") == 1  # one answer: /bogus generated nothing


# -- a real terminal, driven through tmux ----------------------------------------------------
def _tmux(*args, check=True):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10, check=check)


def _pane(name):
    return _tmux("capture-pane", "-p", "-J", "-t", name, "-S", "-200").stdout


def _wait(name, pred, what, timeout=40):
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = _pane(name)
        if pred(text):
            return text
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; the pane:\n{text}")


def test_tmux_terminal_session(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the terminal test needs it")
    name = f"fmchat-{uuid.uuid4().hex[:8]}"
    save = tmp_path / "saved.json"
    data = tmp_path / "data"
    cmd = (f"cd {ROOT} && env PYTHONPATH={ROOT} XDG_DATA_HOME={data} {sys.executable} -m pyflashmoe "
           f"chat -n 6 --temp 0 --threads 2; echo CHAT-EXITED rc=$?; sleep 60")
    _tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "50", cmd)
    try:
        def prompts(t):
            return [ln for ln in t.splitlines() if ln.startswith("> ") or ln == ">"]

        _wait(name, lambda t: "/help for commands" in t and prompts(t), "the first prompt")
        _tmux("send-keys", "-t", name, "-l", "Hello there")
        _tmux("send-keys", "-t", name, "Enter")
        _wait(name, lambda t: len(prompts(t)) >= 2, "the first answer")
        # Up recalls the previous message into the line editor (no escape sequence sent)
        _tmux("send-keys", "-t", name, "Up")
        t = _wait(name, lambda t: prompts(t)[-1].rstrip() == "> Hello there", "Up to recall")
        assert "[A" not in t
        _tmux("send-keys", "-t", name, "C-u")
        _wait(name, lambda t: prompts(t)[-1].rstrip() == ">", "the line cleared")
        # Alt+Enter (Esc then Enter) inserts a newline: one message of two lines
        _tmux("send-keys", "-t", name, "-l", "line one")
        _tmux("send-keys", "-t", name, "Escape", "Enter")
        _tmux("send-keys", "-t", name, "-l", "line two")
        _tmux("send-keys", "-t", name, "Enter")
        _wait(name, lambda t: len(prompts(t)) >= 3, "the second answer")
        # an unknown command: an error, nothing sent to the model
        _tmux("send-keys", "-t", name, "-l", "/bogus")
        _tmux("send-keys", "-t", name, "Enter")
        _wait(name, lambda t: "unknown command '/bogus'" in t and len(prompts(t)) >= 4,
              "the /bogus error")
        _tmux("send-keys", "-t", name, "-l", f"/save {save}")
        _tmux("send-keys", "-t", name, "Enter")
        _wait(name, lambda t: "[saved 4 messages" in t, "/save")
        _tmux("send-keys", "-t", name, "-l", "/exit")
        _tmux("send-keys", "-t", name, "Enter")
        t = _wait(name, lambda t: "CHAT-EXITED" in t, "/exit")
        assert "CHAT-EXITED rc=0" in t and "Traceback" not in t
        d = json.loads(save.read_text(encoding="utf-8"))
        users = [m["content"] for m in d["messages"] if m["role"] == "user"]
        assert users == ["Hello there", "line one\nline two"]  # /bogus was not sent
        assert [m["role"] for m in d["messages"]] == ["user", "assistant"] * 2
        # the history file under the data dir holds both messages
        hist = (data / "flashmoe" / "chat_history").read_text(encoding="utf-8")
        assert "Hello there" in hist and "/bogus" in hist
    finally:
        _tmux("kill-session", "-t", name, check=False)
