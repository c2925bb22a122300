"""The dense weights are locked in RAM by default (streamed experts must not evict them)."""
import resource

import numpy as np
import pytest

from pyflashmoe import _core as core

pytest.importorskip("transformers")
tm = pytest.importorskip("tiny_models")


def test_lock_dense_default_and_off_give_same_logits(tmp_path):
    from pyflashmoe.convert import convert
    hf, _ = tm.make_tiny_hf("qwen3_5_moe", str(tmp_path / "hf"), seed=3)
    out = convert(hf, str(tmp_path / "fm"), bits=16, progress=False)
    locked = core.Engine(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= locked.dense_bytes:
        assert locked.dense_locked, "mlock was allowed by RLIMIT_MEMLOCK but the dense weights are not locked"
    unlocked = core.Engine(out, lock_dense=False)
    assert not unlocked.dense_locked
    toks = np.array([3, 1, 4, 1, 5, 9], dtype=np.int32)
    a = core.Session(locked, 16).eval(toks, all_logits=True)
    b = core.Session(unlocked, 16).eval(toks, all_logits=True)
    np.testing.assert_array_equal(a, b)
