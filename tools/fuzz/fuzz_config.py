"""Fuzz target (a): the config reader.

Each input is a config.json (optionally with a "__generation_config__" key holding a
generation_config.json). Runs `convert.reader.check_config` and `models.spec_from_config`.
Oracle: only project errors; an accepted config gives a spec that passes ModelSpec.check,
round-trips through the manifest form (ModelSpec.from_dict(spec.to_dict())), and whose
tensor_map builds without error.

    python tools/fuzz/fuzz_config.py -atheris_runs=500000 /tmp/fuzz-work/config tools/fuzz/corpus/config
"""
import atexit
import json
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzlib  # noqa: E402

with atheris.instrument_imports(include=["pyflashmoe"]):
    from pyflashmoe.models import registry
    registry()   # imports every model family module, instrumented
    from pyflashmoe.convert.reader import check_config
    from pyflashmoe.errors import FlashMoEError
    from pyflashmoe.models import ModelSpec, spec_from_config, tensor_map


COUNTS = {"not JSON": 0, "rejected": 0, "accepted": 0}
atexit.register(lambda: print(f"fuzz_config: {COUNTS}", file=sys.stderr))


def TestOneInput(data):
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        COUNTS["not JSON"] += 1
        return                      # reading the file is fuzzed by the other targets
    gen = None
    if isinstance(cfg, dict):
        gen = cfg.pop("__generation_config__", None)
    try:
        check_config(cfg)
        spec = spec_from_config(cfg, gen)
    except FlashMoEError:
        COUNTS["rejected"] += 1
        return
    COUNTS["accepted"] += 1
    spec.check()
    d = json.loads(json.dumps(spec.to_dict()))
    if ModelSpec.from_dict(d) != spec:
        raise AssertionError("spec does not round-trip through to_dict/from_dict")
    tm = tensor_map(spec)
    if len(tm) > 64 * spec.n_layers + 16:
        raise AssertionError(f"tensor map of {len(tm)} entries for {spec.n_layers} layers")


SEEDS = [open(os.path.join(fuzzlib.HERE, "corpus", "config", n), "rb").read()
         for n in sorted(os.listdir(os.path.join(fuzzlib.HERE, "corpus", "config")))]


def CustomMutator(data, max_size, seed):
    # a third of the time restart from a real config, so that many inputs are a few edits away
    # from valid and reach the spec checks, the round trip and the tensor map
    if seed % 3 == 0:
        data = SEEDS[(seed // 3) % len(SEEDS)]
    return fuzzlib.mutate_json_bytes(data, max_size, seed, atheris.Mutate)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()
