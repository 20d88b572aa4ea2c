"""Dequantization of every ggml type gguf-py can dequantize, in vectorised torch.

Each kernel maps a ``(n_blocks, type_size)`` uint8 tensor to ``(n_blocks, block_size)`` float32 with
bit operations and broadcasting only (no Python loop over blocks), on whatever device the bytes are
on: the same code runs on CPU and CUDA. The arithmetic follows gguf-py's reference
(``gguf.quants``) step for step - same float32 products in the same order - so results are
bit-identical to ``gguf.quants.dequantize``. Lookup tables (IQ grids, sign patterns, non-linear
4-bit values) are taken from gguf-py's own classes at import time, never retyped.

Large tensors are processed in chunks of whole blocks so that the intermediates stay in cache on
CPU (and bounded in memory on CUDA); the loop is over chunks of thousands of blocks.
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

from .errors import GGUFFormatError, UnsupportedError

T = GGMLQuantizationType
Tensor = torch.Tensor

# Types stored as plain scalars: a dtype view, then a cast.
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16, T.F64: torch.float64,
    T.I8: torch.int8, T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64,
}

# Output elements per chunk: a few MiB of float32 keeps intermediates in cache on CPU.
_CHUNK_CPU = 1 << 18
_CHUNK_CUDA = 1 << 26


# ---------------------------------------------------------------------------------------------
# lookup tables, built once from gguf-py's classes, cached per device


def _sign_table(ksigns: bytes) -> np.ndarray:
    """(128, 8) float32 of +-1: bit j of ksigns[i] set -> -1."""
    bits = np.unpackbits(np.frombuffer(ksigns, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits == 0, np.float32(1), np.float32(-1)).astype(np.float32)


def _grid(cls) -> np.ndarray:
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


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


_TABLES_NP: dict[str, np.ndarray] = {
    "ksigns": _sign_table(gq.IQ2_XXS.ksigns),
    "iq2xxs": _grid(gq.IQ2_XXS),
    "iq2xs": _grid(gq.IQ2_XS),
    "iq2s": _grid(gq.IQ2_S),
    "iq3xxs": _grid(gq.IQ3_XXS),
    "iq3s": _grid(gq.IQ3_S),
    "iq1s": _grid(gq.IQ1_S),
    "iq4nl": np.array(gq.IQ4_NL.kvalues, dtype=np.float32),
    "fp4": np.array(gq.MXFP4.kvalues, dtype=np.float32),
    "e8m0": _e8m0_half(),
    "ue4m3": _ue4m3_half(),
}


@lru_cache(maxsize=None)
def _table(name: str, device: torch.device) -> Tensor:
    return torch.from_numpy(_TABLES_NP[name]).to(device)


@lru_cache(maxsize=None)
def _arange(start: int, stop: int, step: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(start, stop, step, dtype=dtype, device=device)


def _lut(name: str, idx: Tensor) -> Tensor:
    """Rows of table ``name`` at integer indices ``idx`` -> idx.shape + row shape."""
    tab = _table(name, idx.device)
    return tab[idx.to(torch.int64)]


# ---------------------------------------------------------------------------------------------
# byte-level helpers (b: (n, type_size) uint8 blocks)


def _f16(b: Tensor, off: int, count: int = 1) -> Tensor:
    """``count`` little-endian fp16 values at byte ``off`` of each block -> (n, count) float32."""
    return b[:, off:off + 2 * count].contiguous().view(torch.float16).float()


def _u16(b: Tensor, off: int, count: int) -> Tensor:
    """``count`` little-endian uint16 at byte ``off`` -> (n, count) int32."""
    return b[:, off:off + 2 * count].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def _u32(b: Tensor, off: int, count: int) -> Tensor:
    """``count`` little-endian uint32 at byte ``off`` -> (n, count) int64."""
    x = b[:, off:off + 4 * count].reshape(b.shape[0], count, 4).to(torch.int64)
    return x[..., 0] | (x[..., 1] << 8) | (x[..., 2] << 16) | (x[..., 3] << 24)


def _split(x: Tensor, bits: int, width: int, group: int) -> Tensor:
    """Unpack ``bits``-bit fields: x (n, m) viewed as (n, m/group, 1, group), shifted by
    0, bits, 2*bits, ... -> (n, m/group, width/bits, group), masked."""
    n = x.shape[0]
    sh = _arange(0, width, bits, x.dtype, x.device).view(1, 1, -1, 1)
    return (x.reshape(n, -1, 1, group) >> sh) & ((1 << bits) - 1)


def _nibbles(x: Tensor, group: int) -> Tensor:
    """Low nibbles of each ``group`` bytes, then their high nibbles -> (n, m*2)."""
    return _split(x, 4, 8, group).reshape(x.shape[0], -1)


def _bits(x: Tensor) -> Tensor:
    """Bit j of byte i -> element 8*i + j: (n, m) -> (n, 8*m) uint8."""
    sh = _arange(0, 8, 1, x.dtype, x.device)
    return ((x.unsqueeze(-1) >> sh) & 1).reshape(x.shape[0], -1)


def _signs(bits: Tensor) -> Tensor:
    """0/1 sign bits -> +1/-1 float32."""
    return 1.0 - 2.0 * bits.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# kernels: (n, type_size) uint8 -> (n, block_size) float32, in gguf-py's order of operations


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 16).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _q5(b: Tensor, off: int) -> Tensor:
    return _nibbles(b[:, off + 4:], 16) | (_bits(b[:, off:off + 4]) << 4)


def _q5_0(b: Tensor) -> Tensor:
    return _f16(b, 0) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    return _f16(b, 0) * _q5(b, 4).float() + _f16(b, 2)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0xF).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = _split(b[:, 16:80], 2, 8, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    lo = _split(b[:, 96:104], 4, 8, 8).reshape(n, 16)
    hi = _split(b[:, 104:108], 2, 8, 4).reshape(n, 16)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * sc).view(n, 16, 1)
    ql = _split(b[:, 32:96], 2, 8, 32).reshape(n, 16, 16)
    qh = _split(b[:, :32], 1, 8, 32).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).view(n, 256)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins, as float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q45_k(b: Tensor, q: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    return (d * q.view(n, 8, 32).float() - dm).view(n, 256)


def _q4_k(b: Tensor) -> Tensor:
    return _q45_k(b, _nibbles(b[:, 16:], 32))


def _q5_k(b: Tensor) -> Tensor:
    qh = _split(b[:, 16:48], 1, 8, 32).reshape(b.shape[0], 256)
    return _q45_k(b, _nibbles(b[:, 48:], 32) | (qh << 4))


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _nibbles(b[:, :128], 64)
    qh = _split(b[:, 128:192], 2, 8, 32).reshape(n, 256)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).float()
    return (d * q.view(n, 16, 16)).view(n, 256)


def _tq1_0(b: Tensor) -> Tensor:
    n = b.shape[0]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=b.device).view(1, 1, 5, 1)
    q0 = (b[:, :32].reshape(n, 1, 1, 32) * pow3).reshape(n, -1)  # uint8 products wrap, as in ggml
    q1 = (b[:, 32:48].reshape(n, 1, 1, 16) * pow3).reshape(n, -1)
    qh = (b[:, 48:52].reshape(n, 1, 1, 4) * pow3[:, :, :4]).reshape(n, -1)
    q = torch.cat([q0, q1, qh], dim=1)
    q = ((q.to(torch.int16) * 3) >> 8).to(torch.int8) - 1
    return _f16(b, 52) * q.float()


def _tq2_0(b: Tensor) -> Tensor:
    q = _split(b[:, :64], 2, 8, 32).reshape(b.shape[0], 256).to(torch.int8) - 1
    return _f16(b, 64) * q.float()


def _mxfp4(b: Tensor) -> Tensor:
    d = _lut("e8m0", b[:, :1])
    return d * _lut("fp4", _nibbles(b[:, 1:], 16))


def _nvfp4(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = _lut("ue4m3", b[:, :4]).view(n, 4, 1)
    qs = b[:, 4:].reshape(n, 4, 8)
    q = _lut("fp4", torch.cat([qs & 0xF, qs >> 4], dim=-1))
    return (d * q).view(n, 64)


def _iq4_nl(b: Tensor) -> Tensor:
    return _f16(b, 0) * _lut("iq4nl", _nibbles(b[:, 2:], 16))


def _iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    lo = _split(b[:, 4:8], 4, 8, 1).reshape(n, 8)
    hi = (_u16(b, 2, 1) >> _arange(0, 16, 2, torch.int32, b.device)) & 3
    sc = ((lo | (hi.to(torch.uint8) << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 0) * sc).view(n, 8, 1)
    q = _lut("iq4nl", _nibbles(b[:, 8:], 16)).view(n, 8, 32)
    return (dl * q).view(n, 256)


def _iq_scale4(b: Tensor, off: int, d: Tensor, mul: float) -> Tensor:
    """4-bit scales at ``off`` (two per byte): d * (0.5 + s) * mul -> (n, 16)."""
    s = _split(b[:, off:off + 8], 4, 8, 1).reshape(b.shape[0], 16).float()
    return d * (0.5 + s) * mul


def _iq_xxs(b: Tensor, grid: str, qs_len: int, mul: float) -> Tensor:
    """IQ2_XXS / IQ3_XXS: 8 groups of 32, each with a uint32 of 4 seven-bit sign indices and a
    four-bit scale; grid indices are one byte each."""
    n = b.shape[0]
    aux = _u32(b, 2 + qs_len, 8) if grid == "iq3xxs" else _u32(b, 2, 16).view(n, 8, 2)[..., 1]
    idx = b[:, 2:2 + qs_len] if grid == "iq3xxs" else b[:, 2:66].reshape(n, 8, 8)[:, :, :4]
    db = (_f16(b, 0) * (0.5 + (aux >> 28).float()) * mul).view(n, 8, 1, 1)
    sidx = (aux.unsqueeze(-1) >> _arange(0, 28, 7, torch.int64, b.device)) & 0x7F
    signs = _lut("ksigns", sidx)  # (n, 8, 4, 8)
    g = _lut(grid, idx).reshape(n, 8, 4, 8)
    return (db * g * signs).view(n, 256)


def _iq2_xxs(b: Tensor) -> Tensor:
    return _iq_xxs(b, "iq2xxs", 64, 0.25)


def _iq3_xxs(b: Tensor) -> Tensor:
    return _iq_xxs(b, "iq3xxs", 64, 0.5)


def _iq2_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    qs = _u16(b, 2, 32)
    db = _iq_scale4(b, 66, _f16(b, 0), 0.25).view(n, 16, 1, 1)
    signs = _lut("ksigns", qs >> 9).view(n, 16, 2, 8)
    g = _lut("iq2xs", qs & 511).view(n, 16, 2, 8)
    return (db * g * signs).view(n, 256)


def _iq2_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    db = _iq_scale4(b, 74, _f16(b, 0), 0.25).view(n, 16, 1, 1)
    signs = _signs(_bits(b[:, 34:66])).view(n, 16, 2, 8)
    qh = _split(b[:, 66:74], 2, 8, 1).reshape(n, 32)
    idx = b[:, 2:34].to(torch.int32) | (qh.to(torch.int32) << 8)
    g = _lut("iq2s", idx).view(n, 16, 2, 8)
    return (db * g * signs).view(n, 256)


def _iq3_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = _split(b[:, 106:110], 4, 8, 1).reshape(n, 8)
    db = (_f16(b, 0) * (1 + 2 * sc).float()).view(n, 8, 1, 1)
    signs = _signs(_bits(b[:, 74:106])).view(n, 8, 4, 8)
    idx = b[:, 2:66].to(torch.int32) | (_bits(b[:, 66:74]).to(torch.int32) << 8)
    g = _lut("iq3s", idx).view(n, 8, 4, 8)
    return (db * g * signs).view(n, 256)


def _delta(bit_set: Tensor) -> Tensor:
    return torch.where(bit_set, -0.125, 0.125).to(torch.float32)


def _iq1_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    qh = _u16(b, 34, 8)  # (n, 8)
    dl = (_f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
    delta = _delta((qh & 0x8000) != 0).view(n, 8, 1, 1)
    hi = (qh.unsqueeze(-1) >> _arange(0, 12, 3, torch.int32, b.device)) & 7
    idx = b[:, 2:34].to(torch.int32) | (hi.reshape(n, 32) << 8)
    g = _lut("iq1s", idx).view(n, 8, 4, 8)
    return (dl * (g + delta)).view(n, 256)


def _iq1_m(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc = _u16(b, 48, 4)  # (n, 4); the fp16 super-scale is spread over their top nibbles
    top = (sc & 0xF000) >> _arange(12, -1, -4, torch.int32, b.device)
    bits = top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]
    d = bits.to(torch.int16).view(torch.float16).float().view(n, 1)
    s = (sc.unsqueeze(-1) >> _arange(0, 12, 3, torch.int32, b.device)) & 7
    dl = (d * (2 * s.reshape(n, 16) + 1).float()).view(n, 8, 2, 1, 1)
    qh = _split(b[:, 32:48], 4, 8, 1).reshape(n, 32)
    idx = b[:, :32].to(torch.int32) | ((qh & 7).to(torch.int32) << 8)
    delta = _delta((qh & 8) != 0).view(n, 8, 2, 2, 1)
    g = _lut("iq1s", idx).view(n, 8, 2, 2, 8)
    return (dl * (g + delta)).view(n, 256)


_KERNELS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
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
        arr = np.ascontiguousarray(np.asarray(memoryview(raw) if isinstance(raw, (bytes, bytearray)) else raw))
        arr = arr.reshape(-1).view(np.uint8)
        with warnings.catch_warnings():  # read-only memory maps: we never write through this view
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.device.type == "cpu" and t.data_ptr() % 16:  # dtype views need aligned storage
        t = t.clone()
    return t.to(device)


def dequantize(raw, qtype: GGMLQuantizationType, shape, device=None, dtype=torch.float32) -> Tensor:
    """Dequantize ``raw`` (the tensor's bytes, uint8 tensor or array) of ggml type ``qtype`` into a
    tensor of ``shape`` (torch order, outermost first) on ``device`` with ``dtype``."""
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
    if device is None:
        device = raw.device if isinstance(raw, Tensor) else "cpu"
    dev = torch.device(device)
    b = _as_uint8(raw, dev)
    if b.numel() != n_el // bs * ts:
        raise GGUFFormatError(f"{qtype.name} tensor of shape {shape} needs {n_el // bs * ts} bytes, got {b.numel()}")
    if qtype in _PLAIN:
        # a fresh tensor, never a view of the caller's (possibly read-only, memory-mapped) bytes
        return b.view(_PLAIN[qtype]).to(dtype, copy=b.device.type == "cpu").reshape(shape)
    kernel = _KERNELS[qtype]
    blocks = b.view(-1, ts)
    out = torch.empty(blocks.shape[0], bs, dtype=dtype, device=dev)
    step = max(1, (_CHUNK_CPU if dev.type == "cpu" else _CHUNK_CUDA) // bs)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = kernel(blocks[i:i + step])
    return out.view(shape)
