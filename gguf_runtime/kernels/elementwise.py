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
    """The tanh approximation of GELU (GPT-2, Gemma: HF's ``gelu_new`` / ``gelu_pytorch_tanh``).
    ggml numerics: llama.cpp's CPU ``ggml_gelu`` (:func:`gelu_ggml`)."""
    if numerics.current().ggml:
        return gelu_ggml(x)
    return lanewise(_gelu_tanh, x)


_GELU_F16: dict[torch.device, torch.Tensor] = {}


def _gelu_table(device: torch.device) -> torch.Tensor:
    """ggml's ``table_gelu_f16``: for every f16 bit pattern h, ``f16(gelu(f32(h)))`` with the tanh
    formula evaluated in float32 as ggml_gelu_f32 writes it, stored here as float32 (65536,)."""
    t = _GELU_F16.get(device)
    if t is None:
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
        inner = (0.7978845608028654 * x) * (1.0 + (0.044715 * x) * x)  # SQRT_2_OVER_PI*x*(1 + GELU_COEF_A*x*x)
        g = (0.5 * x) * (1.0 + torch.tanh(inner.double()).float())
        t = _GELU_F16[device] = g.half().float().to(device)
    return t


def gelu_ggml(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU (GGML_GELU_FP16): x <= -10 -> 0, x >= 10 -> x, else the input rounded to
    f16 looks up the f16 table of the tanh GELU. Elementwise on each value alone (batch-invariant)."""
    xf = x.float()
    idx = xf.half().view(torch.int16).to(torch.int64) & 0xFFFF
    y = _gelu_table(x.device)[idx]
    y = torch.where(xf <= -10.0, torch.zeros_like(xf), torch.where(xf >= 10.0, xf, y))
    return y.to(x.dtype)


def exp(x: torch.Tensor) -> torch.Tensor:
    return lanewise(torch.exp, x)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return lanewise(torch.tanh, x)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); ``cap = 0`` leaves ``x``."""
    return x if not cap else tanh(x / cap) * cap


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """:func:`softcap` in place (the same bits), for a tensor the caller owns: a 262k vocabulary's
    logits would otherwise take three more fresh buffers of their size."""
    if not cap:
        return x
    x.div_(cap)
    if not numerics.current().invariant or (x.is_contiguous() and x.numel() % (64 * max(1, torch.get_num_threads())) == 0):
        x.tanh_()
    else:
        x.copy_(tanh(x))
    return x.mul_(cap)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float64 (as llama-perplexity accumulates it)."""
    return torch.log_softmax(x.double(), dim=-1)


__all__ = ["rms_norm", "layer_norm", "lanewise", "silu", "softplus", "gelu", "gelu_tanh", "gelu_ggml", "exp", "tanh", "softcap",
           "softcap_", "log_softmax"]
