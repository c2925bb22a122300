"""The embedded demo model (issue 11 item 2): every command and Model.load() use it when no model
dir is given, say so in one line, and it produces English-looking text."""
import os
import re
import subprocess
import sys

import pytest

import pyflashmoe as fm
from pyflashmoe import format as fmt
from pyflashmoe.generate import DEMO_MODEL_DIR

NOTE = "using the embedded demo model"


def _cli(*args, timeout=120, input=None):
    return subprocess.run([sys.executable, "-m", "pyflashmoe", *args], capture_output=True,
                          text=True, timeout=timeout, input=input)


def test_demo_ships_complete():
    # digest, every file's sha256 and every block CRC: the packaged copy is the one recorded
    r = fmt.verify(DEMO_MODEL_DIR)
    assert r["blocks_checked"] > 0 and not r["layers_without_crc"]
    assert os.path.isfile(os.path.join(DEMO_MODEL_DIR, "tokenizer.json"))


def test_model_load_without_path_uses_demo(capsys):
    m = fm.Model.load()
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1 and len(err.strip().splitlines()) == 1
    assert os.path.samefile(m.path, DEMO_MODEL_DIR)
    text = "".join(p.text for p in m.generate("Once upon a time", max_tokens=40, temperature=0.8,
                                               seed=1, ignore_eos=True))
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 15, text
    # mostly lowercase dictionary-like words, not byte soup
    assert sum(w.islower() for w in words) / len(words) > 0.5, text
    m.close()


def test_model_load_with_path_is_silent(capsys):
    fm.Model.load(DEMO_MODEL_DIR).close()
    assert NOTE not in capsys.readouterr().err


def test_cli_run_without_dir():
    r = _cli("run", "-p", "Once upon a time", "-n", "30", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(NOTE) == 1
    assert len(re.findall(r"[A-Za-z]+", r.stdout)) >= 5, r.stdout


@pytest.mark.parametrize("cmd", [["info"], ["verify", "--quick"]])
def test_cli_inspection_without_dir(cmd):
    r = _cli(*cmd)
    assert r.returncode == 0, r.stderr
    assert NOTE in r.stderr and "demo" in r.stdout


def test_cli_chat_without_dir():
    r = _cli("chat", "-n", "20", "--seed", "1", input="Who was Moses?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(NOTE) == 1 and r.stdout.strip()


def test_serve_without_dir_names_the_demo():
    import httpx
    from serve_process import serve_process
    with serve_process() as (p, url):
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        assert ids == ["pyflashmoe-demo"]
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["model"] == "pyflashmoe-demo"
    assert p.stderr.read().count(NOTE) == 1
