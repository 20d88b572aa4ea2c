"""Lazy weights (issue 19): matrices kept in their GGUF type and dequantized right before use give
exactly the resident path's logits, hold no float copy, and bound memory by one layer's scratch."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.errors import UnsupportedError
from gguf_runtime.models import base, load_model
from gguf_runtime.models.layers import Embedding, Linear
from gguf_runtime import numerics
from gguf_runtime.numerics import Numerics
from helpers import toks


def _logits(model, t, n_ubatch=32, numerics=None):
    c = Context(model, n_ctx=256, n_ubatch=n_ubatch, n_seq_max=2, numerics=numerics)
    c.decode(Batch(t + t[:40], seq_ids=[0] * len(t) + [1] * 40, pos=list(range(len(t))) + list(range(40)),
                   output=[True] * (len(t) + 40)))
    return c.get_logits()


@pytest.mark.parametrize("name", ["llama-tiny-Q4_K_M.gguf", "llama-tiny-Q8_0.gguf", "llama-tiny-f16.gguf",
                                  "mamba-tiny-Q4_K_M.gguf", "mamba2-tiny-f32.gguf"])
def test_lazy_equals_resident(gguf_dir, name):
    t = toks(90, 3)
    resident = load_model(gguf_dir / name, weights="resident")
    lazy = load_model(gguf_dir / name, weights="lazy")
    mats = [m for m in lazy.modules() if isinstance(m, (Linear, Embedding)) and m.present]
    assert mats and all(m.lazy is not None and m.weight is None for m in mats)  # no float copy kept
    ref = _logits(resident, t)
    assert torch.equal(_logits(lazy, t), ref)
    # the scratch holds one buffer per weight shape: at most one layer's matrices plus the output
    per_shape = {tuple(m.lazy.shape) for m in mats if isinstance(m, Linear)}
    assert set(k[0] for k in lazy.scratch.buffers) <= per_shape


@pytest.mark.parametrize("name", ["llama-tiny-Q4_K_M.gguf", "llama-tiny-Q4_0.gguf"])
def test_lazy_row_blocks(gguf_dir, monkeypatch, name):
    """A lazy head of more than 2 * ROW_BLOCK rows is dequantized and applied in row blocks (here
    llama-tiny's 2,048-row output in blocks of 256): the scratch holds one block, not the matrix,
    and the logits are still those of the resident path."""
    from gguf_runtime.models import layers

    t = toks(90, 5)
    ref = _logits(load_model(gguf_dir / name, weights="resident"), t)
    monkeypatch.setattr(layers, "ROW_BLOCK", 256)
    lazy = load_model(gguf_dir / name, weights="lazy")
    assert torch.equal(_logits(lazy, t), ref)
    shapes = {k[0] for k in lazy.scratch.buffers}
    assert (256, 256) in shapes and (2048, 256) not in shapes, shapes
    # ggml numerics (the Q8_1 min term reads the whole weight) keep the whole head
    nx = Numerics(ggml=True)
    with numerics.use(nx):
        assert not layers.row_blocks_exact((2048, 256), torch.float32, torch.device("cpu"))
    assert layers.row_blocks_exact((2048, 256), torch.float32, torch.device("cpu"))
    assert torch.equal(_logits(lazy, t, numerics=nx), _logits(load_model(gguf_dir / name), t, numerics=nx))


@pytest.mark.registry
def test_lazy_row_blocks_smollm2(smollm2):
    """SmolLM2's tied 49,152-row head goes through the row blocks at the real ROW_BLOCK: same logits."""
    from gguf_runtime.models import layers

    t = toks(60, 6)
    lazy = load_model(smollm2, weights="lazy")
    assert torch.equal(_logits(lazy, t), _logits(load_model(smollm2, weights="resident"), t))
    assert (layers.ROW_BLOCK, 576) in {k[0] for k in lazy.scratch.buffers}


def test_lazy_with_ggml_numerics(gguf_dir):
    """ggml numerics read the file type from the same place in both modes (Q8_1 min term included)."""
    t = toks(70, 4)
    nx = Numerics(ggml=True)
    for name in ("llama-tiny-Q4_K_M.gguf", "llama-tiny-Q4_0.gguf"):
        a = _logits(load_model(gguf_dir / name), t, numerics=nx)
        assert torch.equal(_logits(load_model(gguf_dir / name, weights="lazy"), t, numerics=nx), a)


def test_weights_mode_choice(gguf_dir, monkeypatch):
    m = load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="auto")
    assert m.weights == "resident"  # 2 MB of float weights fit
    monkeypatch.setattr(base, "available_memory", lambda device: 1 << 20)
    assert load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="auto").weights == "lazy"
    # llama-tiny's 2,229,504 values need 8.9 MB as float32: resident is refused in 1 MiB, before loading
    with pytest.raises(UnsupportedError, match=r"^llama-tiny-Q4_K_M\.gguf: resident weights need 8\.9 MB as float32, "
                                               r"1\.0 MB available on cpu: use --weights lazy or auto$"):
        load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="resident")
    with pytest.raises(UnsupportedError, match="unknown weights mode 'mmap'"):
        load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf", weights="mmap")


