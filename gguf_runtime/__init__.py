"""gguf-runtime: a Python (torch) runtime for GGUF models."""
from .dequant import dequantize
from .errors import GGUFFormatError, GGUFRuntimeError
from .loader import LoadedGGUF, load
from .reader import GGUFFile

__all__ = ["dequantize", "load", "LoadedGGUF", "GGUFFile", "GGUFRuntimeError", "GGUFFormatError"]
__version__ = "0.1.0"
