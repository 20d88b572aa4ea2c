"""The modules models are built from, named as GGUF names its tensors.

A model's module tree *is* the GGUF tensor table: ``Model.blk[0].attn_q.weight`` is
``blk.0.attn_q.weight``, so one loader (:func:`gguf_runtime.models.base.load_weights`) serves every
model. Parameters are created on the meta device and filled by the loader; a bias declared
``optional`` is loaded when the file has it and stays ``None`` otherwise (llama.cpp's optional
tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels.ggml import FileWeight


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """``{name}.weight`` (out, in) and an optional ``{name}.bias``; ``source`` (set by the loader)
    is the weight's GGUF type, which ggml numerics round activations for."""

    def __init__(self, n_in: int, n_out: int, bias: bool | str = False):
        super().__init__()
        self.weight = param(n_out, n_in)
        self.bias = param(n_out) if bias else None
        self.optional = {"bias"} if bias == "optional" else set()
        self.source: FileWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.source)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = param(n)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float, bias: bool | str = True):
        super().__init__()
        self.weight = param(n)
        self.bias = param(n) if bias else None
        self.optional = {"bias"} if bias == "optional" else set()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    """``{name}.weight`` (rows, dim): rows looked up by index."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = param(n, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx.to(self.weight.device)]


class Weights(nn.Module):
    """A GGUF name prefix whose tensors the model reads directly (``ssm_conv1d.weight`` and
    ``.bias``, a lone ``ssm_dt.bias``, ``rope_freqs.weight``): ``Weights(weight=(4, 8), bias=(4,))``."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, param(*shape))
