"""`gguf-runtime generate -m FILE -p PROMPT -n N`: text generation using the KV / recurrent cache."""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from gguf_runtime.cli.common import WEIGHTS_HELP
from gguf_runtime.errors import GGUFRuntimeError

COMMAND_KWARGS = {"help": "Generate text from a prompt (greedy with --temp 0, else seeded sampling)."}


def command(
    model: Path = typer.Option(..., "-m", "--model", help="GGUF model file"),
    prompt: str = typer.Option("", "-p", "--prompt", help="prompt text"),
    n_predict: int = typer.Option(64, "-n", "--n-predict", help="number of tokens to predict"),
    ctx_size: Optional[int] = typer.Option(None, "-c", "--ctx-size",
                                           help="context size: KV cells shared by all sequences, as llama.cpp's total -c "
                                                "(default: N x (prompt + n_predict); 0 = the model's training context)"),
    n_parallel: int = typer.Option(1, "-np", "--parallel",
                                   help="N sequences from the prompt, decoded together one batch per step "
                                        "(sequence i samples with seed + i; printed '[i] ' after generation when N > 1)"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", help="logical batch: the prompt is decoded in pieces of this many tokens"),
    ubatch_size: int = typer.Option(512, "-ub", "--ubatch-size", help="physical micro-batch (tokens per forward pass)"),
    swa_full: bool = typer.Option(False, "--swa-full", help="sliding-window layers keep every position (full-size SWA cache)"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(0.95, "--top-p", help="keep the smallest set of tokens whose probability reaches p (1.0 = off)"),
    min_p: float = typer.Option(0.05, "--min-p", help="drop tokens less likely than p times the most likely one (0.0 = off)"),
    seed: int = typer.Option(-1, "-s", "--seed", help="RNG seed (-1 = random)"),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0 = torch default)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)"),
    dtype: str = typer.Option("f32", "--dtype", help="compute dtype: f32, f16, bf16"),
    weights: str = typer.Option("quant", "--weights", help="weights in memory (default quant: decode reads the "
                                "file's blocks, about 6x fewer bytes than float32): " + WEIGHTS_HELP),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache",
                                                help="state file: reuse its longest matching prompt prefix, save after the prompt"),
    prompt_cache_ro: bool = typer.Option(False, "--prompt-cache-ro", help="use --prompt-cache but do not update it"),
):
    from gguf_runtime.cli import common
    from gguf_runtime.context import Context
    from gguf_runtime.tools.generate import Sampler, SamplerParams, generate

    if n_predict < 0:
        raise GGUFRuntimeError(f"-n must be >= 0, got {n_predict}")
    if n_parallel < 1:
        raise GGUFRuntimeError(f"--parallel must be >= 1, got {n_parallel}")
    if n_parallel > 1 and prompt_cache is not None:
        raise GGUFRuntimeError("--prompt-cache works with --parallel 1 only")
    if ctx_size is not None and ctx_size < 0:
        raise GGUFRuntimeError(f"-c must be >= 0 (0: the model's training context), got {ctx_size}")
    for name, v in (("-b", batch_size), ("-ub", ubatch_size)):
        if v <= 0:
            raise GGUFRuntimeError(f"{name} must be positive, got {v}")
    if top_k < 0:
        raise GGUFRuntimeError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    for name, v in (("--top-p", top_p), ("--min-p", min_p)):
        if not 0.0 <= v <= 1.0:
            raise GGUFRuntimeError(f"{name} must be between 0 and 1, got {v}")
    common.threads(threads)
    common.dtype(dtype)
    common.weights(weights)
    common.device(device)
    nx = common.numerics()
    f, tok, m = common.open_model(model, device, dtype, weights)
    ids = tok.encode(prompt, add_special=True)
    if not ids:
        raise GGUFRuntimeError("the prompt tokenized to nothing and the model adds no BOS: give -p")
    if ctx_size is None:
        n_ctx = n_parallel * (len(ids) + n_predict)
    else:
        n_ctx = ctx_size or m.args.n_ctx_train  # llama.cpp: -c 0 is the model's training context
    if len(ids) + n_parallel * n_predict > n_ctx:  # the prompt's cells are shared by every sequence
        what = f"-n {n_predict}" if n_parallel == 1 else f"--parallel {n_parallel} x -n {n_predict}"
        raise GGUFRuntimeError(f"prompt ({len(ids)} tokens) + {what} exceeds the context size -c {n_ctx}")
    ctx = Context(m, n_ctx=n_ctx, n_batch=batch_size, n_ubatch=ubatch_size, n_seq_max=n_parallel, swa_full=swa_full)
    if nx.invariant:
        nx.linear_rule()  # the one-off calibration (kernels.calibrate), before the clock starts
    if seed < 0:
        seed = int(time.time_ns() % (2**31))
    if temp > 0 and n_parallel > 1:
        print(f"sampler seeds: {seed}..{seed + n_parallel - 1} (sequence i: seed + i)", file=sys.stderr, flush=True)
    elif temp > 0:  # as llama-cli, before generating; greedy decoding draws nothing
        print(f"sampler seed: {seed}", file=sys.stderr, flush=True)
    params = SamplerParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    if n_parallel > 1:
        return _parallel(ctx, tok, prompt, ids, n_predict, [Sampler(replace(params, seed=seed + i)) for i in range(n_parallel)])
    sampler = Sampler(params)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    n_eval, run_ids = len(ids), ids  # prompt tokens actually evaluated
    if prompt_cache is not None:
        from gguf_runtime import state

        reused = state.prompt_cache(ctx, prompt_cache, ids)
        n_eval, run_ids = len(ids) - reused, ids[-1:]
        print(f"prompt cache: reused {reused} of {len(ids)} prompt tokens from {prompt_cache}", file=sys.stderr)
    t_first = None
    out: list[int] = []
    eog = None
    base = tok.decode(ids, skip_special=True)  # decode prompt + output together: spacing stays right
    prev = ""
    for t in generate(ctx, run_ids, n_predict, sampler, is_eog=tok.is_eog):
        if t_first is None and prompt_cache is not None and not prompt_cache_ro:
            ctx.state_save(prompt_cache, tokens=ids)  # the state right after the prompt
        if t_first is None:
            t_first = time.perf_counter()
        if tok.is_eog(t):
            eog = t
            break
        out.append(t)
        text = tok.decode(ids + out, skip_special=True)[len(base):]
        if text.endswith("\ufffd"):  # half of a UTF-8 character: wait for the rest
            continue
        sys.stdout.write(text[len(prev):])
        sys.stdout.flush()
        prev = text
    t1 = time.perf_counter()
    if eog is not None:  # llama-cli's marker, on the text's own line
        sys.stdout.write(" [end of text]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if eog is not None:
        print(f"generate: end-of-generation token {eog} after {len(out)} of -n {n_predict} tokens", file=sys.stderr)
    _timings((t_first or t1) - t0, n_eval, t1 - (t_first or t1), max(0, len(out) - 1), "runs  ")


def _timings(pe: float, n_prompt: int, ge: float, n_gen: int, unit: str) -> None:
    """llama.cpp's ``prompt eval time`` and ``eval time`` lines (seconds and counts of each phase)."""
    print(f"prompt eval time = {pe * 1e3:10.2f} ms / {n_prompt:5d} tokens ({pe * 1e3 / max(1, n_prompt):8.2f} ms per token, "
          f"{n_prompt / pe if pe else 0:8.2f} tokens per second)", file=sys.stderr)
    print(f"       eval time = {ge * 1e3:10.2f} ms / {n_gen:5d} {unit} ({ge * 1e3 / max(1, n_gen):8.2f} ms per token, "
          f"{n_gen / ge if ge else 0:8.2f} tokens per second)", file=sys.stderr)


def _parallel(ctx, tok, prompt: str, ids: list[int], n_predict: int, samplers) -> None:
    """``--parallel N``: decode the N sequences together, then print each one as ``[i] text``."""
    from gguf_runtime.tools import generate as gen

    n = len(samplers)
    outs: list[list[int]] = [[] for _ in range(n)]
    eog: dict[int, int] = {}
    t0 = time.perf_counter()
    t_first, n_dec, n_steps = None, 0, 0
    for step in gen.generate_parallel(ctx, ids, n_predict, samplers, is_eog=tok.is_eog):
        if t_first is None:
            t_first = time.perf_counter()
        else:  # every step after the first decoded one token per sequence it lists
            n_dec, n_steps = n_dec + len(step), n_steps + 1
        for s, t in step:
            if tok.is_eog(t):
                eog[s] = t
            else:
                outs[s].append(t)
    t1 = time.perf_counter()
    base = tok.decode(ids, skip_special=True)
    for s, out in enumerate(outs):
        end = " [end of text]" if s in eog else ""
        text = tok.decode(ids + out, skip_special=True)[len(base):].rstrip("\ufffd")  # as streamed: no half character
        sys.stdout.write(f"[{s}] {prompt}{text}{end}\n")
    sys.stdout.flush()
    for s in sorted(eog):
        print(f"generate: sequence {s}: end-of-generation token {eog[s]} after {len(outs[s])} of -n {n_predict} tokens",
              file=sys.stderr)
    n_gen = sum(map(len, outs))
    _timings((t_first or t1) - t0, len(ids), t1 - (t_first or t1), n_dec, "tokens")
    print(f"parallel: {n} sequences, {n_steps} batched steps, {n_gen} tokens generated; "
          f"Total gen tokens: {n_gen:6d}, speed: {n_gen / (t1 - t0) if t1 > t0 else 0:8.2f} t/s (prompt included)",
          file=sys.stderr)
