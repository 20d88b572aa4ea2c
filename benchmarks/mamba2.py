"""Mamba2 perplexity throughput: ours against transformers' Mamba2ForCausalLM on its torch path (no
mamba_ssm / causal_conv1d kernels: the chunked SSD in plain torch) on the same model, text and
chunks, in one run; llama.cpp's llama-perplexity too when a binary is given or found.

    python benchmarks/mamba2.py [--chunks 100] [--threads 2] [--llama-cpp /path/to/llama-perplexity]

We score mamba2-tiny-f32.gguf and transformers the checkpoint it was converted from
(../shared/models/mamba2-tiny-hf), over the first 200,000 bytes of wikitext-2-test.txt at -c 128 as
llama-perplexity does: BOS replacing each chunk's first token, the second half of each chunk
scored, 16 chunks per batch (ours: ubatches of 16 x 32 tokens, the default -ub 512). Ours runs in
the default batch-invariant mode and with ``--no-invariant`` numerics. Wall-clock and CPU-time
throughputs are both printed: on a shared machine the wall clock measures the neighbours as much
as the code.
"""
from __future__ import annotations

import math
from pathlib import Path

from gguf_runtime.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP waits as the CLI's do (before torch starts its threads)

import torch  # noqa: E402
from mamba import N_CTX, N_SEQ, Clock, cli, header, llama_cpp, wiki  # benchmarks/mamba.py: Mamba's harness

from gguf_runtime import fixtures, numerics
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity, token_nll


def transformers_ppl(hf_dir: Path, tokens: torch.Tensor, n_chunks: int, bos: int) -> tuple[float, Clock]:
    from transformers import Mamba2ForCausalLM

    hf = Mamba2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    first = N_CTX // 2
    chunks = tokens[:n_chunks * N_CTX].view(n_chunks, N_CTX).clone()
    chunks[:, 0] = bos
    with torch.inference_mode():
        hf(chunks[:N_SEQ])  # warm-up
        nll = []
        with Clock() as clk:
            for i in range(0, n_chunks, N_SEQ):
                c = chunks[i:i + N_SEQ]
                logits = hf(c).logits[:, first:-1]
                nll.append(token_nll(logits.reshape(-1, logits.shape[-1]), c[:, first + 1:].reshape(-1)))
    return math.exp(float(torch.cat(nll).mean())), clk


def main() -> None:
    a = cli(100)
    path = fixtures.shared_dir() / "models" / "gguf" / "mamba2-tiny-f32.gguf"
    text, tok, tokens, n_chunks = wiki(path, a.chunks)
    n_tok = n_chunks * N_CTX

    model = load_model(path, device=a.device)
    rows = []
    for invariant in (True, False):
        numerics.enter(numerics.Numerics(invariant=invariant))
        perplexity(model, tokens, N_CTX, n_chunks=N_SEQ, bos=tok.bos_id)  # warm-up (matmul self-test, workspace)
        with Clock() as clk:
            r = perplexity(model, tokens, N_CTX, N_CTX * N_SEQ, n_chunks=n_chunks, bos=tok.bos_id)
        rows.append(("gguf-runtime" + ("" if invariant else " --no-invariant"), r.ppl, clk))
    numerics.enter(numerics.Numerics())
    hf_ppl, hf = transformers_ppl(fixtures.shared_dir() / "models" / "mamba2-tiny-hf", tokens, n_chunks, tok.bos_id)
    rows.append(("transformers", hf_ppl, hf))
    print(header("mamba2-tiny f32", n_chunks, a.threads, model.device))
    print(f"| {'':28s} | {'PPL':>10s} | {'tok/s wall':>10s} | {'tok/s CPU':>10s} |")
    print(f"|{'-' * 30}|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|")
    for name, ppl, clk in rows:
        print(f"| {name:28s} | {ppl:10.4f} | {n_tok / clk.wall:10.0f} | {n_tok / clk.cpu:10.0f} |")
    if a.llama_cpp:
        lc_ppl, lc_wall, lc_cpu = llama_cpp(a.llama_cpp, path, text, n_chunks, a.threads)
        print(f"| {'llama.cpp (CPU: whole run)':28s} | {lc_ppl:10.4f} | {n_tok / lc_wall:10.0f} | {n_tok / lc_cpu:10.0f} |")
    ours = rows[0][2]
    print(f"speed-up vs transformers: {hf.wall / ours.wall:.1f}x wall, {hf.cpu / ours.cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
