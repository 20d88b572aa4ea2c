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


_ROWWISE: list = []


def native_lib():
    """The native library of the row-wise CPU float32 kernels (resolved once per process; ``None``
    without it)."""
    if not _ROWWISE:
        from ..gguf import native

        _ROWWISE.append(native.rowwise())
    return _ROWWISE[0]


def _native_f32(*ts: torch.Tensor | None):
    """The library when every given tensor is a CPU float32 one, else ``None``. Layout does not
    decide (callers pass ``.contiguous()`` operands): whether a slice is contiguous can depend on
    the batch shape, and the native and torch paths round differently."""
    for t in ts:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return None
    return native_lib()


def _pointwise(lib, name: str, g: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """The library's elementwise ``name`` (``silu_f32``, ``gelu_tanh_f32``) of ``g``, times ``u``
    when given, into a new tensor."""
    g = g.contiguous()
    u = None if u is None else u.contiguous()
    y = torch.empty_like(g)
    getattr(lib, name)(g.data_ptr(), None if u is None else u.data_ptr(), g.numel(), y.data_ptr(),
                       torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32. ggml numerics: the sum of float squares in double, ``1/sqrtf`` in float,
    ``x * scale * w``, as ggml's CPU kernel computes it. Otherwise, on CPU float32 with one weight
    per column, the native ``rms_f32`` (each row's squares summed in one fixed order)."""
    nx = numerics.current()
    lib = None if nx.ggml or (w is not None and w.numel() != x.shape[-1]) else _native_f32(x, w)
    if lib is not None:
        x = x.contiguous()
        w = None if w is None else w.contiguous()
        y = torch.empty_like(x)
        lib.rms_f32(x.data_ptr(), None if w is None else w.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                    eps, y.data_ptr(), torch.get_num_threads())
        return y
    xf = x.float()
    if nx.ggml:
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
    lib = _native_f32(x)
    return _pointwise(lib, "silu_f32", x) if lib is not None else lanewise(F.silu, x)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (one native pass on CPU float32)."""
    lib = _native_f32(g, u) if g.shape == u.shape else None
    return _pointwise(lib, "silu_f32", g, u) if lib is not None else silu(g) * u


def softplus(x: torch.Tensor) -> torch.Tensor:
    return lanewise(F.softplus, x)


def geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(g) * u`` (Gemma's feed-forward; one native pass on CPU float32)."""
    lib = _native_f32(g, u) if g.shape == u.shape and not numerics.current().ggml else None
    return _pointwise(lib, "gelu_tanh_f32", g, u) if lib is not None else gelu_tanh(g) * u


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
    lib = _native_f32(x)
    return _pointwise(lib, "gelu_tanh_f32", x) if lib is not None else lanewise(_gelu_tanh, x)


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
