"""Model registry: GGUF ``general.architecture`` -> model module under gguf_runtime.models.

Each module follows mlx-lm's layout: a ``ModelArgs`` dataclass (``from_gguf``), the blocks, and a
``Model`` with ``sanitize(weights)`` (GGUF tensor names -> module parameters), ``make_cache()``
(the memory the model needs), ``forward(ubatch, view)`` -> final hidden states, ``output(h)`` -> logits.
"""
from __future__ import annotations

import importlib

import torch

from ..device import resolve_device
from ..errors import GGUFFormatError, UnsupportedError
from ..reader import GGUFFile

ARCHS = {
    "llama": "llama",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "bert": "bert",
    "gemma3": "gemma3",
    "gpt2": "gpt2",
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


def load_model(path_or_file, device=None, dtype=torch.float32):
    """Open a GGUF file and build its model with weights dequantized onto ``device`` as ``dtype``."""
    f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
    return model_class(f.arch).from_gguf(f, device=device, dtype=dtype)


def build(cls, args, f: GGUFFile, device=None, dtype=torch.float32, reshape: bool = False):
    """The common ``from_gguf`` body: build ``cls(args)`` without allocating, dequantize the file's
    tensors onto ``device`` as ``dtype``, map them with ``cls.sanitize``, check every parameter is
    present with the shape the metadata implies (``reshape``: same element count suffices), load.
    A missing or mis-shaped tensor is a one-line GGUFFormatError."""
    dev = resolve_device(device)
    with torch.device("meta"):
        model = cls(args)
    raw = {n: f.tensor(n, device=dev, dtype=dtype) for n in f.tensor_infos}
    by_ptr = {t.data_ptr(): n for n, t in raw.items()}
    weights = cls.sanitize(raw)
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n not in weights:
            raise GGUFFormatError(f"{f.path.name}: {f.arch} tensor missing for parameter '{n}'")
        w = weights[n]
        if tuple(w.shape) != tuple(p.shape):
            if not (reshape and w.numel() == p.numel()):
                raise GGUFFormatError(f"{f.path.name}: {f.arch} tensor for '{n}' has shape {tuple(w.shape)}, "
                                      f"expected {tuple(p.shape)} from the metadata")
            weights[n] = w.reshape(p.shape)
    model.load_state_dict({n: weights[n] for n in params}, strict=True, assign=True)
    for p in model.parameters():  # the file's type of each weight, for ggml_numerics
        name = by_ptr.get(p.data_ptr())
        if name is not None:
            p.ggml_type, p.ggml_source = f.info(name).qtype.name, (f, name)
    model.dtype, model.device = dtype, dev
    return model.eval(), weights
