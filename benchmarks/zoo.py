"""Perplexity throughput of every tiny zoo fixture (and SmolLM2-135M): ours against transformers (the
HF checkpoint, same chunks) and llama.cpp's llama-perplexity (same GGUF), in one run.

    python benchmarks/zoo.py [--chunks 100] [--threads 2] [--llama-cpp /path/to/llama-perplexity]

-c 128 over the first 200,000 bytes of wikitext-2-test.txt, as ../shared/README.md's figures; ours
and transformers take the best of two timed runs after a warm-up.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from gguf_runtime import fixtures
from gguf_runtime.device import keep_host_memory
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.models import load_model
from gguf_runtime.tokenizer import Tokenizer
from gguf_runtime.tools.perplexity import perplexity, token_nll
from perplexity import llama_cpp_speed  # benchmarks/perplexity.py: llama.cpp timed from its log stamps

ZOO = ["qwen2", "qwen3", "phi3", "gpt2", "mixtral", "qwen3moe", "gemma2", "gemma3", "jamba", "jamba-moe",
       "granitehybrid", "mamba2g"]
N_CTX = 128


def hf_speed(hf_dir, tokens: torch.Tensor, n_chunks: int, bos: int | None) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    chunks = tokens[:n_chunks * N_CTX].view(n_chunks, N_CTX).clone()
    if bos is not None:
        chunks[:, 0] = bos
    first = N_CTX // 2
    best, ppl = float("inf"), 0.0
    with torch.inference_mode():
        hf(chunks[:4])
        for _ in range(2):
            nll, count, t0 = 0.0, 0, time.perf_counter()
            for i in range(0, n_chunks, 16):
                c = chunks[i:i + 16]
                lg = hf(c).logits[:, first:-1]
                v = token_nll(lg.reshape(-1, lg.shape[-1]), c[:, first + 1:].reshape(-1))
                nll, count = nll + float(v.sum()), count + v.numel()
            best, ppl = min(best, time.perf_counter() - t0), math.exp(nll / count)
    return ppl, n_chunks * N_CTX / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_host_memory()
    sh = fixtures.shared_dir()
    text = (sh / "data" / "wikitext-2-test.txt").read_bytes()[:200_000]
    rows = [(n, sh / "models" / "gguf" / f"{n}-tiny-f32.gguf", sh / "models" / f"{n}-tiny-hf") for n in ZOO]
    rows.append(("SmolLM2-135M Q4_1", fixtures.smollm2_path(), None))
    print(f"-c {N_CTX}, {a.chunks} chunks, {a.threads} threads; tokens/s (PPL)")
    print("| model | ours | transformers | llama.cpp | ours / transformers | ours / llama.cpp |\n|---|---:|---:|---:|---:|---:|")
    for name, path, hf_dir in rows:
        tok = Tokenizer.from_gguf(GGUFFile(path))
        ids = torch.tensor(tok.encode(text.decode("utf-8", errors="ignore"), add_special=True))
        bos = tok.bos_id if tok.add_bos else None
        m = load_model(path)
        perplexity(m, ids, N_CTX, n_chunks=8, bos=bos)  # warm-up
        best, r = float("inf"), None
        for _ in range(2):
            t0 = time.perf_counter()
            r = perplexity(m, ids, N_CTX, n_chunks=a.chunks, bos=bos)
            best = min(best, time.perf_counter() - t0)
        ours = a.chunks * N_CTX / best
        hf = hf_speed(hf_dir, ids, a.chunks, bos) if hf_dir is not None and (hf_dir / "config.json").is_file() else None
        lc = llama_cpp_speed(a.llama_cpp, path, text, N_CTX, a.chunks, a.threads) if a.llama_cpp else None
        cell = lambda x: "—" if x is None else f"{x[1]:,.0f} ({x[0]:.4f})"  # noqa: E731
        ratio = lambda x: "—" if x is None else f"{ours / x[1]:.2f}x"  # noqa: E731
        print(f"| {name} | {ours:,.0f} ({r.ppl:.4f}) | {cell(hf)} | {cell(lc)} | {ratio(hf)} | {ratio(lc)} |", flush=True)


if __name__ == "__main__":
    main()
