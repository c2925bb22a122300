"""The CUDA backend's comparison switches (fm_debug_params, csrc/fm.h) on the CPU: the C core checks them
at fm_model_open and in fm_model_set_debug (FM_ERR_ARG naming the field, nothing changed), and
pyflashmoe.switches maps the FM_CUDA_* environment variables onto them once per model load (a bad
value: ArgumentError naming the variable). No GPU needed: the checks run before any backend work,
and the CPU backend carries the switches without using them."""
import os

import numpy as np
import pytest

core = pytest.importorskip("pyflashmoe._core")
from pyflashmoe.errors import ArgumentError  # noqa: E402
from pyflashmoe.switches import ENV_SWITCHES, debug_from_env  # noqa: E402

DEFAULTS = {"cuda_graph": 1, "cuda_timing": 0, "cuda_mma": 1, "gdn_chunk": 4, "cpu_split": -1.0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pyflashmoe.synth import synth
    out = str(tmp_path_factory.mktemp("dbg") / "tiny")
    synth(out, preset="tiny", vocab=1024, bits=4, group_size=64, progress=False)
    return out


def test_defaults(tiny_dir):
    eng = core.Engine(tiny_dir, n_threads=1)
    assert eng.debug == DEFAULTS


@pytest.mark.parametrize("key,bad", [("cuda_graph", 2), ("cuda_timing", -1), ("cuda_mma", 7), ("gdn_chunk", -1),
                                     ("cpu_split", 1.5), ("cpu_split", float("nan"))])
def test_bad_value_names_the_field(tiny_dir, key, bad):
    with pytest.raises(ArgumentError, match=rf"debug\.{key}"):
        core.Engine(tiny_dir, n_threads=1, debug={key: bad})
    eng = core.Engine(tiny_dir, n_threads=1)
    with pytest.raises(ArgumentError, match=rf"debug\.{key}"):
        eng.set_debug({key: bad})
    assert eng.debug == DEFAULTS  # unchanged


def test_bad_type_or_key(tiny_dir):
    with pytest.raises(ArgumentError, match="unknown switch 'cuda_pipe'"):
        core.Engine(tiny_dir, n_threads=1, debug={"cuda_pipe": 0})
    with pytest.raises(ArgumentError, match=r"debug\.cpu_split"):
        core.Engine(tiny_dir, n_threads=1, debug={"cpu_split": "half"})
    with pytest.raises(ArgumentError, match=r"debug\.gdn_chunk"):
        core.Engine(tiny_dir, n_threads=1, debug={"gdn_chunk": 2.5})
    with pytest.raises(ArgumentError, match="dict"):
        core.Engine(tiny_dir, n_threads=1, debug=[("cuda_mma", 0)])


def test_set_debug_changes_only_what_is_named(tiny_dir):
    eng = core.Engine(tiny_dir, n_threads=1, debug={"cpu_split": "auto", "gdn_chunk": 0})
    assert eng.debug == {**DEFAULTS, "gdn_chunk": 0}
    eng.set_debug(cuda_mma=0, cpu_split=0.25)
    assert eng.debug == {**DEFAULTS, "gdn_chunk": 0, "cuda_mma": 0, "cpu_split": 0.25}
    eng.set_debug({"cuda_graph": False}, cpu_split="auto")
    assert eng.debug == {**DEFAULTS, "gdn_chunk": 0, "cuda_mma": 0, "cuda_graph": 0}
    # the CPU backend ignores them: same logits as an engine with the defaults
    toks = np.arange(3, 11, dtype=np.int32)
    a = core.Session(eng, 32).eval(toks)
    b = core.Session(core.Engine(tiny_dir, n_threads=1), 32).eval(toks)
    assert np.array_equal(a, b)


def test_env_mapping():
    assert debug_from_env({}) == {}
    assert debug_from_env({"FM_CUDA_GRAPH": "0", "FM_CUDA_TIMING": "1", "FM_CUDA_MMA": "0", "FM_CUDA_GDN_CHUNK": "16",
                           "FM_CUDA_CPU_SPLIT": "0.5", "FM_CUDA_PIPE": "0", "OTHER": "x"}) == \
        {"cuda_graph": 0, "cuda_timing": 1, "cuda_mma": 0, "gdn_chunk": 16, "cpu_split": 0.5}
    assert debug_from_env({"FM_CUDA_CPU_SPLIT": "auto", "FM_CUDA_GDN_CHUNK": ""}) == {"cpu_split": -1.0}
    assert set(ENV_SWITCHES.values()) == set(DEFAULTS)


@pytest.mark.parametrize("var,bad", [("FM_CUDA_CPU_SPLIT", "1.5"), ("FM_CUDA_CPU_SPLIT", "half"),
                                     ("FM_CUDA_CPU_SPLIT", "-0.5"), ("FM_CUDA_GDN_CHUNK", "-1"),
                                     ("FM_CUDA_GDN_CHUNK", "two"), ("FM_CUDA_MMA", "yes"), ("FM_CUDA_GRAPH", "2")])
def test_env_bad_value_names_the_variable(var, bad):
    with pytest.raises(ArgumentError, match=var):
        debug_from_env({var: bad})


def test_model_load_reads_env_once(tiny_dir, monkeypatch):
    from pyflashmoe.generate import Model
    monkeypatch.setenv("FM_CUDA_CPU_SPLIT", "1.5")
    with pytest.raises(ArgumentError, match="FM_CUDA_CPU_SPLIT"):
        Model.load(tiny_dir, threads=1)
    monkeypatch.setenv("FM_CUDA_CPU_SPLIT", "0.5")
    monkeypatch.setenv("FM_CUDA_MMA", "0")
    m = Model.load(tiny_dir, threads=1, debug={"cuda_mma": 1})  # explicit switches win over the environment
    assert m.engine.debug == {**DEFAULTS, "cpu_split": 0.5}
    monkeypatch.delenv("FM_CUDA_CPU_SPLIT")
    assert m.engine.debug["cpu_split"] == 0.5  # read at load, not per eval
    assert "FM_CUDA_MMA" in os.environ
