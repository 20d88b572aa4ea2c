"""Dequantization of every ggml type gguf-py can dequantize: vectorised torch kernels, and fused C loops on CPU.

Each kernel maps a ``(n_blocks, type_size)`` uint8 tensor to ``(n_blocks, block_size)`` float32 with
bit operations and broadcasting only (no Python loop over blocks), on whatever device the bytes are
on: the same code runs on CPU and CUDA. The arithmetic follows gguf-py's reference
(``gguf.quants``) step for step - same float32 products in the same order - so results are
bit-identical to ``gguf.quants.dequantize``. Lookup tables (IQ grids, sign patterns, non-linear
4-bit values) are taken from gguf-py's own classes at import time, never retyped.

On CPU every block type runs instead through a fused C loop (``_dequant.c``: one pass per block,
built on first use and loaded with ctypes, see ``gguf_runtime.gguf.native``) with the same float32
operations in the same order, so the result is the same bits, several times faster. CUDA tensors,
``GGUF_RUNTIME_NATIVE=0``, or no working C compiler keep the torch kernels below.

Large tensors are processed in chunks of about a million values (whole blocks) so that the
intermediates stay in cache on CPU and bounded on CUDA; the loop is over chunks, never over blocks.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ..errors import GGUFFormatError, UnsupportedError
from . import native as _native

T = GGMLQuantizationType
Tensor = torch.Tensor

# Types stored as plain scalars: a dtype view, then a cast.
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16, T.F64: torch.float64,
    T.I8: torch.int8, T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64,
}

# Output elements per chunk: a few MiB of float32 keeps intermediates in cache on CPU.
_CHUNK_CPU = 1 << 20
_CHUNK_CUDA = 1 << 26


# ---------------------------------------------------------------------------------------------
# lookup tables, built once from gguf-py's classes, cached per device


def _sign_rows(patterns: np.ndarray) -> np.ndarray:
    """Bytes -> (len, 8) float32 of +-1: bit j set -> -1 in column j."""
    bits = np.unpackbits(patterns.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits == 0, np.float32(1), np.float32(-1))


def _grid(cls) -> np.ndarray:
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


def _signed_grid(cls) -> np.ndarray:
    """Grid rows times each of the 128 ksigns patterns: row g * 128 + s = grid[g] * signs[s]."""
    signs = _sign_rows(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8))
    return (_grid(cls)[:, None, :] * signs[None]).reshape(-1, 8)


def _pairs(values) -> np.ndarray:
    """(256, 2) float32: a byte's low-nibble and high-nibble entries of a 16-entry table."""
    v = np.asarray(values, dtype=np.float32)
    b = np.arange(256)
    return np.stack([v[b & 15], v[b >> 4]], axis=1)


