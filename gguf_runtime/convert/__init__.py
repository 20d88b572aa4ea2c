"""Converters, as llama.cpp does them: ``convert`` (Hugging Face / state-spaces checkpoint ->
GGUF, in ``hf``) and ``quantize.quantize`` (f32/f16 GGUF -> quantized GGUF)."""
from .hf import convert

__all__ = ["convert"]
