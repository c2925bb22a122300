"""Issue 10 item 3 acceptance: prefix states for many conversations (pyflashmoe/prefix.py).

Two conversations, interleaved over 10 turns each, on the embedded demo model with one session
(so every turn resumes from a snapshot: the other conversation had the session in between), with
thinking on and off, and a tool-call / tool-result turn. Every turn after the first evaluates only
its new tokens, checked on the engine's own counters (the session's n_tokens during prefill) and on
the cached count usage reports.

What counts as new. The previous turn of the same conversation left these states behind: its whole
sequence (prompt + generated tokens, kept when the session was handed to the other conversation),
the end of its prompt, and the starts (`<|im_start|>`) of its last two messages. The new prompt
is covered up to the longest of these that is a prefix of it:
  * the template re-renders the history identically (the assistant's tokens as generated): the
    whole previous sequence is covered; only the new messages are evaluated;
  * the template drops the thinking block of an earlier assistant turn (Qwen3.5 renders an
    assistant message before the last user query as `<|im_start|>assistant\\n` + content, without
    the `<think>` part it was generated with), or re-serialises a tool call: the assistant message
    differs from its first token after `<|im_start|>assistant\\n`, so it is evaluated again from its
    `<|im_start|>` (a few tokens of markup + the answer), plus the new messages.
RSS: the snapshot budget is set small (so snapshots spill to a disk directory with its own cap);
the pool's RAM byte count never exceeds it, and the process's RSS grows by no more than the budget
plus a small allowance while far more snapshot bytes than that were saved.
"""
import os

import numpy as np
import pytest

import pyflashmoe
from pyflashmoe.prefix import StatePool, header_info


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def model():
    return pyflashmoe.Model.load()


def _turn(m, msgs, think):
    """ids of the prompt, the held sequence (prompt + evaluated generated tokens), text, stats"""
    kw = {"enable_thinking": think}
    ids = m.encode_prompt(msgs, kw)
    pieces = list(m.generate(msgs, max_tokens=10, temperature=0, chat_template_kwargs=kw))
    toks = [p.token for p in pieces if p.token is not None]
    text = "".join(p.text for p in pieces)
    held = ids + toks[:-1]  # the last sampled token is never evaluated
    return ids, held, text, dict(m.stats)


def _expected_cached(ids, earlier, im_start):
    """The longest state the conversation's earlier turns left that ids extends: each turn's
    whole sequence, its prompt, and the start of each message of its prompt."""
    best = 0
    for prompt, held in earlier:
        marks = [i for i, t in enumerate(prompt) if t == im_start]
        for p in [len(held), len(prompt)] + marks:
            if 0 < p < len(ids) and ids[:p] == held[:p]:
                best = max(best, p)
    return best


def _first_changed_message(ids, held, im_start):
    """The start of the first message of ids that differs from held (len(held) if none does)."""
    d = 0
    while d < min(len(ids), len(held)) and ids[d] == held[d]:
        d += 1
    if d == len(held):
        return d
    return max(i for i in range(d + 1) if ids[i] == im_start)


