"""Mamba perplexity throughput: ours against transformers' MambaForCausalLM on the same model, text
and chunks, in one run (and llama.cpp's llama-perplexity when a binary is given or found).

    python benchmarks/mamba.py [--chunks 128] [--threads 2] [--llama-cpp /path/to/llama-perplexity]

All score mamba-tiny-f32.gguf (transformers loads the same GGUF) over the first 200,000 bytes of
wikitext-2-test.txt at -c 128 as llama-perplexity does: BOS replacing each chunk's first token, the
second half of each chunk scored, 16 chunks per batch. Wall-clock and CPU-time throughputs are both
printed: on a shared machine the wall clock measures the neighbours as much as the code.
"""
from __future__ import annotations

import argparse
import math
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402

from gguf_runtime import fixtures
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity, token_nll
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer

N_CTX, N_SEQ = 128, 16


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def transformers_ppl(path: Path, tokens: torch.Tensor, n_chunks: int, bos: int) -> tuple[float, Clock]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    first = N_CTX // 2
    chunks = tokens[:n_chunks * N_CTX].view(n_chunks, N_CTX).clone()
    chunks[:, 0] = bos
    nll, count = 0.0, 0
    with torch.inference_mode():
        hf(chunks[:N_SEQ])  # warm-up
    with torch.inference_mode(), Clock() as clk:
        for i in range(0, n_chunks, N_SEQ):
            c = chunks[i:i + N_SEQ]
            logits = hf(c).logits[:, first:-1]
            v = token_nll(logits.reshape(-1, logits.shape[-1]), c[:, first + 1:].reshape(-1))
            nll, count = nll + float(v.sum()), count + v.numel()
    return math.exp(nll / count), clk


def llama_cpp(binary: str, model: Path, text: bytes, n_chunks: int, threads: int) -> tuple[float, float, float]:
    """PPL, scoring wall seconds (from its log's timestamps) and the whole process's CPU seconds."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        f.write(text)
        f.flush()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run([binary, "-m", str(model), "-f", f.name, "-c", str(N_CTX), "-b", str(N_CTX * N_SEQ),
                            "--chunks", str(n_chunks), "-t", str(threads)], capture_output=True, text=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = p.stdout + p.stderr
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))

    def stamp(what: str) -> float:  # log entries start with minutes.seconds.milliseconds.microseconds
        m, s, ms, us = re.search(rf"(\d+)\.(\d\d)\.(\d{{3}})\.(\d{{3}}) I (?:perplexity: )?{what}", out).groups()
        return int(m) * 60 + int(s) + int(ms) / 1e3 + int(us) / 1e6

    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return ppl, stamp("Final estimate") - stamp("calculating perplexity"), cpu


def cli(default_chunks: int) -> argparse.Namespace:
    """The benchmarks' common options; sets torch's thread count."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=default_chunks)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--llama-cpp", default=shutil.which("llama-perplexity"), help="llama-perplexity binary")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a


def wiki(path: Path, chunks: int) -> tuple[bytes, Tokenizer, torch.Tensor, int]:
    """The first 200,000 bytes of wikitext-2-test, the model's tokenizer, its tokens (BOS first) and
    the number of -c 128 chunks to score."""
    text = (fixtures.shared_dir() / "data" / "wikitext-2-test.txt").read_bytes()[:200_000]
    tok = Tokenizer.from_gguf(GGUFFile(path))
    tokens = torch.tensor(tok.encode(text.decode("utf-8"), add_special=True))
    return text, tok, tokens, min(chunks, len(tokens) // N_CTX)


def header(name: str, n_chunks: int, threads: int, device) -> str:
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    return (f"{name}, -c {N_CTX}, {n_chunks} chunks ({n_chunks * N_CTX} tokens), {N_SEQ} chunks per batch, "
            f"{threads} threads, device {device}, load average {load}")


def main() -> None:
    a = cli(128)
    path = fixtures.shared_dir() / "models" / "gguf" / "mamba-tiny-f32.gguf"
    text, tok, tokens, n_chunks = wiki(path, a.chunks)
    n_tok = n_chunks * N_CTX

    model = load_model(path, device=a.device)
    perplexity(model, tokens, N_CTX, n_chunks=N_SEQ, bos=tok.bos_id)  # warm-up (matmul self-test, workspace)
    with Clock() as ours:
        r = perplexity(model, tokens, N_CTX, N_CTX * N_SEQ, n_chunks=n_chunks, bos=tok.bos_id)
    hf_ppl, hf = transformers_ppl(path, tokens, n_chunks, tok.bos_id)
    print(header("mamba-tiny f32", n_chunks, a.threads, model.device))
    print(f"{'':14s} {'PPL':>10s} {'tok/s wall':>11s} {'tok/s CPU':>10s}")
    print(f"{'gguf-runtime':14s} {r.ppl:10.4f} {n_tok / ours.wall:11.0f} {n_tok / ours.cpu:10.0f}")
    print(f"{'transformers':14s} {hf_ppl:10.4f} {n_tok / hf.wall:11.0f} {n_tok / hf.cpu:10.0f}")
    if a.llama_cpp:
        lc_ppl, lc_wall, lc_cpu = llama_cpp(a.llama_cpp, path, text, n_chunks, a.threads)
        print(f"{'llama.cpp':14s} {lc_ppl:10.4f} {n_tok / lc_wall:11.0f} {n_tok / lc_cpu:10.0f}  "
              f"(CPU: whole process, tokenization and loading included)")
    print(f"speed-up vs transformers: {hf.wall / ours.wall:.1f}x wall, {hf.cpu / ours.cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
