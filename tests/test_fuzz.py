"""The fuzz harness (gguf_runtime.tools.fuzz): a short fixed-seed run over one fixture per
architecture finds no crash, hang, oversized allocation or silent acceptance; and each of those
outcomes is detected when it happens (negative controls), so a clean run means something."""
from __future__ import annotations

import time
from pathlib import Path

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


@pytest.fixture(scope="module")
def small(fixtures):
    """The first fixture under 1.5 MB, the one file the negative controls mutate."""
    return [p for p in fixtures if p.stat().st_size < 1_500_000][:1]


def hog(path, res=None):
    """A pipeline that allocates and touches 400 MiB for a ~1 MiB file: an ``alloc``."""
    blob = bytearray(400 << 20)
    blob[::4096] = b"x" * len(blob[::4096])
    return 0


def test_detects_each_bug_class(small, monkeypatch):
    def crash(path, res=None):
        raise KeyError("token_embd.weight")

    def hang(path, res=None):
        time.sleep(30)

    def lax(path, res=None):
        return 0  # accepts everything, so invalid-by-construction mutants become silent acceptances

    for fn, outcome, kw in ((crash, "crash", {}), (hang, "hang", {"timeout": 0.5}), (hog, "alloc", {}),
                            (lax, "silent", {})):
        monkeypatch.setattr(fuzz, "pipeline", fn)
        s = fuzz.fuzz(small, n=40 if outcome == "silent" else 2, seed=3, **kw)
        assert s.counts[outcome] > 0, (outcome, s.counts)


HOG_AFTER_DIRTY_HEAP = r"""
import ctypes, sys
from pathlib import Path
from gguf_runtime.tools import fuzz

sys.path.insert(0, sys.argv[2])
from test_fuzz import hog

# A long-lived parent, as a test run is: blocks the heap kept (not mmapped), touched, freed, with a live
# block above them so none of it is trimmed. A child reusing them copies pages on write: no RSS growth.
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD, where glibc's dynamic threshold also ends up after frees
blocks = [libc.malloc(20 << 20) for _ in range(40)]
for b in blocks:
    ctypes.memset(b, 1, 20 << 20)
above = libc.malloc(1 << 20)
for b in blocks:
    libc.free(b)

fuzz.pipeline = hog
s = fuzz.fuzz([Path(sys.argv[1])], n=2, seed=3)
print(s.counts["alloc"], max((b["grow"] or 0) for b in s.bugs) if s.bugs else 0)
"""


def test_alloc_detected_when_parent_heap_is_dirty(small):
    """CI ran the negative controls late in the full suite, where pytest's heap held hundreds of MiB
    of freed blocks: the hog reused them and its 400 MiB went unseen. The child trims the heap first."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: the heap this test dirties is glibc's")
    out = subprocess.run([sys.executable, "-c", HOG_AFTER_DIRTY_HEAP, str(small[0]), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    alloc, grow = map(int, out.stdout.split())
    assert alloc == 2 and grow > 390 << 20, out.stdout
