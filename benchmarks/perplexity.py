"""Perplexity throughput: ours against transformers scoring the same chunks of the same model, one run.

    python benchmarks/perplexity.py [--chunks 683] [--threads 2] [--llama-cpp /path/to/llama-perplexity]

Both score llama-tiny (../shared/models/gguf/llama-tiny-f32.gguf; transformers loads the same GGUF)
over the first 200,000 bytes of wikitext-2-test.txt at -c 128, the way llama-perplexity does: BOS
replacing each chunk's first token, the second half of each chunk scored, 16 chunks per batch.
With ``--llama-cpp`` the llama-perplexity binary is timed on the same input too.
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402

from gguf_runtime import fixtures, numerics
from gguf_runtime.device import keep_host_memory
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity, token_nll
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer


def transformers_ppl(path: Path, tokens: torch.Tensor, n_ctx: int, n_chunks: int, bos: int, n_seq: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    first = n_ctx // 2
    chunks = tokens[:n_chunks * n_ctx].view(n_chunks, n_ctx).clone()
    chunks[:, 0] = bos
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_chunks, n_seq):
            c = chunks[i:i + n_seq]
            logits = hf(c).logits[:, first:-1]
            v = token_nll(logits.reshape(-1, logits.shape[-1]), c[:, first + 1:].reshape(-1))
            nll += float(v.sum())
            count += v.numel()
    return math.exp(nll / count), time.perf_counter() - t0


def _stamp(text: str, marker: str) -> float:
    """Seconds of llama.cpp's log stamp (M.SS.mmm.uuu) on the entry ``marker`` starts."""
    m, s, ms, us = (int(x) for x in re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I " + re.escape(marker), text).groups())
    return m * 60 + s + ms / 1e3 + us / 1e6


def llama_cpp_speed(binary: str, model: Path, text: bytes, n_ctx: int, n_chunks: int, threads: int) -> tuple[float, float]:
    """PPL and tokens/s of llama-perplexity, timed from its log stamps (chunk loop start to final line)."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        f.write(text)
        f.flush()
        p = subprocess.run([binary, "-m", str(model), "-f", f.name, "-c", str(n_ctx), "--chunks", str(n_chunks),
                            "-t", str(threads)], capture_output=True, text=True)
    log = p.stdout + p.stderr
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", log).group(1))
    seconds = _stamp(log, "Final estimate") - _stamp(log, "perplexity: calculating perplexity over")
    return ppl, n_chunks * n_ctx / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=683)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--llama-cpp", default=None, help="path to llama-perplexity, to time it on the same input")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_host_memory()
    shared = fixtures.shared_dir()
    path = shared / "models" / "gguf" / "llama-tiny-f32.gguf"
    text = (shared / "data" / "wikitext-2-test.txt").read_bytes()[:200_000]
    tok = Tokenizer.from_gguf(GGUFFile(path))
    tokens = torch.tensor(tok.encode(text.decode("utf-8"), add_special=True))
    n_ctx, n_batch = 128, 2048
    n_chunks = min(a.chunks, len(tokens) // n_ctx)

    model = load_model(path, device=a.device)
    perplexity(model, tokens, n_ctx, n_chunks=2, bos=tok.bos_id)  # warm-up (matmul self-test)
    r = perplexity(model, tokens, n_ctx, n_batch, n_chunks=n_chunks, bos=tok.bos_id)
    numerics.enter(numerics.Numerics(invariant=False))
    perplexity(model, tokens, n_ctx, n_chunks=2, bos=tok.bos_id)
    rf = perplexity(model, tokens, n_ctx, n_batch, n_chunks=n_chunks, bos=tok.bos_id)
    numerics.enter(numerics.Numerics())
    hf_ppl, hf_s = transformers_ppl(path, tokens, n_ctx, n_chunks, tok.bos_id, n_batch // n_ctx)
    n_tok = n_chunks * n_ctx
    print(f"llama-tiny f32, -c {n_ctx}, {n_chunks} chunks ({n_tok} tokens), {a.threads} threads, device {model.device}")
    print(f"{'':14s} {'PPL':>10s} {'tokens/s':>10s}")
    print(f"{'gguf-runtime':14s} {r.ppl:10.4f} {r.tokens_per_s:10.1f}")
    print(f"{'--no-invariant':14s} {rf.ppl:10.4f} {rf.tokens_per_s:10.1f}")
    print(f"{'transformers':14s} {hf_ppl:10.4f} {n_tok / hf_s:10.1f}")
    if a.llama_cpp:
        lc_ppl, lc_tps = llama_cpp_speed(a.llama_cpp, path, text, n_ctx, n_chunks, a.threads)
        print(f"{'llama.cpp':14s} {lc_ppl:10.4f} {lc_tps:10.1f}")
    print(f"speed-up vs transformers: {r.tokens_per_s / (n_tok / hf_s):.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
