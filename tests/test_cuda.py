"""CUDA path (run where a GPU is lent; skipped with the reason elsewhere): the same code on the device
gives gguf-py's exact dequantization, batch-invariant logits, and the CPU's numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as np_dequantize

from gguf_runtime import dequantize
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.models import load_model
from gguf_runtime.gguf.reader import GGUFFile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("name", ["llama-tiny-Q4_K_M.gguf", "llama-tiny-Q8_0.gguf", "llama-tiny-f16.gguf", "mamba-tiny-Q4_K_M.gguf"])
def test_dequant_on_cuda_is_exact(gguf_dir, name):
    f = GGUFFile(gguf_dir / name)
    for n, info in f.tensor_infos.items():
        raw = f.raw(n)
        ref = np_dequantize(np.asarray(raw).reshape(info.shape[:-1] + (-1,)) if len(info.shape) > 1 else raw, info.qtype)
        got = dequantize(torch.from_numpy(np.array(raw)).cuda(), info.qtype, info.shape, device="cuda")
        assert got.is_cuda and torch.equal(got.cpu(), torch.from_numpy(np.ascontiguousarray(ref, np.float32)).reshape(info.shape)), n


@pytest.mark.parametrize("name", ["llama-tiny-f32.gguf", "mamba-tiny-f32.gguf", "mamba2-tiny-f32.gguf"])
def test_cuda_logits_invariant_and_close_to_cpu(gguf_dir, name):
    toks = torch.randint(3, 2048, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    outs = []
    for dev, nub in [("cuda", 512), ("cuda", 7), ("cuda", 1), ("cpu", 512)]:
        c = Context(load_model(gguf_dir / name, device=dev), n_ctx=128, n_ubatch=nub)
        c.decode(Batch(toks, output=[True] * 70))
        outs.append(c.get_logits().float().cpu())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], outs[3], rtol=1e-4, atol=1e-4)
