"""Session state speed and size: ``Context.state_save`` / ``state_load`` MB/s and the file's size
against the raw state bytes (issue 16).

    python benchmarks/state.py [--tokens 1024] [--repeat 5]

For each tiny model: decode ``--tokens`` tokens (recurrent models: 4 sequences of a quarter each,
then 3 single-token steps so snapshots exist), then time the best of ``--repeat`` saves (hash,
checksum, serialisation, atomic write with fsync) and loads (read, checksum, checks, restore) into a
fresh context. "raw" is the bytes of the memory tensors the file holds (the used cells and the
snapshots); "alloc" is what the memory has allocated; MB/s are raw bytes per second.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gguf_runtime import fixtures
from gguf_runtime.batch import Batch
from gguf_runtime.context import Context
from gguf_runtime.memory.kv_cache import KVCache
from gguf_runtime.models import load_model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def allocated(mem) -> int:
    """Bytes the memory holds, used or not (a KV cache allocates every cell)."""
    if isinstance(mem, KVCache):
        ts = mem.k + mem.v
    else:
        ts = [x for xs in mem.states.values() for x in xs]
    return sum(x.numel() * x.element_size() for x in ts)


def bench(arch: str, n_tokens: int, repeat: int, d: Path) -> str:
    m = load_model(fixtures.shared_dir() / "models" / "gguf" / f"{arch}-tiny-f32.gguf", device="cpu")
    recurrent = arch.startswith("mamba")
    n_seq = 4 if recurrent else 1
    mk = lambda: Context(m, n_ctx=n_tokens + 16, n_batch=n_tokens + 16, n_seq_max=n_seq)  # noqa: E731
    c = mk()
    g = torch.Generator().manual_seed(0)
    per = n_tokens // n_seq
    c.decode(Batch.from_sequences([torch.randint(3, 2000, (per,), generator=g).tolist() for _ in range(n_seq)]))
    if recurrent:
        for _ in range(3):
            c.decode(Batch.from_sequences([[7]] * n_seq))
    raw = nbytes(c.memory.state_tensors()[0])
    path = d / f"{arch}.state"
    t_save = min(_time(lambda: c.state_save(path)) for _ in range(repeat))
    size = path.stat().st_size
    f = mk()
    t_load = min(_time(lambda: f.state_load(path)) for _ in range(repeat))
    mb = raw / 1e6
    return (f"| {arch} | {n_tokens} tok, {n_seq} seq | {mb:.2f} MB | {allocated(c.memory) / 1e6:.2f} MB | "
            f"{size / 1e6:.2f} MB ({(size - raw) / 1e3:+.1f} kB) | {t_save * 1e3:.1f} ms ({mb / t_save:.0f} MB/s) | "
            f"{t_load * 1e3:.1f} ms ({mb / t_load:.0f} MB/s) |")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--archs", default="llama,mamba,mamba2")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | state | raw | alloc | file (overhead) | save | load |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for arch in a.archs.split(","):
            print(bench(arch, a.tokens, a.repeat, Path(d)), flush=True)


if __name__ == "__main__":
    main()
