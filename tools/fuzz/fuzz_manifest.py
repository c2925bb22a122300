"""Fuzz target (b): the manifest loader.

Each input is a pyflashmoe.json written into a tiny valid model dir (tools/fuzz/build_models.py;
the dir is the Qwen3-MoE one when the input names "qwen3_moe", else the Qwen3-Next one), then
`format.validate(dir)` and `Model.load(dir)` run on it. Oracle:
  * both raise only project errors (FlashMoEError);
  * Model.load never accepts what validate rejects, and accepts everything validate accepts;
  * an accepted model gives finite logits for [1, 2, 3] (no accepted-but-invalid model).

    python tools/fuzz/fuzz_manifest.py -atheris_runs=20000 /tmp/fuzz-work/manifest tools/fuzz/corpus/manifest
"""
import atexit
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzlib  # noqa: E402

SRC_DIRS = fuzzlib.model_dirs()

with atheris.instrument_imports(include=["pyflashmoe"]):
    from pyflashmoe.models import registry
    registry()   # imports every model family module, instrumented
    import numpy as np
    from pyflashmoe import format as fmt
    from pyflashmoe.errors import FlashMoEError
    from pyflashmoe.generate import Model

# private copies: the fuzzer rewrites pyflashmoe.json in them
WORK = tempfile.mkdtemp(prefix="fuzz-manifest-", dir=fuzzlib.fast_tmp())
atexit.register(shutil.rmtree, WORK, True)
DIRS = []
for s in SRC_DIRS:
    d = os.path.join(WORK, os.path.basename(s))
    shutil.copytree(s, d)
    DIRS.append(d)


class Finding(AssertionError):
    pass


def check(dirpath):
    """The oracle on one model dir; raises Finding (or a non-project exception) on a bug."""
    try:
        fmt.validate(dirpath)
        accepted = True
    except FlashMoEError as e:
        accepted, why = False, e
    try:
        model = Model.load(dirpath, threads=1, io_threads=1, context_length=16)
    except FlashMoEError as e:
        if accepted:
            raise Finding(f"validate accepted but Model.load rejected: {e}") from None
        return "rejected"
    try:
        if not accepted:
            raise Finding(f"Model.load accepted what validate rejected ({why})")
        try:
            lg = model.logits([1, 2, 3])
        except FlashMoEError as e:
            raise Finding(f"accepted model fails to evaluate: {e}") from None
        if not np.isfinite(lg).all():
            raise Finding("accepted-but-invalid model: non-finite logits")
    finally:
        model.close()
    return "accepted"


COUNTS = {"rejected": 0, "accepted": 0}


def _report():
    print(f"fuzz_manifest: {COUNTS['accepted']} accepted (loaded, finite logits), "
          f"{COUNTS['rejected']} rejected by both validate and Model.load", file=sys.stderr)


atexit.register(_report)


def TestOneInput(data):
    d = DIRS[1] if b'"qwen3_moe"' in data else DIRS[0]
    with open(os.path.join(d, "pyflashmoe.json"), "wb") as f:
        f.write(data)
    COUNTS[check(d)] += 1


SEEDS = []
for _d in SRC_DIRS:
    with open(os.path.join(_d, "pyflashmoe.json"), "rb") as _f:
        SEEDS.append(_f.read())


def CustomMutator(data, max_size, seed):
    # half the time restart from the valid manifest of the same model, so that a good share of
    # the inputs are a few edits away from valid (the ones that reach the C loader and logits)
    if seed % 2:
        data = SEEDS[1] if b'"qwen3_moe"' in data else SEEDS[0]
    return fuzzlib.mutate_json_bytes(data, max_size, seed // 2, atheris.Mutate)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()
