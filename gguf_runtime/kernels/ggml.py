"""ggml numerics (``Numerics(ggml=True)``): round activations as llama.cpp's CPU backend does.

By default gguf-runtime multiplies float32 activations by the dequantized weights, which is what the
file's weights mean (our logits match transformers on the same file within ~2e-6). llama.cpp's CPU
backend computes differently: before a matmul with a quantized weight it quantizes each activation row
to the weight type's ``vec_dot_type`` and multiplies in integers, and it stores K and V in f16. Those
roundings move a log-probability by ~1e-3, which is enough to flip the odd HellaSwag task whose two
best endings are that close. With ``Numerics(ggml=True)`` (CLI: ``--ggml-numerics``) ``kernels.linear``
rounds each activation row exactly as ggml's quantizer does before multiplying, so the products see
the same inputs as ggml's integer dot products (their sums differ from ggml's only by float32
rounding); the CLI pairs it with an f16 KV cache.

The rounding of each row depends on that row alone, so batch invariance is kept.

ggml's rules (ggml-cpu's ``type_traits_cpu[...].vec_dot_type`` and its x86 quantizers):

- Q8_0 (Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4, NVFP4 weights): blocks of 32; ``d = amax / 127`` stored as
  f16, ``q = round_half_even(x * (127 / amax))``.
- Q8_1 (Q4_1, Q5_1): as Q8_0, plus the block sum ``s = f16(d * sum(q))`` that multiplies the weight
  block's min; we apply the min term with ``s`` as ggml rounds it.
- Q8_K (K-quants, IQ2/IQ3/IQ1/IQ4_XS, TQ): blocks of 256; ``max`` = the value of largest magnitude
  (first one on ties), ``iscale = -127 / max``, ``q = min(127, round_half_even(iscale * x))``,
  ``d = 1 / iscale`` in float32.
- F16 / BF16 weights: activations rounded to f16 / bf16. F32 weights: unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_Q8_0 = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4", "NVFP4", "Q1_0", "Q2_0"}
_Q8_1 = {"Q4_1", "Q5_1", "Q8_1"}
_Q8_K = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
         "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"}


@dataclass(eq=False)
class FileWeight:
    """Where a weight came from: its GGUF type and, for the Q4_1/Q5_1 min term, its file bytes."""
    qtype: str
    file: object = None  # the GGUFFile
    name: str = ""
    _mins: dict = field(default_factory=dict, repr=False)

    def block_mins(self, device) -> torch.Tensor:
        """The per-block mins (N, K/32) of a Q4_1/Q5_1 weight, read once from the file."""
        m = self._mins.get(device)
        if m is None:
            import numpy as np

            bs = {"Q4_1": 20, "Q5_1": 24}[self.qtype]
            info = self.file.info(self.name)
            raw = np.asarray(self.file.raw(self.name)).reshape(-1, bs)[:, 2:4].copy().view(np.float16)
            m = self._mins[device] = torch.from_numpy(raw.astype(np.float32)).view(info.shape[0], -1).to(device)
        return m


def vec_dot_type(ggml_type: str | None) -> str | None:
    """The activation format ggml's CPU backend multiplies a weight of ``ggml_type`` with."""
    if ggml_type in _Q8_0:
        return "Q8_0"
    if ggml_type in _Q8_1:
        return "Q8_1"
    if ggml_type in _Q8_K:
        return "Q8_K"
    if ggml_type in ("F16", "BF16"):
        return ggml_type
    return None


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-cpu's x86 ``quantize_row_q8_0``/``q8_1`` on rows of ``x`` (..., K), K % 32 == 0: the
    integer values ``q`` (..., K/32, 32), the f32 scale ``d`` before its f16 rounding and the f16
    scale, both (..., K/32, 1). ``q = round_half_even(x * (127 / amax))`` as its AVX2 code computes
    it; the reference C (``x * (1/d)``, ``roundf``) differs only on exact ties. On SmolLM2, whose
    activations hit such ties often, llama.cpp's results follow neither rule consistently (see
    docs/ggml-numerics.md); this one matched the most of its tie outcomes."""
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return q, d, d.half().float()


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``quantize_row_q8_K_ref`` on rows of ``x`` (..., K), K % 256 == 0: ``q`` (..., K/256, 256)
    and ``d`` (..., K/256, 1), float32."""
    xb = x.float().unflatten(-1, (-1, 256))
    i = xb.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude, as ggml's strict '>'
    mx = xb.gather(-1, i)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(xb * iscale).clamp(max=127)  # nearest_int (the 1.5 * 2^23 trick): half to even
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return q, d


def round_activations(x: torch.Tensor, ggml_type: str | None) -> torch.Tensor:
    """``x`` (..., K) rounded as ggml feeds it to a matmul with a ``ggml_type`` weight (float32)."""
    kind = vec_dot_type(ggml_type)
    K = x.shape[-1]
    if kind in ("Q8_0", "Q8_1") and K % 32 == 0:
        q, _, d16 = quantize_q8_0(x)
        return (q * d16).flatten(-2)
    if kind == "Q8_K" and K % 256 == 0:
        q, d = quantize_q8_k(x)
        return (q * d).flatten(-2)
    if kind == "F16":
        return x.half().to(x.dtype)
    if kind == "BF16":
        return x.bfloat16().to(x.dtype)
    return x


def q8_1_min_correction(q: torch.Tensor, d: torch.Tensor, d16: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The part of ggml's Q4_1/Q5_1 x Q8_1 product our float product cannot see: ggml multiplies
    each weight block's min ``m`` by ``s = f16(d * sum(q))``, not by ``f16(d) * sum(q)``. Takes
    :func:`quantize_q8_0`'s ``q, d, d16`` of the activations and returns
    ``sum_b (s_b - d16_b * sum(q_b)) * m[n, b]`` (..., N) for ``mins`` (N, K/32)."""
    sq = q.sum(-1, keepdim=True)
    delta = ((d * sq).half().float() - d16 * sq).squeeze(-1)  # (..., K/32)
    return delta @ mins.t()


def rope_theta(pos: torch.Tensor, n_pairs: int, base: float, freq_scale: float = 1.0,
               freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE angles (n, n_pairs) as ggml's CPU rope cache computes them: ``theta = p`` then
    ``theta *= powf(base, -2/n_dims)`` pair after pair in float32 (its rounding grows with the pair
    index and the position: ~1e-5 relative at position 500, against our directly computed
    ``p * base^(-2i/d)``), times ``freq_scale``, divided by the llama3 ``freq_factors``."""
    ts = torch.tensor(base, dtype=torch.float32) ** torch.tensor(-2.0 / (2 * n_pairs), dtype=torch.float32)
    theta = pos.to(torch.float32)
    cols = []
    for _ in range(n_pairs):
        cols.append(theta)
        theta = theta * ts
    out = torch.stack(cols, -1)
    if freq_factors is not None:
        out = out / freq_factors.to(out.device, torch.float32)
    return out * freq_scale if freq_scale != 1.0 else out
