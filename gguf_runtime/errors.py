"""Project exceptions. Every user-facing failure is a GGUFRuntimeError with a one-line message."""


class GGUFRuntimeError(Exception):
    """Base class: the message is one line naming the problem."""


class GGUFFormatError(GGUFRuntimeError):
    """A GGUF file is malformed, truncated, or uses something we cannot read."""


class UnsupportedError(GGUFRuntimeError):
    """A valid input that this runtime does not support (unknown architecture, type, ...)."""


class BatchError(GGUFRuntimeError):
    """An impossible batch: bad positions, seq ids out of range, empty, overflow."""


class MemoryFullError(GGUFRuntimeError):
    """No room in the KV cache / recurrent memory for a micro-batch."""


class ConvertError(GGUFRuntimeError):
    """A checkpoint cannot be converted (missing files, inconsistent config, unknown arch)."""


class StateError(GGUFRuntimeError):
    """A state file cannot be restored here (another model or numerics, too small a context, corrupt)."""
