"""``--weights quant``: linears multiply by the GGUF blocks themselves (the native fused kernel).

The kernel's arithmetic is checked against an independent emulation of its documented order on
gguf-py's dequantized weights (bit for bit), its row and thread invariance directly, and the mode
end to end: llama.cpp's perplexity figure, batch-split and sequence-sharing invariance, no float
copy of any matrix, and state files that say which products made them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.errors import StateError
from gguf_runtime.gguf import native
from gguf_runtime.models import load_model
from gguf_runtime.models.layers import Linear
from gguf_runtime.tools.perplexity import perplexity
from helpers import toks, wiki_tokens

T = GGMLQuantizationType
LANES = native.lanes()
pytestmark = pytest.mark.skipif(not LANES, reason="no native library (no C compiler on this machine)")

# byte offsets of the fp16 scales inside a block (set to moderate values: random bytes there give inf / NaN)
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
          "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}


def _weight(name: str, n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) weights of type ``name`` as the file's bytes: random codes, scales of order 1e-2."""
    qtype = T[name]
    rng = np.random.default_rng(seed)
    if name == "F32":
        return rng.standard_normal((n, k), dtype=np.float32).view(np.uint8)
    if name in ("F16", "BF16"):
        f = rng.standard_normal((n, k)).astype(np.float32)
        return (f.astype(np.float16).view(np.uint8) if name == "F16"
                else (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // bs, ts), dtype=np.uint8)
    for off in F16_AT[name]:
        raw[:, off:off + 2] = rng.uniform(0.005, 0.05, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def _dequant(raw: np.ndarray, name: str, n: int, k: int) -> torch.Tensor:
    if name == "F32":
        return torch.from_numpy(raw.view(np.float32).reshape(n, k).copy())
    if name == "BF16":
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n, k).copy())
    return torch.from_numpy(gguf_dequantize(raw, T[name]).astype(np.float32).reshape(n, k))


def _emulate(x: torch.Tensor, w: torch.Tensor, lanes: int = LANES) -> torch.Tensor:
    """The kernel's documented order: ``lanes`` partial sums, lane l over k = l, l + LANES, ... with one
    rounding per multiply-add (a float64 product of two floats is exact; its sum rounded to float64
    then to float32 is the fused result unless a double-rounding tie occurs, which these seeds do
    not hit), then pairwise over lanes l and l + n / 2."""
    m, k = x.shape
    xs = x.reshape(m, 1, k // lanes, lanes).double()
    ws = w.reshape(1, w.shape[0], k // lanes, lanes).double()
    acc = torch.zeros(m, w.shape[0], lanes)
    for s in range(k // lanes):
        acc = (acc.double() + xs[:, :, s] * ws[:, :, s]).float()
    n = lanes // 2
    while n >= 1:
        acc = acc[..., :n] + acc[..., n:2 * n]
        n //= 2
    return acc[..., 0]


@pytest.mark.parametrize("name", list(F16_AT) + ["F32", "F16", "BF16"])
def test_qmm_is_the_documented_sum_and_row_and_thread_invariant(name):
    k = 512
    n = 37 if name in ("F32", "F16", "BF16") else 29  # not a multiple of any tile
    raw = torch.from_numpy(_weight(name, n, k, seed=len(name))).contiguous()
    w = _dequant(raw.numpy(), name, n, k)
    fn = native.matmul(T[name])
    x = torch.randn(23, k, generator=torch.Generator().manual_seed(7))

    def qmm(xx, threads=2):
        y = torch.empty(xx.shape[0], n)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn(raw, n, k, xx.contiguous(), y)
        finally:
            torch.set_num_threads(old)
        return y

    full = qmm(x)
    assert torch.equal(full, _emulate(x, w))
    ref = x.double() @ w.double().T
    assert (full.double() - ref).abs().max() <= 1e-5 * (x.abs().double() @ w.abs().double().T).max()
    for rows, at in ((1, 0), (1, 22), (2, 5), (3, 9), (5, 11), (17, 6)):  # the few-rows and panel paths
        assert torch.equal(qmm(x[at:at + rows]), full[at:at + rows]), (rows, at)
    assert torch.equal(qmm(x, threads=1), full)


def _logits(model, t, n_ubatch=512, seqs=1):
    c = Context(model, n_ctx=256, n_ubatch=n_ubatch, n_seq_max=2)
    if seqs == 1:
        c.decode(Batch(t, output=[True] * len(t)))
    else:  # a second sequence shares the batch
        c.decode(Batch(t + t[:40], seq_ids=[0] * len(t) + [1] * 40, pos=list(range(len(t))) + list(range(40)),
                       output=[True] * (len(t) + 40)))
    return c.get_logits()[:len(t)]


@pytest.mark.parametrize("name", ["llama-tiny-Q4_K_M.gguf", "llama-tiny-Q4_0.gguf", "llama-tiny-f32.gguf"])
def test_quant_mode_invariant_and_close_to_resident(gguf_dir, name):
    t = toks(90, 3)
    quant = load_model(gguf_dir / name, weights="quant")
    lin = [m for m in quant.modules() if isinstance(m, Linear) and m.present]
    assert quant.weights == "quant" and lin and all(m.weight is None and m.lazy.direct for m in lin)
    ref = _logits(quant, t)
    assert not quant.scratch.buffers  # every product read the blocks: no float copy was made
    assert torch.equal(_logits(quant, t, n_ubatch=7), ref)  # split into ubatches of 7
    assert torch.equal(_logits(quant, t, seqs=2), ref)  # another sequence in the batch
    c = Context(quant, n_ctx=256)
    one_by_one = []
    for tok in t[:20]:  # decode, one token a step
        c.decode(Batch([tok]))
        one_by_one.append(c.get_logits()[-1].clone())
    assert torch.equal(torch.stack(one_by_one), ref[:20])
    res = _logits(load_model(gguf_dir / name, weights="resident"), t)
    assert not torch.equal(ref, res)  # another summation order ...
    assert (ref - res).abs().max() < 1e-3 * res.abs().max()  # ... of the same products


def test_quant_mode_matches_llama_cpp_perplexity(gguf_dir, wikitext):
    """llama-tiny f32, all 683 chunks at -c 128: llama.cpp's 587.9062 (../shared/README.md) to 1e-4."""
    path = gguf_dir / "llama-tiny-f32.gguf"
    ids, tok = wiki_tokens(path, wikitext)
    r = perplexity(load_model(path, weights="quant"), ids, n_ctx=128, bos=tok.bos_id)
    assert r.n_chunks == 683
    assert abs(r.ppl - 587.9062) / 587.9062 < 1e-4


def test_state_records_the_products(gguf_dir, tmp_path):
    """A state saved with resident weights is refused by a quant-weights context (its K/V come from
    other sums), in one line; the same mode restores it."""
    path = gguf_dir / "llama-tiny-Q4_K_M.gguf"
    t = toks(30, 2)
    res = Context(load_model(path, weights="resident"), n_ctx=128)
    res.decode(Batch(t))
    res.state_save(tmp_path / "s.state")
    quant = Context(load_model(path, weights="quant"), n_ctx=128)
    with pytest.raises(StateError, match=r"^s\.state: made with products = float, this context has quant$"):
        quant.state_load(tmp_path / "s.state")
    quant.decode(Batch(t))
    quant.state_save(tmp_path / "q.state")
    again = Context(load_model(path, weights="quant"), n_ctx=128)
    again.state_load(tmp_path / "q.state")
    again.decode(Batch([5]))
    quant.decode(Batch([5]))
    assert torch.equal(again.get_logits(), quant.get_logits())


def test_quant_elsewhere_is_auto(gguf_dir):
    """The fused kernel is CPU float32: another dtype gets auto's choice."""
    m = load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="quant", dtype=torch.bfloat16)
    assert m.weights == "resident"


def _flag_ok(cc: str, flags: list[str]) -> bool:
    import subprocess
    return subprocess.run([cc, *flags, "-x", "c", "-c", "-o", "/dev/null", "-"], input="int x;", text=True,
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c", "-fopenmp"], ["-fopenmp"]], ids=["avx2", "portable"])
def test_other_builds_compute_the_same_order(tmp_path, flags):
    """The library as a machine without AVX-512 builds it (8 lanes: AVX2 registers, or plain C):
    its products are the documented order for its lane count, and its dequantization gguf-py's."""
    import ctypes
    import platform

    cc = native._compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64") or not _flag_ok(cc, flags):
        pytest.skip("needs a C compiler for x86-64 with these flags")
    so = tmp_path / "lib.so"
    assert native._build(cc, flags, so)
    lib = ctypes.CDLL(str(so))
    assert lib.qmm_lanes() == 8
    k, n = 512, 29
    for name in ("Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K", "IQ4_XS"):
        raw = torch.from_numpy(_weight(name, n, k, seed=3)).contiguous()
        w = _dequant(raw.numpy(), name, n, k)
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(5))
        fn = getattr(lib, "qmm_" + name.lower())
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int]
        for rows in (9, 1, 3):
            y = torch.empty(rows, n)
            fn(raw.data_ptr(), n, k, x.data_ptr(), rows, y.data_ptr(), 2)
            assert torch.equal(y, _emulate(x[:rows], w, lanes=8)), (name, rows)
        dq = getattr(lib, "dq_" + name.lower())
        dq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        out = torch.empty(n, k)
        dq(raw.data_ptr(), out.data_ptr(), raw.numel() // GGML_QUANT_SIZES[T[name]][1], 1)
        assert torch.equal(out, w), name


def test_projections_of_one_input_in_one_call(gguf_dir):
    """``layers.project`` (q, k, v; gate and up) multiplies by several quant weights in one native
    call: each product torch.equal to its own module's, for 1 and 7 rows; with a bias (or a weight
    without a fused kernel) it falls back to the modules one by one."""
    from gguf_runtime.models import layers

    m = load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="quant")
    blk = m.blk[0]
    for n in (1, 7):
        x = torch.randn(n, blk.attn_q.lazy.shape[1], generator=torch.Generator().manual_seed(n))
        got = layers.project(x, blk.attn_q, blk.attn_k, blk.attn_v)
        assert blk.attn_q.plans[(id(blk.attn_q), id(blk.attn_k), id(blk.attn_v))] is not None  # the native call ran
        for y, mod in zip(got, (blk.attn_q, blk.attn_k, blk.attn_v)):
            assert torch.equal(y, mod(x))
    blk.ffn_up.bias = torch.ones(blk.ffn_up.lazy.shape[0])
    try:
        x = torch.randn(3, blk.ffn_gate.lazy.shape[1])
        g, u = layers.project(x, blk.ffn_gate, blk.ffn_up)
        assert blk.ffn_gate.plans[(id(blk.ffn_gate), id(blk.ffn_up))] is None
        assert torch.equal(u, blk.ffn_up(x)) and torch.equal(g, blk.ffn_gate(x))
    finally:
        blk.ffn_up.bias = None
