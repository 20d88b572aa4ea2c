"""Converters: Hugging Face / state-spaces checkpoints -> GGUF, and quantization."""
