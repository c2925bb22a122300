"""`flashmoe chat` through a subprocess with piped stdin, on the tiny converted model of
test_server.py. Expected answers come from Model.generate on the prompt the chat template renders
for the whole conversation (so the test checks that the REPL keeps the history, resets it, passes
the system prompt and enable_thinking, and streams the same text)."""
import os
import subprocess
import sys

import pytest

from pyflashmoe import generate as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_server import build_tiny  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, test_data):
    return build_tiny(tmp_path_factory, test_data)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return G.Model.load(tiny_dir, threads=2)


def _chat(tiny_dir, stdin, *args, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "pyflashmoe", "chat", str(tiny_dir), "-n", str(N),
                           "--threads", "2", *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, env=env, cwd=ROOT)


def _answer(model, msgs, **template_kw):
    ids = model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                              **template_kw)
    return model.generate_text(ids, max_tokens=N, temperature=0), len(ids)


def test_conversation_kept_and_reset(tiny_dir, model):
    u1, u2, u3 = "Hello there, who are you?", "And what is your name?", "Start over: hi"
    r = _chat(tiny_dir, f"{u1}\n{u2}\n/reset\n{u3}\n/exit\nthis line is never answered\n",
              "--temp", "0", "-v")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    a1, n1 = _answer(model, [{"role": "user", "content": u1}])
    a2, n2 = _answer(model, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                             {"role": "user", "content": u2}])
    a3, n3 = _answer(model, [{"role": "user", "content": u3}])
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "[conversation reset]" in r.stderr
    # -v reports each turn's prompt size: the second turn's prompt holds the first exchange
    sizes = [int(line.split("[prompt ")[1].split()[0]) for line in r.stderr.splitlines()
             if line.startswith("[prompt ")]
    assert sizes == [n1, n2, n3]
    assert n2 > n1 + 1


def test_system_prompt_and_no_think(tiny_dir, model):
    r = _chat(tiny_dir, "Hi\n", "--system", "You are a pirate.", "--no-think", "--temp", "0", "-v")
    assert r.returncode == 0, r.stderr
    msgs = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    a, n = _answer(model, msgs, enable_thinking=False)
    assert r.stdout == a + "\n"
    assert f"[prompt {n} tokens" in r.stderr
    # the template really saw both: without them the prompt is shorter
    _, n_plain = _answer(model, [{"role": "user", "content": "Hi"}])
    assert n > n_plain


def test_seeded_sampling_and_eof(tiny_dir):
    # end of input without /exit ends the session cleanly; blank lines are skipped
    r1 = _chat(tiny_dir, "Tell me\n\n", "--temp", "1.0", "--seed", "4")
    r2 = _chat(tiny_dir, "Tell me\n", "--temp", "1.0", "--seed", "4")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert r1.stdout == r2.stdout and r1.stdout.endswith("\n")


@pytest.mark.parametrize("args", [["--temp", "-1"], ["--top-p", "0"], ["-n", "-3"]])
def test_bad_args(tiny_dir, args):
    r = _chat(tiny_dir, "hi\n", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "error" in r.stderr


def test_missing_dir(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pyflashmoe", "chat", str(tmp_path / "nope")],
                       input="hi\n", capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
