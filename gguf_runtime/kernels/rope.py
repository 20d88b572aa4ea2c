"""Rotary position embeddings: frequencies for GGUF's RoPE scaling kinds and the rotation itself."""
from __future__ import annotations

import math

import torch

from .. import numerics
from ..errors import UnsupportedError
from . import ggml
from .elementwise import _native_f32

def rope_freqs(dim: int, base: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in float32 and the cos/sin magnitude scale, for the RoPE scaling
    kinds GGUF metadata names (``{arch}.rope.scaling.type``): none, linear (positions / factor) and
    yarn (ggml's ramp between interpolated and extrapolated frequencies over the correction dims
    from beta_fast/beta_slow, magnitude ``attn_factor * (1 + 0.1 ln factor)``). Llama-3 style
    scaling arrives as the ``rope_freqs`` tensor (per-pair frequency divisors) instead."""
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    inv = 1.0 / (base ** (i / dim))
    mscale = 1.0
    kind = (scaling or {}).get("type", "none")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "yarn":
        factor = scaling["factor"]
        n_orig = scaling.get("original_context_length") or 4096
        corr = lambda n_rot: dim * math.log(n_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo = max(0.0, math.floor(corr(scaling.get("beta_fast", 32.0))))
        hi = min(dim - 1.0, math.ceil(corr(scaling.get("beta_slow", 1.0))))
        ramp = 1 - ((i / 2 - lo) / max(0.001, hi - lo)).clamp(0, 1)  # 1 = keep extrapolated frequency
        inv = (inv / factor) * (1 - ramp) + inv * ramp
        mscale = scaling.get("attn_factor", 1.0) * (1.0 + 0.1 * math.log(factor))
    elif kind not in ("none", None):
        raise UnsupportedError(f"unsupported RoPE scaling type '{kind}' (supported: none, linear, yarn)")
    return inv.float(), mscale


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor, device, freq_factors: torch.Tensor | None = None,
                mscale: float = 1.0, ggml_theta: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each (n, 1, d_rot/2), of positions ``pos`` (n,): angles in float32 as ggml
    computes them (its recurrence under ggml numerics), times ``mscale``."""
    d = inv_freq.numel() * 2
    inv = inv_freq.to(device)
    if freq_factors is not None:
        inv = inv / freq_factors.to(device)
    if ggml_theta is not None and numerics.current().ggml:  # (base, freq_scale): ggml's angle recurrence
        theta = ggml.rope_theta(pos.to(device), d // 2, ggml_theta[0], ggml_theta[1], freq_factors)
    else:
        theta = pos.to(device, torch.float32).unsqueeze(-1) * inv  # (n, d/2)
    cos, sin = theta.cos().unsqueeze(1), theta.sin().unsqueeze(1)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, neox: bool, freq_factors: torch.Tensor | None = None,
         mscale: float = 1.0, ggml_theta: tuple[float, float] | None = None,
         angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate x (n, heads, d_rot...) at integer positions ``pos`` (n,). Normal (GPT-J/llama.cpp
    'norm') rotates adjacent pairs; NeoX rotates halves. ``angles``: :func:`rope_angles` of these
    arguments, already computed (a ubatch's layers share them)."""
    d = inv_freq.numel() * 2
    cos, sin = angles or rope_angles(pos, inv_freq, x.device, freq_factors, mscale, ggml_theta)
    lib = _native_f32(x, cos, sin) if x.dim() == 3 and cos.numel() == sin.numel() == x.shape[0] * d // 2 else None
    if lib is not None:  # the same operations in one pass (rope_f32), hence the same bits
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        y = torch.empty_like(x)
        lib.rope_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], x.shape[1], x.shape[2], d,
                     int(neox), y.data_ptr(), torch.get_num_threads())
        return y
    xr, xp = x[..., :d], x[..., d:]
    xf = xr.float()
    if neox:
        a, b = xf[..., : d // 2], xf[..., d // 2:]
        r = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = xf[..., 0::2], xf[..., 1::2]
        r = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    r = r.to(x.dtype)
    return r if xp.shape[-1] == 0 else torch.cat([r, xp], -1)


class Rotary:
    """One model's RoPE, built once: frequencies for its scaling kind (and llama3 ``freq_factors``),
    the magnitude scale, the pair layout (``neox``: halves; else adjacent pairs), and the parameters
    of ggml's angle recurrence that ggml numerics use (none and linear scaling). ``rotary(t, pos)``
    rotates queries and keys; :meth:`shift` re-rotates cached keys by a position delta (the K-shift:
    no magnitude scale, the stored keys carry it)."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, neox: bool = False,
                 freq_factors: torch.Tensor | None = None, device=None):
        inv, self.mscale = rope_freqs(dim, base, scaling)
        self.inv, self.neox, self.freq_factors = inv.to(device), neox, freq_factors
        kind = (scaling or {}).get("type") or "none"
        scale = {"none": 1.0, "linear": 1.0 / (scaling or {}).get("factor", 1.0)}.get(kind)
        self.ggml = None if scale is None else (base, scale)
        self._last = None  # (positions, (ggml numerics, device), angles) of the last call

    def __call__(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ggml_mode = self.ggml is not None and numerics.current().ggml
        last = self._last
        if last is None or last[0] is not pos or last[1] != (ggml_mode, t.device):
            # a ubatch's positions are one tensor that every layer's q and k rotate by: the angles
            # once per ubatch, not twice per layer (the same values)
            last = self._last = (pos, (ggml_mode, t.device),
                                 rope_angles(pos, self.inv, t.device, self.freq_factors, self.mscale, self.ggml))
        return rope(t, pos, self.inv, self.neox, self.freq_factors, self.mscale, self.ggml, angles=last[2])

    def shift(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rope(k, delta, self.inv, self.neox, self.freq_factors)
