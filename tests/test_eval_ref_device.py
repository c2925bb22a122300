"""`flashmoe eval --ref-device`: the torch device of an HF checkpoint reference (the bf16 reference
of the full held-out table is computed on the GPU machine, bench/demo_eval_all.py)."""

import numpy as np
import pytest

from pyflashmoe import ArgumentError, BackendError
from pyflashmoe import eval as ev
from pyflashmoe.cli import main

torch = pytest.importorskip("torch", reason="an HF reference needs torch")
pytest.importorskip("transformers", reason="an HF reference needs transformers")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from tiny_models import make_tiny_hf
    return make_tiny_hf("qwen3_5_moe", str(tmp_path_factory.mktemp("hf") / "hf"), seed=3)[0]


def test_ref_device_cpu_is_the_default(hf):
    windows, total = ev.make_windows(np.random.default_rng(0).integers(3, 512, 100), 32, 30)
    a = ev.compute_reference(ev._HFSource(hf), windows, total, exact=True)
    b = ev.compute_reference(ev._HFSource(hf, device="cpu"), windows, total, exact=True)
    np.testing.assert_array_equal(a.full, b.full)
    np.testing.assert_array_equal(a.hidden, b.hidden)


def test_ref_device_errors(hf, tmp_path):
    with pytest.raises(ArgumentError, match="--ref-device 'gpu0': not a torch device"):
        ev._HFSource(hf, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="--ref-device cuda: torch sees no CUDA device"):
            ev._HFSource(hf, device="cuda")
    # only an HF checkpoint runs through torch: a model dir or saved file as --ref is refused
    with pytest.raises(ArgumentError, match="--ref-device cuda: only an HF checkpoint reference"):
        ev.evaluate(models=[ev.DEMO_MODEL], ref=ev.DEMO_REF, ref_device="cuda", quiet=True,
                    log=lambda m: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch here")
def test_ref_device_cuda_matches_cpu(hf):
    windows, total = ev.make_windows(np.random.default_rng(0).integers(3, 512, 100), 32, 30)
    a = ev.compute_reference(ev._HFSource(hf), windows, total, exact=True)
    b = ev.compute_reference(ev._HFSource(hf, device="cuda"), windows, total, exact=True)
    np.testing.assert_allclose(b.full, a.full, atol=1e-3)


def test_cli_ref_device_option(capsys):
    assert main(["eval", "--ref", ev.DEMO_REF, "--ref-device", "cuda", "-q"]) == 2
    assert "only an HF checkpoint reference" in capsys.readouterr().err
