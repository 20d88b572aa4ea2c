"""Perplexity and HellaSwag speed on the real registry models, against llama.cpp and transformers.

    python benchmarks/realmodels.py --llama-cpp /path/to/bin [--chunks 16] [--tasks 100] [--rounds 2]
                                    [--threads 2] [--models smollm2,gemma3]

SmolLM2-135M Q4_1 and gemma-3-270m Q4_K_M over wikitext-2-test.txt at -c 512 (-b 2048: four chunks
decoded as parallel sequences, BOS replacing each chunk's first token, the second half scored), in
one run, rounds interleaved (best of ``--rounds``):

- ours in-process, the model loaded once per mode: the default (batch-invariant, resident weights),
  ``--weights lazy``, ``--weights quant`` and ``Numerics(invariant=False)``; tokens/s of ``perplexity()`` (all chunk tokens
  over its wall time, after a one-chunk warm-up);
- ``llama-perplexity`` on the same file and threads (its defaults: flash attention, f16 K/V),
  tokens/s from its log stamps (chunk loop start to the final line), as benchmarks/perplexity.py;
- transformers loading the same GGUF (dequantized to float32), once, the same chunks four at a time.

HellaSwag (``--tasks`` tasks of ../shared/data/hellaswag_val_full.txt.bz2, llama-perplexity's task
choice): the whole command of ``gguf-runtime perplexity --hellaswag`` against ``llama-perplexity
--hellaswag``, wall time of each process, start-up included (both print the same accuracy line).
"""
from __future__ import annotations

import argparse
import bz2
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from perplexity import llama_cpp_speed, transformers_ppl  # noqa: E402

from gguf_runtime import fixtures, numerics  # noqa: E402
from gguf_runtime.gguf.reader import GGUFFile  # noqa: E402
from gguf_runtime.models import load_model  # noqa: E402
from gguf_runtime.tokenizer import Tokenizer  # noqa: E402
from gguf_runtime.tools.perplexity import perplexity  # noqa: E402

N_CTX, N_BATCH = 512, 2048


def model_path(name: str) -> Path:
    return Path(fixtures.smollm2_path() if name == "smollm2" else fixtures.gemma3_path())


def ours(path: Path, tokens: torch.Tensor, bos, n_chunks: int, weights: str, invariant: bool) -> tuple[float, float]:
    with numerics.use(numerics.Numerics(invariant=invariant)):
        m = load_model(path, weights=weights)
        perplexity(m, tokens, n_ctx=N_CTX, n_batch=N_BATCH, n_chunks=1, bos=bos)  # warm-up (packing, scratch)
        t0 = time.perf_counter()
        r = perplexity(m, tokens, n_ctx=N_CTX, n_batch=N_BATCH, n_chunks=n_chunks, bos=bos)
        dt = time.perf_counter() - t0
    return r.ppl, n_chunks * N_CTX / dt


def hellaswag(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = p.stdout + p.stderr
    last = [ln for ln in out.splitlines() if re.match(r"^\d+\s+[\d.]+", ln.strip())]
    return (last[-1].strip() if last else f"rc={p.returncode} {out[-300:]}"), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="folder with llama-perplexity")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lcpp = str(Path(a.llama_cpp) / "llama-perplexity")
    os.environ.setdefault("LD_LIBRARY_PATH", a.llama_cpp)
    shared = fixtures.shared_dir()
    wiki = shared / "data" / "wikitext-2-test.txt"
    hs = Path(tempfile.mkdtemp()) / "hellaswag_val_full.txt"
    hs.write_bytes(bz2.decompress((shared / "data" / "hellaswag_val_full.txt.bz2").read_bytes()))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for name in a.models.split(","):
        path = model_path(name)
        tok = Tokenizer.from_gguf(GGUFFile(path))
        text = wiki.read_text(encoding="utf-8")
        tokens = torch.tensor(tok.encode(text, add_special=True))
        best: dict[str, tuple[float, float]] = {}
        for _ in range(a.rounds):
            for mode, fn in (("ours (invariant, resident)", lambda: ours(path, tokens, tok.bos_id, a.chunks, "resident", True)),
                             ("llama.cpp", lambda: llama_cpp_speed(lcpp, path, wiki.read_bytes(), N_CTX, a.chunks, a.threads)),
                             ("ours --weights lazy", lambda: ours(path, tokens, tok.bos_id, a.chunks, "lazy", True)),
                             ("ours --weights quant", lambda: ours(path, tokens, tok.bos_id, a.chunks, "quant", True)),
                             ("ours --no-invariant", lambda: ours(path, tokens, tok.bos_id, a.chunks, "resident", False))):
                ppl, tps = fn()
                if mode not in best or tps > best[mode][1]:
                    best[mode] = (ppl, tps)
        if not a.no_transformers:
            ppl, secs = transformers_ppl(path, tokens, N_CTX, a.chunks, tok.bos_id, N_BATCH // N_CTX)
            best["transformers (same GGUF)"] = (ppl, a.chunks * N_CTX / secs)
        ref = best["llama.cpp"][1]
        print(f"\n## {path.name}: perplexity -c {N_CTX} -b {N_BATCH}, {a.chunks} chunks, best of {a.rounds}, "
              f"load average {os.getloadavg()[0]:.2f}\n")
        print("| run | PPL | tok/s | / llama.cpp |\n|---|---:|---:|---:|")
        for mode, (ppl, tps) in best.items():
            print(f"| {mode} | {ppl:.4f} | {tps:,.0f} | {tps / ref:.2f}x |")
        rows = []
        for _ in range(a.rounds):
            rows.append(("ours", *hellaswag([sys.executable, "-m", "gguf_runtime", "perplexity", "-m", str(path), "-f", str(hs),
                                             "--hellaswag", "--hellaswag-tasks", str(a.tasks), "-t", str(a.threads),
                                             "--no-progress"])))
            rows.append(("llama.cpp", *hellaswag([lcpp, "-m", str(path), "-f", str(hs), "--hellaswag",
                                                  "--hellaswag-tasks", str(a.tasks), "-t", str(a.threads)])))
        print(f"\nHellaSwag, {a.tasks} tasks, whole process, best of {a.rounds}:\n")
        print("| tool | last line | seconds |\n|---|---|---:|")
        for tool in ("ours", "llama.cpp"):
            line, secs = min(((ln, s) for t, ln, s in rows if t == tool), key=lambda x: x[1])
            print(f"| {tool} | `{line}` | {secs:.1f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
