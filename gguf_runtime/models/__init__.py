"""Model registry: GGUF ``general.architecture`` -> model module under gguf_runtime.models.

Each module follows mlx-lm's layout: a ``ModelArgs`` dataclass (``from_gguf``), the blocks, and a
``Model`` on the contract of :mod:`.base` (modules named as the GGUF tensors, ``make_memory``,
``forward(ubatch, view)`` -> final hidden states, ``logits(h)``).
"""
from __future__ import annotations

import importlib

import torch

from ..errors import UnsupportedError
from ..gguf.reader import GGUFFile

ARCHS = {
    "llama": "llama",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "bert": "bert",
    "jamba": "jamba",
    "granitehybrid": "granitehybrid",
    "t5": "t5",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3moe",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}


def model_class(arch: str):
    mod = ARCHS.get(arch)
    if mod is None:
        raise UnsupportedError(f"unknown architecture '{arch}' (supported: {', '.join(sorted(ARCHS))})")
    try:
        return importlib.import_module(f"{__name__}.{mod}").Model
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{mod}":
            raise UnsupportedError(f"architecture '{arch}' is not implemented yet") from None
        raise


def load_model(path_or_file, device=None, dtype=torch.float32, weights: str = "resident"):
    """Open a GGUF file and build its model on ``device`` computing in ``dtype``; ``weights``:
    ``resident`` (dequantized at load), ``lazy`` (kept in the file's types, dequantized layer by
    layer), ``quant`` (kept in the file's types and multiplied as they are, CPU float32), ``auto``
    (lazy when resident would not fit)."""
    f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
    return model_class(f.arch).from_gguf(f, device=device, dtype=dtype, weights=weights)

