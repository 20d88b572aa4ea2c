"""Norms and elementwise functions whose result for an element depends on its value alone.

Norms reduce along a row only, in float32 whatever the input dtype (as ggml does): half-precision
elementwise kernels round differently in their vector body and scalar tail, which would make a row's
result depend on how many rows share the call. Transcendental functions go through
:func:`lanewise` under invariant numerics (see there).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import numerics


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32. ggml numerics: the sum of float squares in double, ``1/sqrtf`` in float,
    ``x * scale * w``, as ggml's CPU kernel computes it."""
    xf = x.float()
    if numerics.current().ggml:
        scale = torch.rsqrt(((xf * xf).double().sum(-1, keepdim=True) / xf.shape[-1]).float() + eps)
        y = xf * scale
        return (y * w.float() if w is not None else y).to(x.dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm in float32 (F.layer_norm reduces each row on its own, tested batch-invariant)."""
    return F.layer_norm(x.float(), x.shape[-1:], None if w is None else w.float(),
                        None if b is None else b.float(), eps).to(x.dtype)


def lanewise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise function so that every element goes through the vectorised body.

    torch's CPU kernels compute transcendental functions with SIMD code (Sleef) in the body of a
    contiguous run and with the scalar libm function in its tail (and at each thread's range end);
    the two can differ in the last bit, so an element's result would depend on where it sits, i.e.
    on the batch shape. Padding the flat tensor to a multiple of 64 x threads puts every element in
    a vector lane, where the result depends on the value alone."""
    if not numerics.current().invariant:
        return fn(x)
    flat = x.reshape(-1)
    q = 64 * max(1, torch.get_num_threads())
    pad = (-flat.numel()) % q
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return fn(flat)[: x.numel()].view(x.shape)


def exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place on a contiguous tensor whose size already fills whole vector chunks (else
    :func:`exp`)."""
    if numerics.current().invariant and x.is_contiguous() and x.numel() % (64 * max(1, torch.get_num_threads())) == 0:
        return x.exp_()
    return exp(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return lanewise(F.silu, x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return lanewise(F.softplus, x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU."""
    return lanewise(F.gelu, x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (GPT-2, Gemma: HF's ``gelu_new`` / ``gelu_pytorch_tanh``)."""
    return lanewise(_gelu_tanh, x)


def exp(x: torch.Tensor) -> torch.Tensor:
    return lanewise(torch.exp, x)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return lanewise(torch.tanh, x)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); ``cap = 0`` leaves ``x``."""
    return x if not cap else tanh(x / cap) * cap


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float64 (as llama-perplexity accumulates it)."""
    return torch.log_softmax(x.double(), dim=-1)


__all__ = ["rms_norm", "layer_norm", "lanewise", "silu", "softplus", "gelu", "gelu_tanh", "exp", "tanh", "softcap",
           "log_softmax"]
