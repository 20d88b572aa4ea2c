"""Tokenizers from a GGUF vocabulary (llama.cpp's llama-vocab): SPM, byte-level BPE, WordPiece."""
from .tokenizer import Tokenizer

__all__ = ["Tokenizer"]