def test_two_conversations_ten_turns_evaluate_only_new_tokens(model, tmp_path):
    m = model
    im_start = m.tokenizer.token_to_id("<|im_start|>")
    m._reset()
    budget = 3 << 20  # ~4 demo snapshots: spilling starts on the second turn
    pool = m.pool
    pool.clear_snapshots()
    pool.configure(ram_bytes=budget, disk_dir=str(tmp_path / "states"), disk_bytes=64 << 20, min_gap=0)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
    convs = {"a": [system, {"role": "user", "content": "Who wrote the book of Job?"}],
             "b": [system, {"role": "user", "content": "Tell me about Moses."}]}
    prev = {}
    rss0 = None
    checked = 0
    for turn in range(10):
        for name in ("a", "b"):
            msgs = convs[name]
            think = (turn + (name == "b")) % 2 == 0
            ids, held, text, st = _turn(m, msgs, think)
            evaluated = st["prefill"]["n_tokens"]
            assert st["prompt_tokens"] == len(ids)
            assert evaluated == len(ids) - st["cached_tokens"], st
            if name in prev:
                want = _expected_cached(ids, prev[name], im_start)
                assert st["cached_tokens"] == want, (name, turn, st["cached_tokens"], want)
                # only new tokens: everything before the first message the template rendered
                # differently (none when it re-rendered the history identically) was cached
                assert want >= _first_changed_message(ids, prev[name][-1][1], im_start)
                checked += 1
            elif name == "b":
                # the other conversation's first prompt left a state at the end of the shared
                # system message: b's first turn starts from it
                sys_end = [i for i, t in enumerate(ids) if t == im_start][1]  # the user message
                assert st["cached_tokens"] == sys_end
            prev.setdefault(name, []).append((ids, held))
            ps = pool.stats()
            assert ps["ram_bytes"] <= budget, ps
            assert ps["disk_bytes"] <= 64 << 20, ps
            if turn == 1 and name == "b":
                rss0 = _rss()
            # the next message: a tool-call round on turn 4, else a plain user message
            if turn == 4:
                msgs += [{"role": "assistant", "content": text,
                          "tool_calls": [{"type": "function", "function": {
                              "name": "lookup", "arguments": {"query": f"{name} {turn}"}}}]},
                         {"role": "tool", "content": f"result {turn} for {name}"}]
            else:
                msgs += [{"role": "assistant", "content": text},
                         {"role": "user", "content": f"And after that? ({turn})"}]
    assert checked == 18
    ps = pool.stats()
    # the snapshots far outgrew the budget; the RAM tier kept to it, the rest went to disk
    assert ps["saved"] > 30 and ps["spilled"] > 10 and ps["snapshots_disk"] > 0, ps
    assert ps["snapshot_hits"] >= 18 and ps["load_failures"] == 0, ps
    saved_bytes = ps["saved"] * 400_000  # a demo snapshot is at least the recurrent state, ~0.43 MB
    growth = _rss() - rss0
    assert saved_bytes > 4 * budget
    assert growth <= budget + (8 << 20), (growth, ps)
    pool.configure(min_gap=16)


def test_spilled_file_that_fails_is_dropped_not_fatal(model, tmp_path, caplog):
    """A damaged spilled snapshot: load_state refuses it (checksum), the pool deletes it with a
    log line and serves the prompt from the next best state; a missing file likewise."""
    m = model
    m._reset()
    pool = m.pool
    pool.clear_snapshots()
    pool.configure(ram_bytes=0, disk_dir=str(tmp_path / "s"), disk_bytes=64 << 20, min_gap=0)
    ids = m.encode_prompt([{"role": "user", "content": "Who wrote the book of Job?"}])
    sess, _, n = pool.prefill(ids)
    pool.finish(sess, None)  # the live state goes: the next prefill must load from disk
    ps = pool.stats()
    assert n == 0 and ps["snapshots_ram"] == 0 and ps["snapshots_disk"] == 2, ps
    files = {int(p.name.split("-")[0]): p for p in (tmp_path / "s").rglob("*.fmstate")}
    assert sorted(files)[-1] == len(ids)
    gen_start = sorted(files)[0]
    raw = bytearray(files[len(ids)].read_bytes())
    raw[-5] ^= 0xFF
    files[len(ids)].write_bytes(bytes(raw))
    longer = ids + [11, 12]
    # the reference evaluates in the same chunks as the pool (split at the generation prompt's
    # start): the same bits (one pass of all tokens differs in the last float bits)
    ref = pyflashmoe._core.Session(m.engine, 64)
    ref.eval(np.asarray(longer[:gen_start], np.int32))
    want = ref.eval(np.asarray(longer[gen_start:], np.int32))
    with caplog.at_level("WARNING", logger="pyflashmoe.prefix"):
        sess, logits, n = pool.prefill(longer)
    assert "checksum" in caplog.text and str(files[len(ids)]) in caplog.text
    assert not files[len(ids)].exists()
    assert pool.stats()["load_failures"] == 1
    # served from the next best state (the generation prompt's start), the same logits
    assert n == gen_start
    np.testing.assert_array_equal(logits, want)
    pool.finish(sess, None)
    # a file deleted behind the pool's back: dropped with a log line too
    for p in (tmp_path / "s").rglob("*.fmstate"):
        p.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="pyflashmoe.prefix"):
        sess, logits, n = pool.prefill(longer)
    assert "cannot read" in caplog.text
    assert n == 0
    np.testing.assert_array_equal(logits, want)
    pool.finish(sess, None)
    pool.clear_snapshots()
    pool.configure(min_gap=16)


