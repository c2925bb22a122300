"""Exceptions raised by pyflashmoe. Every message names the file, field or parameter at fault."""


class FlashMoEError(Exception):
    """Base class of every pyflashmoe error."""


class ArgumentError(FlashMoEError, ValueError):
    """A bad argument (sampling parameter, token id, option)."""


class FormatError(FlashMoEError):
    """A model directory or checkpoint is malformed: the message names the file and field."""


class ModelIOError(FlashMoEError, OSError):
    """Reading a model file failed."""


class BackendError(FlashMoEError):
    """The requested backend is unavailable or failed."""


class ContextFullError(FlashMoEError):
    """The session has no room left for the tokens."""


class NumericalError(FlashMoEError):
    """A non-finite (NaN/Inf) hidden state or logits vector: the message names the layer and the
    position. Damaged weights or expert data are the usual cause (`flashmoe verify`). The session
    that saw it was reset, so nothing computed from the bad values is reused."""


class UnsupportedModelError(FlashMoEError):
    """config.json names a model_type pyflashmoe has no spec for."""
