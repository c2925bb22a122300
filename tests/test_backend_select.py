"""Backend selection through the Python API: "cuda" without a GPU is a clear error, "auto" falls back."""
import numpy as np
import pytest

from pyflashmoe import _core as core
from pyflashmoe.errors import BackendError

pytest.importorskip("transformers")
tm = pytest.importorskip("tiny_models")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pyflashmoe.convert import convert
    d = tmp_path_factory.mktemp("sel")
    hf, _ = tm.make_tiny_hf("qwen3_moe", str(d / "hf"), seed=1, num_hidden_layers=2)
    return convert(hf, str(d / "fm"), bits=16, progress=False)


@pytest.mark.skipif(core.cuda_available(), reason="a GPU is present: the no-GPU paths cannot be exercised")
def test_cuda_raises_and_auto_falls_back_to_cpu(tiny_dir):
    from pyflashmoe import Model
    with pytest.raises(BackendError, match="cuda"):
        Model.load(tiny_dir, backend="cuda")
    auto = Model.load(tiny_dir, backend="auto")
    cpu = Model.load(tiny_dir, backend="cpu")
    assert auto.backend == "cpu"
    toks = [1, 5, 9, 2]
    np.testing.assert_array_equal(auto.logits(toks), cpu.logits(toks))


@pytest.mark.skipif(not core.cuda_available(), reason="no usable CUDA device: 'auto' picks CPU here")
def test_auto_picks_cuda_when_available(tiny_dir):
    from pyflashmoe import Model
    assert Model.load(tiny_dir, backend="auto").backend == "cuda"
