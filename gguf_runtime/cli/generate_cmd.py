"""`gguf-runtime generate -m FILE -p PROMPT -n N`: text generation using the KV / recurrent cache."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
import typer

from gguf_runtime.errors import GGUFRuntimeError

COMMAND_KWARGS = {"help": "Generate text from a prompt (greedy with --temp 0, else seeded sampling)."}


def command(
    model: Path = typer.Option(..., "-m", "--model", help="GGUF model file"),
    prompt: str = typer.Option("", "-p", "--prompt", help="prompt text"),
    n_predict: int = typer.Option(64, "-n", "--n-predict", help="number of tokens to predict"),
    ctx_size: int = typer.Option(0, "-c", "--ctx-size", help="context size (0 = prompt + n_predict)"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size"),
    ubatch_size: int = typer.Option(512, "-ub", "--ubatch-size"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    seed: int = typer.Option(-1, "-s", "--seed", help="RNG seed (-1 = random)"),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0 = torch default)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)"),
    dtype: str = typer.Option("f32", "--dtype", help="compute dtype: f32, f16, bf16"),
):
    from gguf_runtime.cli import common
    from gguf_runtime.context import Context
    from gguf_runtime.tools.generate import Sampler, SamplerParams, generate

    if n_predict < 0:
        raise GGUFRuntimeError(f"-n must be >= 0, got {n_predict}")
    if threads > 0:
        torch.set_num_threads(threads)
    common.dtype(dtype)
    common.numerics()
    f, tok, m = common.open_model(model, device, dtype)
    ids = tok.encode(prompt, add_special=True)
    if not ids:
        raise GGUFRuntimeError("the prompt tokenized to nothing and the model adds no BOS: give -p")
    n_ctx = ctx_size or len(ids) + n_predict
    if len(ids) + n_predict > n_ctx:
        raise GGUFRuntimeError(f"prompt ({len(ids)} tokens) + -n {n_predict} exceeds the context size -c {n_ctx}")
    ctx = Context(m, n_ctx=n_ctx, n_batch=batch_size, n_ubatch=ubatch_size)
    if seed < 0:
        seed = int(time.time_ns() % (2**31))
    sampler = Sampler(SamplerParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    t_first = None
    out: list[int] = []
    base = tok.decode(ids, skip_special=True)  # decode prompt + output together: spacing stays right
    prev = ""
    for t in generate(ctx, ids, n_predict, sampler, is_eog=tok.is_eog):
        if t_first is None:
            t_first = time.perf_counter()
        if tok.is_eog(t):
            break
        out.append(t)
        text = tok.decode(ids + out, skip_special=True)[len(base):]
        if text.endswith("\ufffd"):  # half of a UTF-8 character: wait for the rest
            continue
        sys.stdout.write(text[len(prev):])
        sys.stdout.flush()
        prev = text
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    pe = (t_first or t1) - t0
    ge = t1 - (t_first or t1)
    print(f"prompt eval time = {pe * 1e3:10.2f} ms / {len(ids):5d} tokens ({pe * 1e3 / max(1, len(ids)):8.2f} ms per token, "
          f"{len(ids) / pe if pe else 0:8.2f} tokens per second)", file=sys.stderr)
    n_gen = max(0, len(out) - 1)
    print(f"       eval time = {ge * 1e3:10.2f} ms / {n_gen:5d} runs   ({ge * 1e3 / max(1, n_gen):8.2f} ms per token, "
          f"{n_gen / ge if ge else 0:8.2f} tokens per second)", file=sys.stderr)
    print(f"sampler seed: {seed}", file=sys.stderr)