def test_disk_tier_cap_atomic_files_and_adoption(model, tmp_path):
    """The disk tier keeps to its cap (oldest deleted), writes no partial files, and a new pool
    over the same directory adopts the files an earlier one left (states survive a restart)."""
    m = model
    m._reset()
    pool = m.pool
    pool.clear_snapshots()
    d = tmp_path / "st"
    pool.configure(ram_bytes=0, disk_dir=str(d), disk_bytes=3 << 20, min_gap=0)
    for i in range(6):
        _turn(m, [{"role": "user", "content": f"Question number {i} about the prophets?"}], False)
        ps = pool.stats()
        assert ps["disk_bytes"] <= 3 << 20
        assert not list(d.rglob("*.tmp"))
    ps = pool.stats()
    assert ps["disk_evicted"] > 0 and ps["snapshots_disk"] >= 2, ps
    on_disk = sorted(p.name for p in d.rglob("*.fmstate"))
    assert len(on_disk) == ps["snapshots_disk"]
    for p in d.rglob("*.fmstate"):
        info = header_info(p.read_bytes())
        assert info["pos"] == int(p.name.split("-")[0])
    # a second pool (another process, after a restart) over the same directory
    fresh = StatePool(m.engine, lambda e, n: pyflashmoe._core.Session(e, n), m.context_length,
                      ram_bytes=0, disk_dir=str(d), disk_bytes=3 << 20,
                      boundary_ids=[m.tokenizer.token_to_id("<|im_start|>")])
    ids = m.encode_prompt([{"role": "user", "content": "Question number 5 about the prophets?"}],
                          {"enable_thinking": False})
    sess, logits, n = fresh.prefill(ids + [11])
    assert fresh.stats()["adopted"] == len(on_disk)
    assert n == len(ids)  # the end of that prompt, saved by the first pool
    # the same bits as a session evaluated in the chunks the first pool used (split at the
    # generation prompt's start, then the prompt's end)
    ref = pyflashmoe._core.Session(m.engine, m.context_length)
    b = max(i for i, t in enumerate(ids) if t == m.tokenizer.token_to_id("<|im_start|>"))
    ref.eval(np.asarray(ids[:b], np.int32))
    ref.eval(np.asarray(ids[b:], np.int32))
    np.testing.assert_array_equal(logits, ref.eval(np.asarray([11], np.int32)))
    fresh.finish(sess, None)
    pool.clear_snapshots()
    pool.configure(min_gap=16)


def test_default_budget_scales_with_the_snapshot_size(model):
    m = model
    pool = StatePool(m.engine, lambda e, n: pyflashmoe._core.Session(e, n), 4096)
    s = pyflashmoe._core.Session(m.engine, 64)
    s.eval([5, 6, 7, 8])
    info = header_info(s.save_state())
    assert info["pos"] == 4 and info["per_token_bytes"] > 0
    pool._default_budget(s.save_state())
    full = info["fixed_bytes"] + info["per_token_bytes"] * 4096
    assert pool.ram_bytes == max(8 * full, 256 << 20)


def test_fake_sessions_without_state_api_still_work():
    """Sessions without save_state/load_state (test doubles): live reuse only, no snapshots."""
    class S:
        def __init__(self):
            self.pos = 0

        def eval(self, toks):
            self.pos += len(toks)
            return np.zeros(4, np.float32)

        def reset(self):
            self.pos = 0

    pool = StatePool(None, lambda e, n: S(), 64, boundary_ids=[1])
    s, _, n = pool.prefill([1, 5, 6, 1, 7, 8])
    assert n == 0
    pool.finish(s, [1, 5, 6, 1, 7, 8])
    s, _, n = pool.prefill([1, 5, 6, 1, 7, 8, 9])
    assert n == 6
    assert pool.stats()["saved"] == 0


