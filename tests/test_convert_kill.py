"""`convert` and `convert --force` killed (SIGKILL) at random points and at each rename never leave a
loadable wrong dir at DST, nor no model where there was one (issue 9, item 6).

A zygote process imports pyflashmoe once and forks one child per convert (a fresh interpreter per
kill would spend ~0.3 s importing for a ~0.1 s convert). Each child wraps os.rename,
format.exchange_dirs, format._remove_tree and format.write_manifest: at every call it reports an
event before and after, and it can pause at the k-th event so the zygote kills it exactly there.
The reference: the tree of sha256s of every file of the old model (8-bit experts) and of the new
one (4-bit), each converted once untouched. After each kill DST must be absent (fresh convert) or
pass format.verify and be byte for byte the old or the new model; the fallback without an atomic
exchange may leave DST missing only with the old model beside it, which the reader (format.verify
-> read_manifest -> recover_replaced) restores. A following convert succeeds and leaves nothing
beside DST.
"""
import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys

import pytest

from pyflashmoe import format as fmt
from pyflashmoe.convert import convert

torch = pytest.importorskip("torch")
from tiny_models import make_tiny_hf  # noqa: E402

N_RANDOM = 50
SEED = 9
OLD_KW = {"bits": 8, "group_size": 32}
NEW_KW = {"bits": 4, "group_size": 32}

ZYGOTE = r'''
import json, os, signal, sys, time
import pyflashmoe.convert as conv
from pyflashmoe import format as fmt


def child(cmd, w):
    n = [0]

    def emit(s):
        os.write(w, (s + "\n").encode())

    def hook(label):
        k = n[0]
        n[0] += 1
        emit(f"E {k} {label}")
        if cmd.get("pause_at") == k:
            emit("P")
            time.sleep(600)

    def wrap(fn, name):
        def f(*a, **kw):
            hook("before " + name)
            r = fn(*a, **kw)
            hook("after " + name)
            return r
        return f

    if cmd.get("no_exchange"):
        fmt.exchange_dirs = lambda a, b: False      # as on a filesystem without RENAME_EXCHANGE
    os.rename = wrap(os.rename, "rename")
    for name, label in (("exchange_dirs", "exchange"), ("_remove_tree", "remove"),
                        ("write_manifest", "manifest")):
        if hasattr(fmt, name):
            setattr(fmt, name, wrap(getattr(fmt, name), label))
    conv.convert(cmd["src"], cmd["dst"], force=cmd["force"], progress=False, **cmd["kw"])


def read_lines(fd, until=None):
    buf, out = b"", []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        buf += b
        *lines, buf = buf.split(b"\n")
        out += [x.decode() for x in lines]
        if until is not None and until in out:
            break
    return out


for line in sys.stdin:
    cmd = json.loads(line)
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            child(cmd, w)
        except BaseException as e:
            code = 1
            os.write(w, ("X " + type(e).__name__ + ": " + str(e)[:500].replace("\n", " ") + "\n").encode())
        os._exit(code)
    os.close(w)
    lines = []
    if cmd.get("delay") is not None:
        time.sleep(cmd["delay"])
        os.kill(pid, signal.SIGKILL)        # not reaped yet: the pid is still this child
    elif cmd.get("pause_at") is not None:
        lines = read_lines(r, until="P")
        os.kill(pid, signal.SIGKILL)
    _, st = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    lines += read_lines(r)
    os.close(r)
    status = ("killed" if os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL
              else f"exit {os.waitstatus_to_exitcode(st)}")
    print(json.dumps({"status": status, "elapsed": elapsed, "paused": "P" in lines,
                      "events": [x.split(" ", 2)[2] for x in lines if x.startswith("E ")],
                      "errors": [x[2:] for x in lines if x.startswith("X ")]}), flush=True)
'''


