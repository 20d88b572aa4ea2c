"""`drift` (issue 8 item 5): non-zero in fast mode (the #25420 table), exactly zero when invariant."""
from __future__ import annotations

import subprocess
import sys

import torch

from gguf_runtime.tools.drift import drift
from gguf_runtime.models import load_model


def test_drift_zero_when_invariant_nonzero_when_fast(gguf_dir):
    model = load_model(gguf_dir / "llama-tiny-f32.gguf")
    t = torch.randint(3, 2048, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = drift(model, t)
    assert [r.name for r in rows] == ["layer 0", "layer 1", "logits"]
    assert all(r.invariant == 0.0 for r in rows)
    assert any(r.fast > 0.0 for r in rows)
    assert max(r.fast for r in rows) < 1e-3  # same math, different summation order


def test_drift_cli(gguf_dir):
    cmd = [sys.executable, "-m", "gguf_runtime.cli.main", "drift", "-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-n", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "invariant" in out.stdout and "logits" in out.stdout
    bad = subprocess.run(cmd + ["--dtype", "f8"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: unknown --dtype 'f8' (use f32, f16 or bf16)"]
