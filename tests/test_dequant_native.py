"""The native (C) dequantization loops against gguf-py's numpy reference, bit for bit as float32:
special scale values, odd block counts, offset and non-contiguous inputs, 1 and 2 threads, and the
torch fallback (GGUF_RUNTIME_NATIVE=0, or a compiler that fails) giving the same bits.

NaN policy as in test_dequant.py: NaN exactly where gguf-py has NaN, identical bits everywhere else.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from gguf_runtime import dequantize
from gguf_runtime.gguf import dequant, native

T = GGMLQuantizationType
NATIVE = [t.name for t in native.TYPES]

# byte offsets of each type's fp16 scales inside a block
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
          "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
          "IQ4_XS": [0], "TQ1_0": [52], "TQ2_0": [64], "IQ3_XXS": [0], "IQ3_S": [0],
          "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ1_S": [0]}
# fp16 bit patterns: +-0, subnormals (smallest, largest), smallest normal, +-max, +-inf, NaN, 1
F16_SPECIAL = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00]
BYTE_SCALES = {"MXFP4": ([0], [0, 1, 2, 3, 127, 128, 254, 255]),  # e8m0: denormal (0, 1) ... largest (255)
               "NVFP4": ([0, 1, 2, 3], [0x00, 0x01, 0x07, 0x08, 0x7E, 0x7F, 0x80, 0xFF])}  # ue4m3: 0, subnormal, 0x7F = 0


def _reference(raw: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw, qtype).astype(np.float32, copy=False).reshape(-1)


def _assert_same(ours: torch.Tensor, ref: np.ndarray) -> None:
    o = ours.detach().cpu().contiguous().view(-1).numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(o), nan)
    assert np.array_equal(o.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def _special_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random blocks; every other block's scale fields cycle through the special values above."""
    qtype = T[name]
    _, ts = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if name == "IQ1_M":  # the fp16 scale is spread over the top nibbles of the four uint16 at byte 48
        sc = raw[:, 48:56].copy().view(np.uint16)
        for i in range(0, n_blocks, 2):
            h = F16_SPECIAL[(i // 2) % len(F16_SPECIAL)]
            sc[i] = (sc[i] & 0x0FFF) | (np.array([h << 12, h << 8, h << 4, h], dtype=np.uint32) & 0xF000).astype(np.uint16)
        raw[:, 48:56] = sc.view(np.uint8)
    elif name in F16_AT:
        special = np.array(F16_SPECIAL, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
        n = len(special)
        for i in range(0, n_blocks, 2):  # every other block keeps its random scales
            for k, off in enumerate(F16_AT[name]):  # two scales: every pair over 2 * n * n blocks
                raw[i, off:off + 2] = special[(i // 2 // n ** k) % n]
    else:
        offs, vals = BYTE_SCALES[name]
        for i in range(0, n_blocks, 2):
            for k, off in enumerate(offs):
                raw[i, off] = vals[(i // 2 + k) % len(vals)]
    return raw


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("GGUF_RUNTIME_NATIVE", raising=False)


def test_library_builds_where_a_compiler_exists():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the torch kernels are the only path")
    assert native.library() is not None
    assert all(native.kernel(t) is not None for t in native.TYPES)
    assert set(native.TYPES) == set(dequant._KERNELS)  # every block type has its native loop
    assert native.kernel(T.F16) is None  # plain types are casts, not loops


@pytest.mark.parametrize("name", NATIVE)
def test_special_values_odd_counts_bit_exact(name, monkeypatch):
    qtype = T[name]
    bs, _ = GGML_QUANT_SIZES[qtype]
    for n_blocks in (1, 7, 333):
        raw = _special_blocks(name, n_blocks, seed=qtype.value * 1000 + n_blocks)
        ref = _reference(raw, qtype)
        out = dequantize(raw, qtype, (n_blocks * bs,))
        _assert_same(out, ref)
        if n_blocks == 333:
            if name in F16_AT or name == "IQ1_M":  # the special scales reached the output: inf, NaN, negative zeros
                assert np.isinf(ref).any() and np.isnan(ref).any() and (np.signbit(ref) & (ref == 0)).any()
            else:  # FP4 scales are never negative nor NaN; MXFP4's largest ones overflow
                assert np.isinf(ref).any() == (name == "MXFP4")
            monkeypatch.setenv("GGUF_RUNTIME_NATIVE", "0")
            assert native.kernel(qtype) is None
            fallback = dequantize(raw, qtype, (n_blocks * bs,))
            monkeypatch.delenv("GGUF_RUNTIME_NATIVE")
            _assert_same(fallback, ref)  # the torch kernels give the same bits


@pytest.mark.parametrize("name", NATIVE)
def test_offset_and_strided_inputs_and_outputs(name):
    qtype = T[name]
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows, per_row = 6, 3
    raw = _special_blocks(name, rows * per_row, seed=qtype.value).reshape(rows, per_row * ts)
    ref = _reference(raw, qtype)
    shape = (rows, per_row * bs)
    big = torch.zeros(rows, per_row * ts + 48, dtype=torch.uint8)
    for start in (16, 5):  # an aligned offset (used in place) and an odd one (copied first)
        view = big[:, start:start + per_row * ts]  # non-contiguous rows
        view.copy_(torch.from_numpy(raw))
        _assert_same(dequantize(view, qtype, shape), ref)
        flat = big.view(-1)[start:start + raw.size]  # contiguous, at an offset into the storage
        flat.copy_(torch.from_numpy(raw.reshape(-1)))
        _assert_same(dequantize(flat, qtype, shape), ref)
    buf = torch.full((rows * per_row * bs + 3,), 7.0)
    out = buf[3:].view(shape)  # a caller's buffer at an offset
    assert dequantize(raw, qtype, shape, out=out) is out
    _assert_same(out, ref)
    assert torch.equal(buf[:3], torch.full((3,), 7.0))  # nothing written outside it


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS", "TQ1_0", "NVFP4", "IQ3_S", "IQ1_M"])
def test_same_bits_on_one_and_two_threads(name):
    """Large enough (> 2^20 values) for the streaming-store path, with a few blocks left over for the
    direct one; the same into a misaligned buffer (direct path only)."""
    qtype = T[name]
    bs, _ = GGML_QUANT_SIZES[qtype]
    nb = (1 << 20) // bs + 3
    raw = _special_blocks(name, nb, seed=1)
    ref = _reference(raw, qtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _assert_same(dequantize(raw, qtype, (nb * bs,)), ref)
            buf = torch.empty(nb * bs + 1)
            _assert_same(dequantize(raw, qtype, (nb * bs,), out=buf[1:]), ref)
    finally:
        torch.set_num_threads(before)


def test_failed_build_falls_back_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("GGUF_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert native.kernel(T.Q4_K) is None
        raw = _special_blocks("Q4_K", 9, seed=3)
        _assert_same(dequantize(raw, T.Q4_K, (9 * 256,)), _reference(raw, T.Q4_K))
        files = sorted(p.name for p in (tmp_path / "native").iterdir())
        assert files and all(f.endswith(".failed") for f in files)  # no library, no partial file
    finally:
        native.library.cache_clear()


def test_first_build_publishes_one_library(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("GGUF_RUNTIME_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        files = [p.name for p in (tmp_path / "native").iterdir()]
        assert len(files) == 1 and files[0].startswith("dequant-") and files[0].endswith(".so")  # no temporary left
        raw = _special_blocks("Q6_K", 9, seed=4)
        _assert_same(dequantize(raw, T.Q6_K, (9 * 256,)), _reference(raw, T.Q6_K))
    finally:
        native.library.cache_clear()