class Zygote:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def run(self, timeout=60, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            self.p.kill()
            raise AssertionError(f"zygote: no answer in {timeout} s to {cmd}")
        line = self.p.stdout.readline()
        assert line, f"zygote died (exit {self.p.poll()})"
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _tree(d):
    """{relative path: sha256} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def kill_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    src, _ = make_tiny_hf("qwen3_5_moe", base / "src", seed=5)
    convert(src, base / "ref_old", progress=False, **OLD_KW)
    convert(src, base / "ref_new", progress=False, **NEW_KW)
    old, new = _tree(base / "ref_old"), _tree(base / "ref_new")
    assert old != new and old.keys() == new.keys()
    z = Zygote()
    yield {"src": str(src), "base": base, "old": old, "new": new, "z": z}
    z.close()


def _state(env, dst, allow_aside=False):
    """'absent' | 'old' | 'new' | 'restored' (the fallback's old model put back by the reader) for
    DST right after a kill; fails on anything else."""
    if not os.path.lexists(dst):
        aside = [n for n in os.listdir(os.path.dirname(dst)) if ".old-" in n]
        if not aside:
            return "absent"
        assert allow_aside, f"DST missing with the old model aside in {aside} (needs the fallback)"
        fmt.verify(dst)             # the reader restores the old model (recover_replaced)
        assert os.path.isdir(dst), "the reader did not restore the old model"
        assert _tree(dst) == env["old"], "restored a dir that is not the old model"
        return "restored"
    fmt.verify(dst)                 # complete: every file's sha256 (+ the manifest digest)
    t = _tree(dst)
    if t == env["old"]:
        return "old"
    assert t == env["new"], f"DST is a loadable dir that is neither the old nor the new model: {sorted(t)}"
    return "new"


def _leftovers(area, name):
    return sorted(n for n in os.listdir(area) if n != name)


def _reset(env, dst, to_old):
    if os.path.lexists(dst):
        shutil.rmtree(dst)
    if to_old:
        shutil.copytree(env["base"] / "ref_old", dst)


def _full_run(env, dst, force, no_exchange=False):
    r = env["z"].run(src=env["src"], dst=str(dst), force=force, kw=NEW_KW, no_exchange=no_exchange)
    assert r["status"] == "exit 0", r
    assert _tree(dst) == env["new"]
    fmt.verify(dst)
    return r


def _scenario(env, name, force, no_exchange, n_random):
    area = env["base"] / name
    area.mkdir()
    dst = area / "m"
    z = env["z"]
    if force and not no_exchange:
        a, b = area / "probe_a", area / "probe_b"
        a.mkdir()
        b.mkdir()
        ok = fmt.exchange_dirs(a, b)
        a.rmdir()
        b.rmdir()
        if not ok:
            pytest.skip(f"{area}: no atomic directory exchange on this filesystem (the fallback has "
                        f"its own test)")
    cmd = dict(src=env["src"], dst=str(dst), force=force, kw=NEW_KW, no_exchange=no_exchange)
    allowed = {"absent", "new"} if not force else ({"old", "new", "restored"} if no_exchange else {"old", "new"})

    # dry runs: the events in order and the run time
    times, events = [], None
    for _ in range(3):
        _reset(env, dst, force)
        r = _full_run(env, dst, force, no_exchange)
        assert events is None or r["events"] == events, (events, r["events"])
        events = r["events"]
        times.append(r["elapsed"])
        assert _leftovers(area, "m") == []
    T = max(times)            # the whole run, so some points land after the swap
    assert any(e.endswith(("rename", "exchange")) for e in events), events

    outcomes = {}
    # exactly at each hook point: right before and right after every rename / exchange, the manifest
    # write and the deletion of the old tree
    for k, ev in enumerate(events):
        _reset(env, dst, force)
        r = z.run(pause_at=k, **cmd)
        assert r["paused"] and r["status"] == "killed", (k, ev, r)
        st = _state(env, dst, allow_aside=no_exchange)
        assert st in allowed, (k, ev, st)
        outcomes[k] = st
        _full_run(env, dst, force=True, no_exchange=no_exchange)   # the next convert succeeds ...
        assert _leftovers(area, "m") == [], (k, ev)                 # ... and cleans up
    if force and not no_exchange:     # this filesystem swaps atomically (ext4, xfs, btrfs, tmpfs)
        assert "before exchange" in events and "before rename" not in events, events
    if force and no_exchange:
        assert events.count("before rename") == 2, events
    # the old model survives every point up to the swap, the new one every point after it
    swap = "before exchange" if force and not no_exchange else "before rename"
    assert swap in events, events
    i_swap = max(i for i, e in enumerate(events) if e == swap)
    for k, e in enumerate(events):
        if force:
            assert outcomes[k] in (("new",) if k > i_swap else ("old", "restored")), (k, e, outcomes[k])
        else:
            assert outcomes[k] == ("new" if k > i_swap else "absent"), (k, e, outcomes[k])

    # random points in time, uniform over the measured run
    rng = random.Random(SEED)
    hist = {}
    killed = 0
    _reset(env, dst, force)
    for _ in range(n_random):
        d = rng.uniform(0, T)
        r = z.run(delay=d, **cmd)
        killed += r["status"] == "killed"
        assert r["status"] in ("killed", "exit 0"), r
        st = _state(env, dst, allow_aside=no_exchange)
        assert st in allowed, (d, st, r)
        hist[st] = hist.get(st, 0) + 1
        assert len(_leftovers(area, "m")) <= 2, _leftovers(area, "m")   # cleaned by each new run
        if st == "new":
            _reset(env, dst, force)       # back to the old model (or none) for the next kill
    print(f"\n{name}: run {T * 1e3:.0f} ms, {len(events)} hook points, {n_random} random kills "
          f"({killed} in flight): {hist}")
    assert killed >= n_random // 5, f"only {killed} of {n_random} kills landed before the end"
    _full_run(env, dst, force=True, no_exchange=no_exchange)
    assert _leftovers(area, "m") == []


def test_fresh_convert_killed(kill_env):
    _scenario(kill_env, "fresh", force=False, no_exchange=False, n_random=N_RANDOM)


def test_force_convert_killed(kill_env):
    _scenario(kill_env, "force", force=True, no_exchange=False, n_random=N_RANDOM)


def test_force_convert_killed_without_exchange(kill_env):
    """The fallback (two renames): a kill between them leaves the old model aside; the reader and
    the next convert put it back."""
    _scenario(kill_env, "fallback", force=True, no_exchange=True, n_random=20)


# ---- AtomicDir details ---------------------------------------------------------------------------

def test_exchange_keeps_dst_a_dir_and_replaces_a_symlinked_dst(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not fmt.exchange_dirs(a, b):
        pytest.skip("no atomic directory exchange on this OS / filesystem")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
    # DST a symlink to a model dir: the link is replaced, its target is left alone
    target = tmp_path / "target"
    target.mkdir()
    (target / fmt.MANIFEST).write_text("{}")
    dst = tmp_path / "link"
    os.symlink(target, dst)
    with fmt.AtomicDir(dst, force=True) as t:
        fmt.write_manifest(t, {"format": "x"})
    assert not os.path.islink(dst) and json.loads((dst / fmt.MANIFEST).read_text())["format"] == "x"
    assert (target / fmt.MANIFEST).read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "link", "target"]


def test_stale_cleanup_never_deletes_the_only_copy(tmp_path, monkeypatch):
    """A dead process's `.old-` dir while DST is missing is restored (not deleted); its temporary
    dir is deleted; a live process's dirs are left alone."""
    dst = tmp_path / "m"
    dead = 2 ** 22 + 12345            # above pid_max's default: no such process
    old = tmp_path / f".m.old-{dead}-0badc0de"
    old.mkdir()
    (old / fmt.MANIFEST).write_text('{"v": "old"}')
    tmp_dead = tmp_path / f".m.tmp-{dead}-abcd1234"
    tmp_dead.mkdir()
    live = tmp_path / f".m.tmp-{os.getppid()}-live0000"
    live.mkdir()
    with pytest.raises(Exception, match="--force"):
        fmt.AtomicDir(dst).check()    # the old model is back at DST, so DST exists
    assert json.loads((dst / fmt.MANIFEST).read_text()) == {"v": "old"} and not old.exists()
    with fmt.AtomicDir(dst, force=True) as t:
        fmt.write_manifest(t, {"v": "new"})
    assert json.loads((dst / fmt.MANIFEST).read_text())["v"] == "new"
    assert sorted(os.listdir(tmp_path)) == sorted(["m", live.name])
    # without the exchange: the same two-rename path leaves no leftovers either
    monkeypatch.setattr(fmt, "exchange_dirs", lambda a, b: False)
    with fmt.AtomicDir(dst, force=True) as t:
        fmt.write_manifest(t, {"v": "newer"})
    assert json.loads((dst / fmt.MANIFEST).read_text())["v"] == "newer"
    assert sorted(os.listdir(tmp_path)) == sorted(["m", live.name])


def test_failed_second_rename_puts_the_old_model_back(tmp_path, monkeypatch):
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / fmt.MANIFEST).write_text('{"v": "old"}')
    monkeypatch.setattr(fmt, "exchange_dirs", lambda a, b: False)
    real = os.rename
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(a, b)
    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(fmt.ModelIOError, match="cannot move"):
        with fmt.AtomicDir(dst, force=True) as t:
            fmt.write_manifest(t, {"v": "new"})
    assert json.loads((dst / fmt.MANIFEST).read_text()) == {"v": "old"}
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.parametrize("reader", ["Model.load", "validate", "info"])
def test_readers_restore_a_replace_killed_between_renames(kill_env, tmp_path, reader):
    """The fallback's crash window (old model at .m.old-PID-X, no DST): whatever opens DST next puts
    the old model back instead of reporting no model."""
    dead = 2 ** 22 + 777
    shutil.copytree(kill_env["base"] / "ref_old", tmp_path / f".m.old-{dead}-0badc0de")
    dst = tmp_path / "m"
    if reader == "Model.load":
        import numpy as np
        import pyflashmoe as fm
        with fm.Model.load(str(dst), threads=1) as model:
            assert np.isfinite(model.logits([1, 2, 3])).all()
    elif reader == "validate":
        fmt.validate(dst)
    else:
        r = subprocess.run([sys.executable, "-m", "pyflashmoe", "info", str(dst)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["m"] and _tree(dst) == kill_env["old"]