def _e8m0_half() -> np.ndarray:
    """ggml_e8m0_to_fp32_half for every byte: 2^(x-128), denormal for x < 2."""
    x = np.arange(256, dtype=np.uint32)
    return np.where(x < 2, np.uint32(0x00200000) << x, (x - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)


def _ue4m3_half() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for every byte (unsigned E4M3, bias 7, times 0.5); 0 and 0x7F are 0."""
    x = np.arange(256)
    e, m = (x >> 3) & 0xF, (x & 7).astype(np.float64)
    v = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7)) * 0.5  # exact in float32
    return np.where((x == 0) | (x == 0x7F), 0.0, v).astype(np.float32)


def _iq1_rows() -> np.ndarray:
    """IQ1 grid rows plus delta: row i -> grid[i] + 0.125, row 2048 + i -> grid[i] - 0.125."""
    g = _grid(gq.IQ1_S)
    return np.concatenate([g + gq.IQ1_S.delta, g - gq.IQ1_S.delta])


_TABLES_NP: dict[str, np.ndarray] = {
    "ksigns": _sign_rows(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)),  # (128, 8)
    "signs": _sign_rows(np.arange(256)),  # (256, 8): explicit sign bytes as +-1
    "iq2xxs": _signed_grid(gq.IQ2_XXS),  # (256 * 128, 8)
    "iq2xs": _signed_grid(gq.IQ2_XS),  # (512 * 128, 8)
    "iq2s": _grid(gq.IQ2_S),  # (1024, 8)
    "iq3xxs": _grid(gq.IQ3_XXS),  # (256, 4)
    "iq3s": _grid(gq.IQ3_S),  # (512, 4)
    "iq1": _iq1_rows(),  # (4096, 8)
    "iq4nl": _pairs(gq.IQ4_NL.kvalues),
    "fp4": _pairs(gq.MXFP4.kvalues),
    "bits": np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),  # (256, 8)
    "e8m0": _e8m0_half()[:, None],
    "ue4m3": _ue4m3_half()[:, None],
}


@lru_cache(maxsize=None)
def _table(name: str, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(_TABLES_NP[name])).to(device)


def _lut(name: str, idx: Tensor) -> Tensor:
    """Rows of table ``name`` at integer indices ``idx``: idx.shape + (row length,)."""
    tab = _table(name, idx.device)
    return torch.index_select(tab, 0, idx.reshape(-1).to(torch.int32)).view(*idx.shape, tab.shape[1])


# ---------------------------------------------------------------------------------------------
# byte-level helpers (b: (n, type_size) uint8 blocks, contiguous, even offsets for 16-bit views)


def _f16(b: Tensor, off: int, count: int = 1) -> Tensor:
    """``count`` little-endian fp16 values at byte ``off`` of each block -> (n, count) float32."""
    return b.view(torch.float16)[:, off // 2:off // 2 + count].float()


def _u16(b: Tensor, off: int, count: int) -> Tensor:
    """``count`` little-endian uint16 at byte ``off`` -> (n, count) int32."""
    return b.view(torch.int16)[:, off // 2:off // 2 + count].to(torch.int32) & 0xFFFF


def _unpack(x: Tensor, bits: int, group: int) -> Tensor:
    """Bit fields of uint8 ``x`` (n, m) in the layout every ggml type uses: each run of ``group``
    bytes gives its lowest fields, then the next ones, ... -> (n, m // group, 8 // bits, group).

    Runs of 32+ bytes are unpacked field-major (one long contiguous pass per field position) and
    returned as a permuted view in block order, left for the float conversion to put in place;
    shorter runs are written in block order directly (cheaper when rows are that short)."""
    n, m = x.shape
    k = 8 // bits
    if group >= 32:
        x = x.contiguous()
        out = torch.empty(k, n, m, dtype=torch.uint8, device=x.device)
        fields = [out[j] for j in range(k)]
    else:
        out = torch.empty(n, m // group, k, group, dtype=torch.uint8, device=x.device)
        x = x.reshape(n, m // group, group)
        fields = [out[:, :, j] for j in range(k)]
    fields[0].copy_(x)
    for j in range(1, k):  # over the fields of a byte, not over blocks
        torch.bitwise_right_shift(x, j * bits, out=fields[j])
    if bits < 8:
        out.bitwise_and_((1 << bits) - 1)
    return out.view(k, n, m // group, group).permute(1, 2, 0, 3) if group >= 32 else out


def _flat(q: Tensor) -> Tensor:
    """(n, ...) -> (n, -1), copying a permuted view into block order."""
    return q.reshape(q.shape[0], -1)


def _f32(q: Tensor) -> Tensor:
    """Integer codes (any strides) -> contiguous float32 (n, -1) in block order."""
    return torch.empty(q.shape, dtype=torch.float32, device=q.device).copy_(q).view(q.shape[0], -1)


def _as_int8(q: Tensor, offset: int) -> Tensor:
    """uint8 codes minus ``offset``, wrapping, read as int8 (ggml's signed codes)."""
    return q.sub_(offset).view(torch.int8)


def _scaled(q: Tensor, d: Tensor, out: Tensor, groups: int) -> Tensor:
    """out = d * q, with q (n, bs) and one scale per group of (n, groups) values."""
    n = q.shape[0]
    return torch.mul(q.view(n, groups, -1), d.view(n, groups, 1), out=out.view(n, groups, -1))


# ---------------------------------------------------------------------------------------------
# kernels: kernel(b, out) fills out (n, block_size) float32 from b (n, type_size) uint8, with
# gguf-py's float32 operations in gguf-py's order


def _q4_0(b: Tensor, out: Tensor) -> None:
    torch.mul(_f32(_as_int8(_unpack(b[:, 2:], 4, 16), 8)), _f16(b, 0), out=out)


def _q4_1(b: Tensor, out: Tensor) -> None:
    torch.mul(_f32(_unpack(b[:, 4:], 4, 16)), _f16(b, 0), out=out).add_(_f16(b, 2))


def _q5(b: Tensor, off: int) -> Tensor:
    high = _lut("bits", b[:, off:off + 4]).view(-1, 1, 2, 16)  # bit j of the uint32: value j
    return _unpack(b[:, off + 4:], 4, 16).bitwise_or_(high.bitwise_left_shift_(4))


def _q5_0(b: Tensor, out: Tensor) -> None:
    torch.mul(_f32(_as_int8(_q5(b, 2), 16)), _f16(b, 0), out=out)


def _q5_1(b: Tensor, out: Tensor) -> None:
    torch.mul(_f32(_q5(b, 4)), _f16(b, 0), out=out).add_(_f16(b, 2))


def _q8_0(b: Tensor, out: Tensor) -> None:
    torch.mul(b[:, 2:].view(torch.int8).float(), _f16(b, 0), out=out)


def _q2_k(b: Tensor, out: Tensor) -> None:
    n, sc = b.shape[0], b[:, :16]
    dl = _f16(b, 80) * (sc & 0xF).float()
    ml = _f16(b, 82) * (sc >> 4).float()
    _scaled(_f32(_unpack(b[:, 16:80], 2, 32)), dl, out, 16).sub_(ml.view(n, 16, 1))


def _q3_k(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    lo, hi = _flat(_unpack(b[:, 96:104], 4, 8)), _flat(_unpack(b[:, 104:108], 2, 4))
    dl = _f16(b, 108) * _as_int8(lo.bitwise_or_(hi.bitwise_left_shift_(4)), 32).float()
    hmask = _unpack(b[:, :32], 1, 32).view(n, 2, 4, 32).bitwise_xor_(1).bitwise_left_shift_(2)  # 4 where 0
    q = _unpack(b[:, 32:96], 2, 32).sub_(hmask).view(torch.int8)
    _scaled(_f32(q), dl, out, 16)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins, as float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q45_k(b: Tensor, q: Tensor, out: Tensor) -> None:
    sc, mn = _k_scale_min(b[:, 4:16])
    dm = _f16(b, 2) * mn
    _scaled(_f32(q), _f16(b, 0) * sc, out, 8).sub_(dm.view(-1, 8, 1))


def _q4_k(b: Tensor, out: Tensor) -> None:
    _q45_k(b, _unpack(b[:, 16:], 4, 32), out)


def _q5_k(b: Tensor, out: Tensor) -> None:
    high = _unpack(b[:, 16:48], 1, 32).view(-1, 4, 2, 32)
    _q45_k(b, _unpack(b[:, 48:], 4, 32).bitwise_or_(high.bitwise_left_shift_(4)), out)


def _q6_k(b: Tensor, out: Tensor) -> None:
    d = _f16(b, 208) * b[:, 192:208].view(torch.int8).float()
    high = _flat(_unpack(b[:, 128:192], 2, 32)).view(-1, 2, 2, 64)
    q = _unpack(b[:, :128], 4, 64).bitwise_or_(high.bitwise_left_shift_(4))
    _scaled(_f32(_as_int8(q, 32)), d, out, 16)


def _tq1_0(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    q = torch.empty(n, 256, dtype=torch.uint8, device=b.device)
    parts = ((b[:, :32], q[:, :160], 5), (b[:, 32:48], q[:, 160:240], 5), (b[:, 48:52], q[:, 240:], 4))
    for src, dst, k in parts:  # digit j of each base-3 byte: the byte times 3^j, wrapping in uint8
        for j in range(k):
            torch.mul(src, 3 ** j, out=dst.view(n, k, -1)[:, j])
    q = ((q.to(torch.int16) * 3) >> 8).to(torch.int8) - 1
    torch.mul(q.float(), _f16(b, 52), out=out)


def _tq2_0(b: Tensor, out: Tensor) -> None:
    torch.mul(_f32(_as_int8(_unpack(b[:, :64], 2, 32), 1)), _f16(b, 64), out=out)


def _nibble_lut(name: str, qs: Tensor, d: Tensor, out: Tensor, groups: int) -> None:
    """out = d * table[nibble] for qs (n, groups * g) bytes whose low nibbles come first in
    each group of 2 * g values; d holds one scale per group."""
    n = qs.shape[0]
    v = _lut(name, qs).view(n, groups, -1, 2).transpose(2, 3)  # (n, groups, 2, g)
    torch.mul(v, d.view(n, groups, 1, 1), out=out.view(n, groups, 2, -1))


def _mxfp4(b: Tensor, out: Tensor) -> None:
    _nibble_lut("fp4", b[:, 1:], _lut("e8m0", b[:, 0]), out, 1)


def _nvfp4(b: Tensor, out: Tensor) -> None:
    _nibble_lut("fp4", b[:, 4:], _lut("ue4m3", b[:, :4]), out, 4)


def _iq4_nl(b: Tensor, out: Tensor) -> None:
    _nibble_lut("iq4nl", b[:, 2:], _f16(b, 0), out, 1)


def _iq4_xs(b: Tensor, out: Tensor) -> None:
    lo = _flat(_unpack(b[:, 4:8], 4, 1))
    hi = (_u16(b, 2, 1) >> torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)) & 3
    sc = _as_int8(lo.bitwise_or_(hi.to(torch.uint8).bitwise_left_shift_(4)), 32).float()
    _nibble_lut("iq4nl", b[:, 8:], _f16(b, 0) * sc, out, 8)


def _scale4(b: Tensor, off: int, n_bytes: int) -> Tensor:
    """Two 4-bit scales per byte (low nibble first) -> float32."""
    return _f32(_unpack(b[:, off:off + n_bytes], 4, 1))


def _aux32(b: Tensor, off: int, count: int) -> Tensor:
    """``count`` little-endian uint32 at byte ``off`` (2-byte aligned) as int32 bit patterns."""
    h = _u16(b, off, 2 * count).view(-1, count, 2)
    return h[..., 0] | (h[..., 1] << 16)


def _ksign_idx(aux: Tensor) -> Tensor:
    """Four 7-bit ksigns indices in the low 28 bits -> (..., 4)."""
    return torch.stack([(aux >> s) & 0x7F for s in (0, 7, 14, 21)], dim=-1)


def _iq2_xxs(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    aux = _aux32(b, 2, 16).view(n, 8, 2)
    grid_idx = b[:, 2:66].view(n, 8, 8)[:, :, :4].to(torch.int32)  # 4 grid bytes, then aux[1]
    db = _f16(b, 0) * (0.5 + ((aux[..., 1] >> 28) & 0xF).float()) * 0.25
    g = _lut("iq2xxs", grid_idx * 128 + _ksign_idx(aux[..., 1]))  # (n, 8, 4, 8), signs folded in
    _scaled(g.view(n, 256), db, out, 8)


def _iq2_xs(b: Tensor, out: Tensor) -> None:
    n, qs = b.shape[0], _u16(b, 2, 32)
    db = _f16(b, 0) * (0.5 + _scale4(b, 66, 8)) * 0.25
    g = _lut("iq2xs", (qs & 511) * 128 + (qs >> 9))
    _scaled(g.view(n, 256), db, out, 16)


def _iq2_s(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    db = _f16(b, 0) * (0.5 + _scale4(b, 74, 8)) * 0.25
    idx = b[:, 2:34].to(torch.int32) | (_flat(_unpack(b[:, 66:74], 2, 1)).to(torch.int32) << 8)
    _scaled(_lut("iq2s", idx).view(n, 256), db, out, 16).view(n, 32, 8).mul_(_lut("signs", b[:, 34:66]))


def _iq3_xxs(b: Tensor, out: Tensor) -> None:
    n, aux = b.shape[0], _aux32(b, 66, 8)
    db = _f16(b, 0) * (0.5 + ((aux >> 28) & 0xF).float()) * 0.5
    g = _lut("iq3xxs", b[:, 2:66])  # (n, 64, 4)
    _scaled(g.view(n, 256), db, out, 8).view(n, 32, 8).mul_(_lut("ksigns", _ksign_idx(aux)).view(n, 32, 8))


def _iq3_s(b: Tensor, out: Tensor) -> None:
    n = b.shape[0]
    db = _f16(b, 0) * (1 + 2 * _flat(_unpack(b[:, 106:110], 4, 1))).float()
    idx = b[:, 2:66].to(torch.int32) | (_lut("bits", b[:, 66:74]).view(n, 64).to(torch.int32) << 8)
    _scaled(_lut("iq3s", idx).view(n, 256), db, out, 8).view(n, 32, 8).mul_(_lut("signs", b[:, 74:106]))


def _iq1_s(b: Tensor, out: Tensor) -> None:
    n, qh = b.shape[0], _u16(b, 34, 8)
    dl = _f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()
    hi = torch.stack([(qh >> s) & 7 for s in (0, 3, 6, 9)], dim=-1).view(n, 32)
    idx = b[:, 2:34].to(torch.int32) | (hi << 8) | ((qh >> 15) << 11).repeat_interleave(4, dim=1)
    _scaled(_lut("iq1", idx).view(n, 256), dl, out, 8)


def _iq1_m(b: Tensor, out: Tensor) -> None:
    n, sc = b.shape[0], _u16(b, 48, 4)  # the fp16 super-scale is spread over their top nibbles
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = bits.to(torch.int16).view(torch.float16).float().view(n, 1)
    s = torch.stack([(sc >> k) & 7 for k in (0, 3, 6, 9)], dim=-1).view(n, 16)
    dl = d * (2 * s + 1).float()
    qh = _flat(_unpack(b[:, 32:48], 4, 1)).to(torch.int32)  # (n, 32): 3 index bits and a delta sign each
    idx = b[:, :32].to(torch.int32) | ((qh & 7) << 8) | ((qh & 8) << 8)
    _scaled(_lut("iq1", idx).view(n, 256), dl, out, 16)


_KERNELS: dict[GGMLQuantizationType, Callable[[Tensor, Tensor], None]] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ1_S: _iq1_s, T.IQ1_M: _iq1_m, T.IQ2_XXS: _iq2_xxs, T.IQ2_XS: _iq2_xs, T.IQ2_S: _iq2_s,
    T.IQ3_XXS: _iq3_xxs, T.IQ3_S: _iq3_s, T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs,
    T.TQ1_0: _tq1_0, T.TQ2_0: _tq2_0, T.MXFP4: _mxfp4, T.NVFP4: _nvfp4,
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_PLAIN) | frozenset(_KERNELS)


# ---------------------------------------------------------------------------------------------
# public entry point


def _as_uint8(raw, device: torch.device) -> Tensor:
    """The bytes of ``raw`` as a flat uint8 tensor on ``device`` (no copy on CPU when possible)."""
    if isinstance(raw, Tensor):
        t = raw.detach().reshape(-1)
        t = t.view(torch.uint8) if t.dtype != torch.uint8 and t.element_size() == 1 else t
        if t.dtype != torch.uint8:
            t = t.contiguous().view(torch.uint8)
    else:
        arr = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
        if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        arr = arr.reshape(-1)
        if arr.flags.writeable:
            t = torch.from_numpy(arr)
        else:
            with warnings.catch_warnings():  # read-only memory maps: we never write through this view
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
    if t.device.type == "cpu" and t.data_ptr() % 16:  # dtype views need aligned storage
        t = t.clone()
    return t.to(device)


def dequantize(raw, qtype: GGMLQuantizationType, shape, device=None, dtype=torch.float32,
               out: Tensor | None = None) -> Tensor:
    """Dequantize ``raw`` (the tensor's bytes, uint8 tensor or array) of ggml type ``qtype`` into a
    tensor of ``shape`` (torch order, outermost first) on ``device`` with ``dtype``.

    ``out``: optional contiguous floating tensor of that shape to write into (its device and dtype
    then take the place of ``device`` and ``dtype``); it is returned."""
    try:
        qtype = GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedError(f"unknown ggml type id {int(qtype)}") from None
    if qtype not in SUPPORTED:
        raise UnsupportedError(f"dequantization of {qtype.name} is not supported")
    shape = tuple(int(s) for s in shape)
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_el = math.prod(shape)
    if any(s < 0 for s in shape) or (shape[-1] if shape else 1) % bs:
        raise GGUFFormatError(f"shape {shape} is not valid for {qtype.name} (rows must be a multiple of {bs})")
    if math.prod(max(s, 1) for s in shape) >= 1 << 63:  # strides of even a zero-element tensor must fit int64
        raise GGUFFormatError(f"shape {shape} is too large (its strides overflow int64)")
    if out is not None:
        if tuple(out.shape) != shape or not out.is_contiguous() or not out.is_floating_point():
            raise ValueError(f"out must be a contiguous floating tensor of shape {shape}")
        device, dtype = out.device, out.dtype
    elif device is None:
        device = raw.device if isinstance(raw, Tensor) else "cpu"
    dev = torch.device(device)
    b = _as_uint8(raw, dev)
    if b.numel() != n_el // bs * ts:
        raise GGUFFormatError(f"{qtype.name} tensor of shape {shape} needs {n_el // bs * ts} bytes, got {b.numel()}")
    if qtype in _PLAIN:
        if out is not None:
            return out.copy_(b.view(_PLAIN[qtype]).view(shape))
        # a fresh tensor, never a view of the caller's (possibly read-only, memory-mapped) bytes
        return b.view(_PLAIN[qtype]).to(dtype, copy=b.device.type == "cpu").reshape(shape)
    blocks = b.view(-1, ts)
    nb = blocks.shape[0]
    res = (torch.empty(shape, dtype=dtype, device=dev) if out is None else out).view(nb, bs)
    step = max(1, (_CHUNK_CPU if dev.type == "cpu" else _CHUNK_CUDA) // bs)
    kernel = _native.kernel(qtype) if dev.type == "cpu" else None
    if kernel is None:
        kernel = _KERNELS[qtype]
    elif dtype == torch.float32:
        step = max(1, nb)  # one fused pass straight into the result: no intermediates to bound
    tmp = None if dtype == torch.float32 else torch.empty(min(step, nb), bs, device=dev)
    for i in range(0, nb, step):  # chunks of many blocks
        chunk = blocks[i:i + step]
        if tmp is None:
            kernel(chunk, res[i:i + step])
        else:
            kernel(chunk, tmp[:chunk.shape[0]])
            res[i:i + step] = tmp[:chunk.shape[0]]
    return res.view(shape) if out is None else out
