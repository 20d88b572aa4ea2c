"""The fuzz harness (gguf_runtime.tools.fuzz): a short fixed-seed run over one fixture per
architecture finds no crash, hang, oversized allocation or silent acceptance; and each of those
outcomes is detected when it happens (negative controls), so a clean run means something."""
from __future__ import annotations

import time

import pytest

from gguf_runtime.tools import fuzz


@pytest.fixture(scope="module")
def fixtures(gguf_dir):
    files = fuzz.default_fixtures(gguf_dir)
    assert len(files) >= 4  # llama, mamba, mamba2 and more: one per architecture with a fixture
    return files


def test_short_run_is_clean(fixtures):
    t = time.monotonic()
    s = fuzz.fuzz(fixtures, n=160, seed=0, seconds=50)
    assert s.mutants >= 60, s.mutants  # ~0.25 s a mutant on an idle core
    assert s.n_bugs == 0, s.bugs
    assert s.counts["rejected"] > 0 and s.counts["accepted"] > 0  # both kinds of mutant occur
    assert time.monotonic() - t < 60


def test_detects_each_bug_class(fixtures, monkeypatch):
    src = [p for p in fixtures if p.stat().st_size < 1_500_000][:1]

    def crash(path, res=None):
        raise KeyError("token_embd.weight")

    def hang(path, res=None):
        time.sleep(30)

    def hog(path, res=None):
        blob = bytearray(400 << 20)  # 400 MiB for a ~1 MiB file
        blob[::4096] = b"x" * len(blob[::4096])
        return 0

    def lax(path, res=None):
        return 0  # accepts everything, so invalid-by-construction mutants become silent acceptances

    for fn, outcome, kw in ((crash, "crash", {}), (hang, "hang", {"timeout": 0.5}), (hog, "alloc", {}),
                            (lax, "silent", {})):
        monkeypatch.setattr(fuzz, "pipeline", fn)
        s = fuzz.fuzz(src, n=40 if outcome == "silent" else 2, seed=3, **kw)
        assert s.counts[outcome] > 0, (outcome, s.counts)
