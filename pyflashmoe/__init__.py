"""pyflashmoe: run Mixture-of-Experts LLMs larger than memory.

Dense weights stay resident; only the routed experts are read from SSD, through a tiered cache.
"""
__version__ = "0.1.0"

from pyflashmoe.errors import (ArgumentError, BackendError, ContextFullError, FlashMoEError,
                               FormatError, ModelIOError, UnsupportedModelError)


def __getattr__(name):
    # Lazy: importing pyflashmoe must not build or load heavy pieces it does not need.
    if name in ("Model", "GenerationPiece"):
        from pyflashmoe import generate
        return getattr(generate, name)
    if name == "Tokenizer":
        from pyflashmoe.tokenizer import Tokenizer
        return Tokenizer
    if name == "convert":
        from pyflashmoe.convert import convert
        return convert
    raise AttributeError(f"module 'pyflashmoe' has no attribute {name!r}")


__all__ = ["Model", "GenerationPiece", "Tokenizer", "convert", "FlashMoEError", "ArgumentError",
           "FormatError", "ModelIOError", "BackendError", "ContextFullError", "UnsupportedModelError"]
