"""gguf-runtime: a Python (torch) runtime for GGUF models.

``load`` / ``dequantize`` / ``GGUFFile`` read files; ``load_model`` builds a model; ``Context`` and
``Batch`` decode llama.cpp style under a ``Numerics`` value. Heavier names are imported on first use.
"""
from .errors import GGUFFormatError, GGUFRuntimeError
from .gguf.dequant import dequantize
from .gguf.loader import LoadedGGUF, load
from .gguf.reader import GGUFFile
from .numerics import Numerics

__all__ = ["dequantize", "load", "LoadedGGUF", "GGUFFile", "GGUFRuntimeError", "GGUFFormatError", "Numerics",
           "Context", "Batch", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Context":
        from .context import Context

        return Context
    if name == "Batch":
        from .batch import Batch

        return Batch
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'gguf_runtime' has no attribute {name!r}")
