"""Batch-invariant primitives: a row's result never depends on how many other rows share the call.

Every model computes through these. In invariant mode (the default):

- ``linear`` pads the row count up to a tile the BLAS treats uniformly. MKL's sgemm, for instance,
  takes a gemv-like path for 1-3 rows (and for some small counts with 2 threads) whose summation
  order differs from the large-M kernel; from the tile up, each row is computed the same way at any
  offset. The padding rule is chosen per machine by :func:`self_test` (well under 2 s).
- ``attention`` gathers each sequence's keys in position order and works on fixed key blocks of
  ``KV_BLOCK`` (aligned to the key's rank in its sequence), with a float32 softmax whose
  cross-block sums run in a fixed order, so a query's result depends only on its own visible keys.
- norms and softmaxes reduce along a row only.

``set_invariant(False)`` turns padding off for raw speed.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

KV_BLOCK = 64

_state = {"invariant": os.environ.get("GGUF_RUNTIME_INVARIANT", "1") != "0", "min_rows": 16, "multiple": 1,
          "f64": False, "threads": 0, "report": None}


def set_invariant(on: bool) -> None:
    _state["invariant"] = bool(on)


def is_invariant() -> bool:
    return _state["invariant"]


def padded_rows(n: int) -> int:
    """Rows ``linear`` computes for ``n`` input rows in invariant mode (the self-test's rule)."""
    if _state["threads"] != torch.get_num_threads():
        self_test()
    return _padded_rows(n, _state["min_rows"], _state["multiple"]) if _state["invariant"] else n


def _padded_rows(n: int, min_rows: int, multiple: int) -> int:
    n = max(n, min_rows)
    return -(-n // multiple) * multiple


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` for x of shape (..., K), w of shape (N, K)."""
    if not _state["invariant"]:
        return F.linear(x, w, b)
    if _state["threads"] != torch.get_num_threads():  # the rule is per thread count
        self_test()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    m = _padded_rows(n, _state["min_rows"], _state["multiple"])
    if m != n:
        x2 = torch.cat([x2, x2.new_zeros(m - n, x2.shape[1])])
    if _state["f64"]:
        y = F.linear(x2.double(), w.double(), None if b is None else b.double()).to(x.dtype)
    else:
        y = F.linear(x2, w, b)
    return y[:n].reshape(*lead, w.shape[0])


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 whatever ``x``'s dtype (as ggml does): half-precision
    elementwise kernels round differently in their vector body and scalar tail, which would make a
    row's result depend on how many rows share the call."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm in float32 (F.layer_norm reduces each row on its own, tested batch-invariant)."""
    return F.layer_norm(x.float(), x.shape[-1:], None if w is None else w.float(),
                        None if b is None else b.float(), eps).to(x.dtype)


def _lanewise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise function so that every element goes through the vectorised body.

    torch's CPU kernels compute transcendental functions with SIMD code (Sleef) in the body of a
    contiguous run and with the scalar libm function in its tail (and at each thread's range end);
    the two can differ in the last bit, so an element's result would depend on where it sits, i.e.
    on the batch shape. Padding the flat tensor to a multiple of 64 x threads puts every element in
    a vector lane, where the result depends on the value alone."""
    if not _state["invariant"]:
        return fn(x)
    flat = x.reshape(-1)
    q = 64 * max(1, torch.get_num_threads())
    pad = (-flat.numel()) % q
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return fn(flat)[: x.numel()].view(x.shape)


def silu(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.silu, x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.softplus, x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(F.gelu, x)


def exp(x: torch.Tensor) -> torch.Tensor:
    return _lanewise(torch.exp, x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float = 0.0) -> torch.Tensor:
    """Attention of query groups over their key sequences.

    q: ([B,] n_head, n_q, d); k, v: ([B,] n_head_kv, n_kv, d), each group's keys in its sequence's
    position order; mask: ([B,] n_q, n_kv) bool, True where the key is visible. Returns
    ([B,] n_q, n_head, d_v). ``B`` groups of equal shape are computed in one call (every matmul
    keeps its per-group shape, so batching groups changes no bits). Keys are processed in blocks of
    ``KV_BLOCK`` aligned to their rank, so a query's result does not depend on how many keys follow
    its visible ones, nor on how many queries share the call.
    """
    if q.dim() == 3:
        return attention(q[None], k[None], v[None], mask[None], scale, softcap)[0]
    B, h, nq, d = q.shape
    hkv, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    out_dtype = q.dtype
    if not _state["invariant"]:  # fastest path: fused SDPA, whose reduction order depends on shapes
        kk = k.repeat_interleave(g, 1) if g > 1 else k
        vv = v.repeat_interleave(g, 1) if g > 1 else v
        m4 = mask[:, None]
        if softcap:
            s = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
            s = (torch.tanh(s / softcap) * softcap).masked_fill(~m4, float("-inf"))
            o = torch.matmul(torch.softmax(s, -1).to(vv.dtype), vv)
        else:
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m4, scale=scale)
        return o.transpose(1, 2).to(out_dtype)
    nb = max(1, -(-nkv // KV_BLOCK))
    pad = nb * KV_BLOCK - nkv
    if pad:
        k = torch.cat([k, k.new_zeros(B, hkv, pad, d)], 2)
        v = torch.cat([v, v.new_zeros(B, hkv, pad, dv)], 2)
        mask = torch.cat([mask, mask.new_zeros(B, nq, pad)], 2)
    m = padded_rows(nq)
    if m != nq:
        q = torch.cat([q, q.new_zeros(B, h, m - nq, d)], 2)
        mask = torch.cat([mask, mask.new_zeros(B, m - nq, mask.shape[2])], 1)
    nqp = q.shape[2]
    kb = k.reshape(B, hkv, 1, nb, KV_BLOCK, d).expand(B, hkv, g, nb, KV_BLOCK, d).reshape(B, h, nb, KV_BLOCK, d)
    vb = v.reshape(B, hkv, 1, nb, KV_BLOCK, dv).expand(B, hkv, g, nb, KV_BLOCK, dv).reshape(B, h, nb, KV_BLOCK, dv)
    # scores per key block: (B, h, nb, nqp, KV_BLOCK), each a fixed-shape matmul
    s = torch.matmul(q.unsqueeze(2), kb.transpose(-1, -2)).float() * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    mb = mask.reshape(B, nqp, nb, KV_BLOCK).transpose(1, 2).unsqueeze(1)  # (B, 1, nb, nqp, KV_BLOCK)
    s = s.masked_fill(~mb, float("-inf"))
    mx = s.amax(dim=(2, 4), keepdim=True)  # exact, order-free
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = exp(s - mx)
    l_b = p.sum(-1)  # (B, h, nb, nqp): fixed-length row sums
    o_b = torch.matmul(p.to(vb.dtype), vb).float()  # (B, h, nb, nqp, dv)
    l_sum, o_sum = l_b[:, :, 0], o_b[:, :, 0]
    for b in range(1, nb):  # fixed order across blocks
        l_sum = l_sum + l_b[:, :, b]
        o_sum = o_sum + o_b[:, :, b]
    out = o_sum / l_sum.clamp_min(1e-30).unsqueeze(-1)
    return out[:, :, :nq].transpose(1, 2).to(out_dtype)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in float64 (as llama-perplexity accumulates it)."""
    return torch.log_softmax(x.double(), dim=-1)


def _rows_invariant(fn, x: torch.Tensor, counts, offsets) -> bool:
    ref = fn(x)
    return all(torch.equal(fn(x[o:o + n]), ref[o:o + n]) for n in counts for o in offsets)


def self_test() -> dict:
    """Find the row-padding rule under which this machine's matmul is row-invariant (< 2 s).

    For float32 and bfloat16 products of a few shapes, every row computed inside a small call
    (1..31 rows, at several offsets, padded by the candidate rule) must equal the same row computed
    inside one large call, with the current thread count. The cheapest passing rule wins; if none
    passes, matmuls run in float64 and round back (the safe path), and ``report['safe_path']`` says so.
    The norms are checked the same way.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1234)
    mats = [(torch.randn(160, k, generator=g), torch.randn(n, k, generator=g)) for k, n in [(256, 384), (64, 64), (576, 96)]]
    counts, offsets = (1, 2, 3, 5, 7, 9, 13, 17), (0, 3)
    chosen = None
    for min_rows, multiple in [(4, 4), (8, 8), (16, 1), (16, 16), (32, 32)]:
        def padded(x, w):
            n = x.shape[0]
            m = _padded_rows(n, min_rows, multiple)
            xp = torch.cat([x, x.new_zeros(m - n, x.shape[1])]) if m != n else x
            return F.linear(xp, w)[:n]
        if all(_rows_invariant(lambda x, w=w.to(dt): padded(x, w), x.to(dt), counts, offsets)
               for x, w in mats for dt in (torch.float32, torch.bfloat16)):
            chosen = (min_rows, multiple)
            break
    norm_ok = all(_rows_invariant(lambda x, w=w[0].to(dt): rms_norm(x, w, 1e-5), x.to(dt), counts, offsets)
                  for x, w in mats for dt in (torch.float32, torch.bfloat16))
    _state["min_rows"], _state["multiple"] = chosen or (16, 16)
    _state["f64"] = chosen is None
    _state["threads"] = torch.get_num_threads()
    rep = {"min_rows": _state["min_rows"], "multiple": _state["multiple"], "safe_path": chosen is None,
           "norms_invariant": norm_ok, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 3)}
    _state["report"] = rep
    return rep


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
        from .errors import UnsupportedError

        raise UnsupportedError(f"unsupported RoPE scaling type '{kind}' (supported: none, linear, yarn)")
    return inv.float(), mscale


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, neox: bool, freq_factors: torch.Tensor | None = None,
         mscale: float = 1.0) -> torch.Tensor:
    """Rotate x (n, heads, d_rot...) at integer positions ``pos`` (n,). Normal (GPT-J/llama.cpp
    'norm') rotates adjacent pairs; NeoX rotates halves. Angles in float32 as ggml computes them."""
    d = inv_freq.numel() * 2
    xr, xp = x[..., :d], x[..., d:]
    inv = inv_freq.to(x.device)
    if freq_factors is not None:
        inv = inv / freq_factors.to(x.device)
    theta = pos.to(x.device, torch.float32).unsqueeze(-1) * inv  # (n, d/2)
    cos, sin = theta.cos().unsqueeze(1), theta.sin().unsqueeze(1)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    xf = xr.float()
    if neox:
        a, b = xf[..., : d // 2], xf[..., d // 2:]
        r = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = xf[..., 0::2], xf[..., 1::2]
        r = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    r = r.to(x.dtype)
    return r if xp.shape[-1] == 0 else torch.cat([r, xp], -1)
