"""Q4_K, Q5_K and Q6_K quantization (gguf-py only dequantizes these), vectorised in torch.

Follows ggml's reference quantizers (``quantize_row_q{4,5,6}_K_ref`` with ``make_qkx2_quants`` /
``make_qx_quants`` in ggml-quants.c, the path llama-quantize takes without an importance matrix).
Everything runs in float32 with the same operation order as the C code, sums included: a sum over
the 16 or 32 values of a sub-block is accumulated left to right (``_seqsum``), so the bytes match
llama.cpp's. Work is vectorised over all sub-blocks at once; the only Python loops run over the
fixed in-block positions and the fixed search steps.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

QK_K = 256
GROUP_MAX_EPS = 1e-15


def _seqsum(p: torch.Tensor) -> torch.Tensor:
    """Sum of (n, N) over its first dim, left to right in float32 as a C ``for`` loop adds."""
    acc = p[0].clone()
    for row in p[1:]:
        acc += row
    return acc


def _round(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (round half to even), kept in float32."""
    return torch.round(x)


def _div(a, b) -> torch.Tensor:
    """IEEE float32 a / b. Torch turns a Python-number operand into a multiply by a reciprocal,
    which rounds differently from C's division, so numbers become full tensors first."""
    a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(a, b)
    return a / b


def _f32(v: float) -> float:
    """A constant computed as C computes it in float: numpy float32 arithmetic."""
    return float(np.float32(v))


