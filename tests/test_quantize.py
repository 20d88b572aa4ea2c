"""`quantize`: checked byte for byte against llama-quantize's files in ../shared, gguf-py's
quantizer, and ggml's reference K-quantizers."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from gguf_runtime import GGUFFile
import gguf_runtime.convert.quantize as qmod
from gguf_runtime.convert.kquants import quantize_k
from gguf_runtime.convert.quantize import quantize
from gguf_runtime.errors import ConvertError

T = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def one_thread():
    # small elementwise ops: on a busy 2-core machine, torch's second thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tensors(path) -> dict:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), np.asarray(t.data).view(np.uint8).tobytes())
            for t in r.tensors}


def metadata(path) -> dict:
    return {k: (f.types, f.contents()) for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@pytest.mark.parametrize("model,qtype,ref", [
    ("llama-tiny", "Q4_K_M", "llama-tiny-Q4_K_M"),
    ("mamba-tiny", "Q4_K", "mamba-tiny-Q4_K_M"),  # Q4_K is llama-quantize's alias of Q4_K_M
    ("llama-tiny", "Q4_0", "llama-tiny-Q4_0"),
    ("llama-tiny", "Q8_0", "llama-tiny-Q8_0"),
])
def test_identical_to_llama_quantize(gguf_dir, tmp_path, model, qtype, ref):
    src, ref = gguf_dir / f"{model}-f32.gguf", gguf_dir / f"{ref}.gguf"
    out = quantize(src, tmp_path / "q.gguf", qtype, progress=False)
    ours, theirs = tensors(out), tensors(ref)
    # same per-tensor types (mix, tied output, fallbacks) and the same bytes
    assert {n: v[:2] for n, v in ours.items()} == {n: v[:2] for n, v in theirs.items()}
    assert all(ours[n][2] == theirs[n][2] for n in theirs)
    assert metadata(out) == metadata(ref)  # all keys, general.file_type included
    # loadable by gguf-runtime; per-tensor error vs f32 no worse than llama.cpp's file (tolerance 0:
    # the bytes are identical, so the errors are too)
    f, r, base = GGUFFile(out), GGUFFile(ref), GGUFFile(src)
    for n, info in f.tensor_infos.items():
        x = base.tensor(n)
        err, ref_err, scale = rmse(f.tensor(n), x), rmse(r.tensor(n), x), rmse(x, torch.zeros(()))
        assert err <= ref_err, n
        if info.qtype not in (T.F32, T.F16):
            assert 0 < err < 0.15 * scale, (n, err, scale)  # a 4-bit grid is ~10% of the rms


@pytest.mark.parametrize("qtype,default,more_bits", [
    # llama-tiny has 2 layers: layer 1 is a "more bits" layer (i >= 7n/8); the output is always Q6_K
    ("Q5_K_M", T.Q5_K, {"blk.1.attn_v.weight": T.Q6_K, "blk.1.ffn_down.weight": T.Q6_K}),
    ("Q4_K_S", T.Q4_K, {"blk.0.attn_v.weight": T.Q5_K, "blk.1.attn_v.weight": T.Q5_K}),  # first 4 attn_v
    ("Q6_K", T.Q6_K, {}),
])
def test_mix_types(gguf_dir, tmp_path, qtype, default, more_bits):
    out = quantize(gguf_dir / "llama-tiny-f16.gguf", tmp_path / "q.gguf", qtype, progress=False)
    types = {n: v[0] for n, v in tensors(out).items()}
    for n, t in types.items():
        assert t == (T.F32 if n.endswith("norm.weight") else T.Q6_K if n == "output.weight" else more_bits.get(n, default)), n
    assert GGUFFile(out).metadata["general.file_type"] == int(qmod.FTYPES[qtype][0])
    if qtype == "Q5_K_M":
        f, base = GGUFFile(out), GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
        q4 = GGUFFile(gguf_dir / "llama-tiny-Q4_K_M.gguf")
        for n in ("blk.0.ffn_up.weight", "blk.0.attn_q.weight", "token_embd.weight"):
            assert rmse(f.tensor(n), base.tensor(n)) < 0.6 * rmse(q4.tensor(n), base.tensor(n)), n


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_0"])
def test_legacy_types_bit_identical_to_gguf_py(gguf_dir, tmp_path, qtype):
    src = gguf_dir / "llama-tiny-f32.gguf"
    out = quantize(src, tmp_path / "q.gguf", qtype, pure=True, progress=False)
    base, ours = GGUFFile(src), tensors(out)
    for n, (t, _, data) in ours.items():
        x = base.tensor(n).numpy()
        if x.ndim == 1:
            assert t == T.F32
            continue
        assert t == T[qtype]
        assert data == gguf.quants.quantize(x, T[qtype]).tobytes(), n


# sha256 of ggml's quantize_row_q{4,5,6}_K_ref output (llama.cpp's C code, built from the llama.cpp
# sources vendored in llama-cpp-python 0.3.36) for blk.0.ffn_up.weight of llama-tiny-f32.gguf followed
# by three edge blocks: zeros, constant 0.3, and -linspace(0.001, 1, 256).
GGML_SHA256 = {
    T.Q4_K: "b75a59d1f23015d6eac0e75c15745eb896e40439951585cdaa903681a8665722",
    T.Q5_K: "6bc929b4e98c11560d0e6982b4d8a5b16f006421652bdb36a4a25b990c07f8d8",
    T.Q6_K: "0471845c077cca98d0880003731ab562f68da69367ab96e0d3609440a9bbb098",
}


@pytest.mark.parametrize("qtype", list(GGML_SHA256))
def test_kquants_match_ggml_reference(gguf_dir, qtype):
    x = GGUFFile(gguf_dir / "llama-tiny-f32.gguf").tensor("blk.0.ffn_up.weight").numpy().reshape(-1, 256)
    edge = np.stack([np.zeros(256), np.full(256, 0.3), -np.linspace(0.001, 1, 256)]).astype(np.float32)
    x = np.concatenate([x, edge])
    q = quantize_k(x, qtype)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_SHA256[qtype]
    back = gguf.quants.dequantize(q, qtype)  # gguf-py's reading of our blocks
    assert np.abs(back[-3]).max() == 0 and np.allclose(back[-2], 0.3, atol=2e-3)
    assert np.abs(back[:-3] - x[:-3]).max() < {T.Q4_K: 0.1, T.Q5_K: 0.05, T.Q6_K: 0.025}[qtype] * np.abs(x[:-3]).max()


def _toy_gguf(path, ncols: int):
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    rng = np.random.default_rng(0)
    for name in ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.attn_norm.weight"):
        w.add_tensor(name, rng.standard_normal((8, ncols) if "norm" not in name else (ncols,)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype,ffn,embd", [
    ("Q4_K_M", T.Q5_0, T.Q8_0),  # rows of 96: Q4_K -> Q5_0; the tied token_embd (output) -> Q8_0
    ("Q5_K_M", T.Q5_1, T.Q8_0),
    ("Q6_K", T.Q8_0, T.Q8_0),
])
def test_fallback_for_rows_not_multiple_of_256(tmp_path, qtype, ffn, embd):
    _toy_gguf(tmp_path / "toy.gguf", 96)
    types = {n: v[0] for n, v in tensors(quantize(tmp_path / "toy.gguf", tmp_path / "q.gguf", qtype, progress=False)).items()}
    assert types == {"token_embd.weight": embd, "blk.0.ffn_gate.weight": ffn, "blk.0.attn_norm.weight": T.F32}
    _toy_gguf(tmp_path / "toy16.gguf", 16)  # no 32-block type fits either: F16, as llama.cpp
    types = {n: v[0] for n, v in tensors(quantize(tmp_path / "toy16.gguf", tmp_path / "q.gguf", qtype, progress=False)).items()}
    assert types["blk.0.ffn_gate.weight"] == T.F16


def test_failures_leave_nothing(gguf_dir, tmp_path, monkeypatch):
    calls, encode = [0], qmod.encode

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("disk full")
        return encode(*a, **k)

    monkeypatch.setattr(qmod, "encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize(gguf_dir / "llama-tiny-f32.gguf", tmp_path / "q.gguf", "Q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConvertError, match="already quantized"):  # llama-quantize needs --allow-requantize
        quantize(gguf_dir / "llama-tiny-Q4_0.gguf", tmp_path / "q.gguf", "Q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(gguf_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "gguf_runtime.cli.main", "quantize"]
    r = subprocess.run(cmd + [str(gguf_dir / "mamba-tiny-f32.gguf"), str(tmp_path / "q.gguf"), "q8_0", "-q", "-t", "1"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert {n: v[0] for n, v in tensors(tmp_path / "q.gguf").items()} == \
        {n: v[0] for n, v in tensors(gguf_dir / "mamba-tiny-q8_0.gguf").items()}
    r = subprocess.run(cmd + [str(gguf_dir / "mamba-tiny-f32.gguf"), str(tmp_path / "x.gguf"), "Q3_K"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown quantization type") and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