def test_serve_reports_cached_tokens_end_to_end(model, tmp_path):
    """A real `flashmoe serve --state-ram --state-dir --state-disk` (demo model, one session, so the
    other conversation's turn in between makes every resume come from a snapshot): OpenAI's
    usage.prompt_tokens_details.cached_tokens and Anthropic's usage.cache_read_input_tokens say
    how much of each prompt was reused; it covers at least everything before the previous turn's
    answer (the server returns the answer without its thinking, which the template would drop
    anyway), and prompt_tokens - cached is what was evaluated (input_tokens on Anthropic's side)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="flashmoe serve needs the serve extra")
    from serve_process import serve_process
    m = model
    im_start = m.tokenizer.token_to_id("<|im_start|>")
    states = tmp_path / "states"
    with serve_process("--threads", "2", "--parallel", "1", "--state-ram", "1MiB", "--state-dir",
                       str(states), "--state-disk", "64MiB") as (p, url):
        oa = [{"role": "user", "content": "Who wrote the book of Job?"}]
        an = [{"role": "user", "content": "Tell me about Moses."}]
        prev_oa = prev_an = None
        for turn in range(3):
            r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": oa, "max_tokens": 8, "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False}}).json()
            u = r["usage"]
            cached = u["prompt_tokens_details"]["cached_tokens"]
            ids = m.encode_prompt(oa, {"enable_thinking": False})
            assert u["prompt_tokens"] == len(ids)
            if prev_oa is not None:
                assert cached >= max(i for i, t in enumerate(prev_oa) if t == im_start) > 0, u
            prev_oa = ids
            oa += [{"role": "assistant", "content": r["choices"][0]["message"]["content"] or "."},
                   {"role": "user", "content": f"And then? ({turn})"}]
            r = httpx.post(url + "/v1/messages", timeout=120, json={
                "model": "pyflashmoe-demo", "messages": an, "max_tokens": 8, "temperature": 0,
                "thinking": {"type": "disabled"}}).json()
            u = r["usage"]
            text = "".join(b.get("text", "") for b in r["content"] if b["type"] == "text") or "."
            if prev_an is not None:
                assert u["cache_read_input_tokens"] > 0, u
                assert u["input_tokens"] + u["cache_read_input_tokens"] > u["cache_read_input_tokens"]
            prev_an = u
            an += [{"role": "assistant", "content": text},
                   {"role": "user", "content": f"And then? ({turn})"}]
    assert list(states.rglob("*.fmstate")), "nothing spilled past --state-ram 1MiB"


_CORE = pytest.importorskip("pyflashmoe._core")
GPU = hasattr(_CORE, "cuda_available") and _CORE.cuda_available()
REASON = ("pyflashmoe._core has no CUDA API" if not hasattr(_CORE, "cuda_available") else
          "this build has no CUDA backend (built without nvcc or FLASHMOE_CUDA=0)" if not _CORE.cuda_compiled()
          else _CORE.cuda_describe())


@pytest.mark.skipif(not GPU, reason=REASON)
def test_cuda_two_conversations_resume_from_snapshots(tmp_path):
    """The acceptance loop on the CUDA backend (snapshots copied device <-> host, spilled to disk):
    two interleaved conversations, 4 turns each, one session: every turn after the first resumes
    from the longest state its conversation left (the CPU test's rule), RAM within the budget."""
    m = pyflashmoe.Model.load(backend="cuda")
    im_start = m.tokenizer.token_to_id("<|im_start|>")
    budget = 2 << 20
    m.pool.configure(ram_bytes=budget, disk_dir=str(tmp_path / "states"), disk_bytes=64 << 20, min_gap=0)
    convs = {"a": [{"role": "user", "content": "Who wrote the book of Job?"}],
             "b": [{"role": "user", "content": "Tell me about Moses."}]}
    prev = {}
    for turn in range(4):
        for name in ("a", "b"):
            msgs = convs[name]
            think = (turn + (name == "b")) % 2 == 0
            ids, held, text, st = _turn(m, msgs, think)
            assert st["prefill"]["n_tokens"] == len(ids) - st["cached_tokens"], st
            if name in prev:
                want = _expected_cached(ids, prev[name], im_start)
                assert st["cached_tokens"] == want, (name, turn, st["cached_tokens"], want)
                assert want >= _first_changed_message(ids, prev[name][-1][1], im_start)
            prev.setdefault(name, []).append((ids, held))
            assert m.pool.stats()["ram_bytes"] <= budget
            msgs += [{"role": "assistant", "content": text},
                     {"role": "user", "content": f"And after that? ({turn})"}]
    ps = m.pool.stats()
    # one session, the conversations alternate: each of the 2 x 3 later turns resumes from a snapshot
    assert ps["snapshot_hits"] >= 6 and ps["spilled"] > 0 and ps["load_failures"] == 0, ps
    m.close()