def _sq_err(w, scale, mn, L, x):
    diff = scale * L + mn - x
    return _seqsum(w * (diff * diff))


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants (use_mad false) on every column of ``x`` (n, N) with weights ``w``:
    an affine fit x ~ scale * L - min, L in [0, nmax]. Returns (scale, min, L)."""
    mn = x.amin(0).clamp(max=0.0)
    mx = x.amax(0)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    flat = mx == mn
    one = torch.ones_like(mx)
    iscale = _div(float(nmax), torch.where(flat, one, mx - mn))
    scale = _div(1.0, iscale)
    L = _round(iscale * (x - mn)).clamp_(0, nmax)
    best = _sq_err(w, scale, mn, L, x)
    for step in range(nstep + 1):  # the C code moves `min` as it finds better fits: so do we
        c = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _div(c, torch.where(flat, one, mx - mn))
        la = _round(iscale * (x - mn)).clamp_(0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * la), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        D = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(pos, sum_l2, one), this_scale)
        this_min = torch.where(pos, 0.0, this_min)
        cur = _sq_err(w, this_scale, this_min, la, x)
        better = ok & (cur < best)
        L = torch.where(better, la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0.0, scale), -mn, torch.where(flat, 0.0, L)


def make_qx_quants(x: torch.Tensor, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 (weights x^2) on every column of ``x`` (n, N): a
    symmetric fit x ~ scale * (L - nmax) searched over +-0.9 steps. Returns (scale, L in [0, 2 nmax))."""
    ax = x.abs()
    mx = x.gather(0, ax.argmax(0, keepdim=True))[0]  # first largest |x|, with its sign
    zero = ax.amax(0) < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    w = x * x

    def fit(c: float):
        l = _round(_div(c, mx) * x).clamp_(-nmax, nmax - 1)
        wl = w * l
        return l, _seqsum(w * x * l), _seqsum(wl * l)

    L, sumlx, suml2 = fit(-float(nmax))
    nz = suml2 != 0
    scale = torch.where(nz, sumlx / torch.where(nz, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        l, sumlx, suml2 = fit(-_f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = sumlx / torch.where(better, suml2, 1.0)
        L = torch.where(better, l, L)
        scale = torch.where(better, s, scale)
        best = torch.where(better, s * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte 6-bit scale/min layout of Q4_K / Q5_K; ls, lm are (nb, 8) in [0, 63]."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], 1).to(torch.uint8)


def _qkx_super(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K / Q5_K path on (nb, 256): returns (d and dmin as fp16 bytes, packed scales,
    L (nb, 256) int32)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32).T.contiguous()  # (32, sub-blocks)
    av = torch.sqrt(_div(_seqsum(xs * xs), 32.0).double()).float()  # torch's float32 sqrt is not exact
    scales, mins, L = make_qkx2_quants(xs, av + xs.abs(), nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.T.reshape(nb, 8, 32)
    max_scale, max_min = scales.amax(1), mins.amax(1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # +0, never -0, as C's running max from 0
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_s = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_m = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = (_round(inv_s[:, None] * scales).int() & 0xFF).clamp(max=63)  # C stores into uint8 first
    lm = (_round(inv_m[:, None] * mins).int() & 0xFF).clamp(max=63)
    d16, dmin16 = _div(max_scale, 63.0).half(), _div(max_min, 63.0).half()
    d = d16.float()[:, None] * ls
    dm = dmin16.float()[:, None] * lm
    nz = (d != 0)[..., None]
    q = _round((x.reshape(nb, 8, 32) + dm[..., None]) / torch.where(nz, d[..., None], 1.0)).clamp(0, nmax)
    L = torch.where(nz, q, L).int().reshape(nb, QK_K)
    head = torch.stack([d16, dmin16], 1).view(torch.uint8)
    return head, _pack_scales_k4(ls, lm), L


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """qs of Q4_K / Q5_K: each 64-value chunk packs values l and l+32 into one byte."""
    L = L.reshape(L.shape[0], 4, 2, 32) & 0xF
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], 128).to(torch.uint8)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 144) block_q4_K bytes."""
    head, sc, L = _qkx_super(x, 15, -1.0, 20)
    return torch.cat([head, sc, _nibbles(L)], 1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 176) block_q5_K bytes."""
    head, sc, L = _qkx_super(x, 31, -0.5, 15)
    hb = (L >> 4).reshape(L.shape[0], 8, 32)  # bit 4 of value 32 j + l is bit j of qh[l]
    qh = (hb << torch.arange(8, dtype=L.dtype, device=L.device)[:, None]).sum(1)
    return torch.cat([head, sc, qh.to(torch.uint8), _nibbles(L)], 1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) float32 -> (nb, 210) block_q6_K bytes."""
    nb = x.shape[0]
    scales, L = make_qx_quants(x.reshape(nb * 16, 16).T.contiguous(), 32)
    scales, L = scales.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    max_scale = scales.gather(1, scales.abs().argmax(1, keepdim=True))[:, 0]
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(zero, 1.0, max_scale))
    d16 = torch.where(zero, 0.0, _div(1.0, iscale)).half()
    sc = torch.where(zero[:, None], 0, _round(iscale[:, None] * scales).int().clamp(max=127))
    d = d16.float()[:, None] * sc
    nz = (d != 0)[..., None]
    q = _round(x.reshape(nb, 16, 16) / torch.where(nz, d[..., None], 1.0)).clamp(-32, 31) + 32
    L = torch.where(nz, q, L).int().reshape(nb, 2, 4, 32)  # (half of 256, quarter of 128, l)
    L = torch.where(zero[:, None, None, None], 0, L)
    ql = (L[:, :, :2] & 0xF) | ((L[:, :, 2:] & 0xF) << 4)  # per half: ql[l] then ql[l + 32]
    qh = ((L >> 4) << torch.tensor([0, 2, 4, 6], dtype=L.dtype, device=L.device)[:, None]).sum(2)
    parts = [ql.reshape(nb, 128), qh.reshape(nb, 64), sc & 0xFF]
    return torch.cat([p.to(torch.uint8) for p in parts] + [d16[:, None].view(torch.uint8)], 1)


BLOCK_BYTES = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}
_KQUANT = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}


def quantize_k(data: np.ndarray | torch.Tensor, qtype: T, device=None, chunk: int = 1 << 18) -> np.ndarray:
    """Quantize float rows (last dim a multiple of 256) to ``qtype`` (Q4_K, Q5_K or Q6_K); returns
    the uint8 array of shape (*rows, row_bytes), as gguf-py's quantize returns for other types."""
    t = torch.from_numpy(np.array(data, dtype=np.float32)) if isinstance(data, np.ndarray) else data
    t = t.to(device=device, dtype=torch.float32)
    *lead, ncols = t.shape
    if ncols % QK_K:
        raise ValueError(f"rows of {ncols} values are not a multiple of {QK_K}")
    blocks = t.reshape(-1, QK_K)
    step = max(1, chunk // QK_K)
    out = torch.cat([_KQUANT[qtype](blocks[i:i + step]) for i in range(0, blocks.shape[0], step)]) \
        if blocks.shape[0] else torch.zeros(0, BLOCK_BYTES[qtype], dtype=torch.uint8)
    return out.cpu().numpy().reshape(*lead, ncols // QK_K * BLOCK_BYTES[qtype])