_RSS = """
import sys, torch
from gguf_runtime.models import load_model
from gguf_runtime.context import Context
from gguf_runtime.batch import Batch
m = load_model(sys.argv[1], weights=sys.argv[2])
c = Context(m, n_ctx=512)
with torch.inference_mode():
    c.decode(Batch(list(range(1, 257)), output=[False] * 255 + [True]))
# VmHWM (this process's peak RSS since exec): ru_maxrss would carry over a large parent's peak
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.registry
def test_lazy_bounds_memory(smollm2):
    """SmolLM2-135M Q4_1 (86 MB file, ~540 MB of float32 weights): the lazy mode's peak RSS stays far
    below the resident mode's."""
    rss = {}
    for mode in ("resident", "lazy"):
        out = subprocess.run([sys.executable, "-c", _RSS, str(smollm2), mode], capture_output=True, text=True, check=True)
        rss[mode] = int(out.stdout.split()[-1]) * 1024
    assert rss["lazy"] < rss["resident"] - 300e6, rss


def test_cli_weights_flag(gguf_dir, wikitext, capsys):
    """`--weights lazy` prints the same perplexity lines as resident; a bad mode is one line, exit 2."""
    from gguf_runtime.cli.main import main

    outs = {}
    for mode in ("resident", "lazy"):
        with pytest.raises(SystemExit) as e:
            main(["perplexity", "-m", str(gguf_dir / "llama-tiny-Q4_K_M.gguf"), "-f", str(wikitext), "-c", "128",
                  "--chunks", "3", "--no-progress", "--weights", mode])
        assert e.value.code == 0
        outs[mode] = capsys.readouterr().out
    assert "Final estimate" in outs["lazy"] and outs["lazy"] == outs["resident"]
    with pytest.raises(SystemExit) as e:
        main(["perplexity", "-m", str(gguf_dir / "llama-tiny-Q4_K_M.gguf"), "--weights", "mmap"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: unknown --weights 'mmap' (use resident, lazy, quant or auto)"


def test_quant_without_the_native_library_is_lazy(gguf_dir, monkeypatch):
    """With no fused kernel (GGUF_RUNTIME_NATIVE=0, or no compiler) ``--weights quant`` still runs:
    each product dequantizes, as lazy weights do, with the same logits."""
    monkeypatch.setenv("GGUF_RUNTIME_NATIVE", "0")
    t = toks(60, 8)
    path = gguf_dir / "llama-tiny-Q4_K_M.gguf"
    assert torch.equal(_logits(load_model(path, weights="quant"), t), _logits(load_model(path, weights="lazy"), t))
