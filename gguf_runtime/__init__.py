"""gguf-runtime: a Python (torch) runtime for GGUF models.

``load`` / ``dequantize`` / ``GGUFFile`` read files; ``load_model`` builds a model; ``Context`` and
``Batch`` decode llama.cpp style under a ``Numerics`` value. Every name but the errors is imported
on first use, so importing the package (the CLI's ``--help``) does not import torch.
"""
from .errors import GGUFFormatError, GGUFRuntimeError

_LAZY = {"dequantize": ".gguf.dequant", "load": ".gguf.loader", "LoadedGGUF": ".gguf.loader",
         "GGUFFile": ".gguf.reader", "Numerics": ".numerics"}

__all__ = ["dequantize", "load", "LoadedGGUF", "GGUFFile", "GGUFRuntimeError", "GGUFFormatError", "Numerics",
           "Context", "Batch", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
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
