"""`gguf-runtime perplexity`: llama-perplexity's perplexity, HellaSwag, WinoGrande, multiple choice
and KL-divergence. Result lines (llama.cpp's) go to stdout, progress and info to stderr. With no -m
and no -f it scores SmolLM2-135M on the bundled sample text."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
import time
from pathlib import Path
from typing import Optional

import typer

from gguf_runtime.cli.common import WEIGHTS_HELP
from gguf_runtime.errors import GGUFRuntimeError

BUNDLED_CHUNKS = 8  # keeps the no-argument demo well under a minute on 2 cores
COMMAND_KWARGS = {"help": "Perplexity, HellaSwag, WinoGrande, multiple choice and KL-divergence, as llama-perplexity."}


# under torchrun only rank 0 prints (the others compute their share quietly)
_QUIET = int(os.environ.get("RANK", "0") or 0) > 0


def _info(msg: str) -> None:
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def _out(msg: str = "", end: str = "\n") -> None:
    if not _QUIET:
        sys.stdout.write(msg + end)
        sys.stdout.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


PLAIN_EVERY_S = 10.0  # without a terminal, a progress line at most this often (and the first, the last)


@contextmanager
def _progress(label: str, enabled: bool):
    """Progress on stderr; yields ``update(done, total, extra="")``. On a terminal a rich bar; piped
    or logged, plain lines (``label: done/total, extra, ETA``) that a log keeps."""
    if not enabled:
        yield lambda done, total, extra="": None
        return
    if not _isatty(sys.stderr):
        t0 = time.perf_counter()
        last = [-PLAIN_EVERY_S]

        def plain(done, total, extra=""):
            now = time.perf_counter() - t0
            if done != total and now - last[0] < PLAIN_EVERY_S:
                return
            last[0] = now
            eta = f", ETA {(total - done) * now / done / 60:.2f} minutes" if total and done and done < total else ""
            _info(f"{label}: {done}/{total or '?'}{', ' + extra if extra else ''}{eta}")
        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[extra]}"), console=Console(stderr=True), transient=True,
                  redirect_stdout=False) as p:
        task = p.add_task(label, total=None, extra="")
        yield lambda done, total, extra="": p.update(task, completed=done, total=total, extra=extra)


def command(
    model: Optional[Path] = typer.Option(None, "-m", "--model", help="GGUF model (default: SmolLM2-135M Q4_1)"),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="text / task file (default: bundled sample text)"),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", help="chunk length (perplexity) / context per sequence; 0: the model's training context"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", help="logical batch: n_batch // c chunks decode together"),
    ubatch_size: int = typer.Option(512, "-ub", "--ubatch-size", help="physical micro-batch"),
    swa_full: bool = typer.Option(False, "--swa-full", help="sliding-window layers keep every position (full-size SWA cache)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="score at most this many chunks (default: all, as -1; "
                                         f"{BUNDLED_CHUNKS} on the bundled text)"),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: torch default)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)"),
    dtype: str = typer.Option("f32", "--dtype", help="compute dtype: f32, f16, bf16"),
    weights: str = typer.Option("auto", "--weights", help="weights in memory: " + WEIGHTS_HELP),
    hellaswag: bool = typer.Option(False, "--hellaswag", help="HellaSwag score of the tasks in -f"),
    hellaswag_tasks: int = typer.Option(400, "--hellaswag-tasks", help="number of HellaSwag tasks"),
    winogrande: bool = typer.Option(False, "--winogrande", help="WinoGrande score of the CSV in -f"),
    winogrande_tasks: int = typer.Option(0, "--winogrande-tasks", help="number of WinoGrande tasks (0: all)"),
    multiple_choice: bool = typer.Option(False, "--multiple-choice", help="multiple-choice score of the binary task file -f"),
    multiple_choice_tasks: int = typer.Option(0, "--multiple-choice-tasks", help="number of tasks (0: all)"),
    kl_divergence_base: Optional[Path] = typer.Option(None, "--kl-divergence-base", "--save-all-logits",
                                                      help="logits file: written by a perplexity run, read by --kl-divergence"),
    kl_divergence: bool = typer.Option(False, "--kl-divergence", help="KL-divergence against --kl-divergence-base"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="record finished chunks in FILE as the run goes; "
                                          "a run restarted with the same FILE computes only the rest"),
    cache_type_k: Optional[str] = typer.Option(None, "-ctk", "--cache-type-k",
                                               help="KV cache type for K: f32, f16, bf16 (default: --dtype; f16 with --ggml-numerics)"),
    cache_type_v: Optional[str] = typer.Option(None, "-ctv", "--cache-type-v", help="KV cache type for V (as -ctk)"),
    ggml_numerics: bool = typer.Option(False, "--ggml-numerics",
                                       help="round as llama.cpp's CPU backend does (Q8 activations for quantized "
                                            "weights, f16 KV cache) to reproduce its scores; default: exact float math"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress on stderr (a bar on a terminal, else a line every "
                                                                    f"{PLAIN_EVERY_S:.0f} s)"),
):
    from gguf_runtime import fixtures
    from gguf_runtime.cli import common
    from gguf_runtime.tools import tasks

    modes = [n for n, on in (("--hellaswag", hellaswag), ("--winogrande", winogrande),
                             ("--multiple-choice", multiple_choice), ("--kl-divergence", kl_divergence)) if on]
    if len(modes) > 1:
        raise GGUFRuntimeError(f"choose one of {', '.join(modes)}")
    mode = modes[0] if modes else "perplexity"
    if kl_divergence and kl_divergence_base is None:
        raise GGUFRuntimeError("--kl-divergence needs --kl-divergence-base FILE (written by an earlier run)")
    if mode in ("--hellaswag", "--winogrande", "--multiple-choice") and file is None:
        raise GGUFRuntimeError(f"{mode} needs -f TASK_FILE")
    for name, v in (("-b", batch_size), ("-ub", ubatch_size)):
        if v <= 0:
            raise GGUFRuntimeError(f"{name} must be positive, got {v}")
    if ctx_size < 0:
        raise GGUFRuntimeError(f"-c must be >= 0 (0: the model's training context), got {ctx_size}")
    if chunks is not None and (chunks == 0 or chunks < -1):
        raise GGUFRuntimeError(f"--chunks must be a positive number of chunks or -1 for all, got {chunks}")
    if mode == "perplexity" and ctx_size:
        from gguf_runtime.tools.perplexity import check_batch

        check_batch(ctx_size, batch_size)
    common.threads(threads)
    common.dtype(dtype)
    common.weights(weights)
    common.device(device)
    nx = common.numerics(ggml=ggml_numerics, ctk=cache_type_k, ctv=cache_type_v)

    if model is None:
        model = fixtures.smollm2_path()
        _info(f"model: {model} (default)")
    if mode == "perplexity" and file is None:
        file = fixtures.bundled_text()
        if chunks is None:
            chunks = BUNDLED_CHUNKS
        _info(f"text: {file} (bundled sample; first {chunks} chunks, --chunks -1 for all)")
    if chunks is None:
        chunks = -1
    f, tok, m = common.open_model(model, device, dtype, weights)
    if ctx_size == 0:  # llama.cpp: -c 0 is the context the model was trained with
        ctx_size = m.args.n_ctx_train
        _info(f"-c 0: the model's training context, {ctx_size}")
        if mode == "perplexity":
            from gguf_runtime.tools.perplexity import check_batch

            check_batch(ctx_size, batch_size)
    if (cache_type_k or cache_type_v) and f.arch in ("mamba", "mamba2", "bert"):
        _info(f"-ctk/-ctv: {f.arch} has no KV cache; ignored")
    if ggml_numerics:
        kv = "/".join(str(t).removeprefix("torch.") for t in nx.kv_dtypes(m.dtype))
        _info(f"ggml numerics: activations rounded to each weight type's vec_dot_type, KV cache {kv}")
    bos = tok.bos_id if tok.add_bos else None

    if mode == "--kl-divergence":
        base = tasks.LogitsFile.read(kl_divergence_base)
        _info(f"kl_divergence: computing over {base.n_chunk} chunks, n_ctx={base.n_ctx}, batch_size={batch_size}")
        with _progress("KL-divergence", progress) as upd:
            tasks.kl_divergence(m, base, batch_size, ubatch_size, bos, emit=_out, progress=upd,
                                runner=_runner(resume, model=common_identity(model), base=common_identity(kl_divergence_base),
                                               mode=mode, bos=bos, numerics=nx.describe(), dtype=dtype,
                                               device=str(m.device.type)))
        return

    data = tasks.read_prompt_file(file)
    if mode == "perplexity":
        _perplexity(m, tok, data, ctx_size, batch_size, ubatch_size, chunks, bos, kl_divergence_base, progress,
                    _runner(resume, model=common_identity(model), text=_digest(data), n_ctx=ctx_size, chunks=chunks,
                            bos=bos, numerics=nx.describe(), dtype=dtype, device=str(m.device.type)),
                    resume is not None, swa_full=swa_full)
        return

    ctx = tasks.make_task_context(m, ctx_size, batch_size, ubatch_size)
    runner = _runner(resume, model=common_identity(model), text=_digest(data), mode=mode, n_ctx=ctx_size,
                     n_tasks=(hellaswag_tasks, winogrande_tasks, multiple_choice_tasks), numerics=nx.describe(),
                     dtype=dtype, device=str(m.device.type))
    text = data.decode("utf-8", errors="replace")
    if mode == "--hellaswag":
        all_tasks = tasks.load_hellaswag(text)
        _info(f"hellaswag_score : loaded {len(all_tasks)} tasks from prompt.")
        chosen = tasks.select_hellaswag(all_tasks, hellaswag_tasks)
        _info(f"hellaswag_score : selecting {len(chosen)} {'randomized' if len(chosen) < len(all_tasks) else 'the first'} tasks.")
        with _progress("HellaSwag", progress) as upd:
            tasks.hellaswag(ctx, tok, chosen, emit=_out, progress=upd, runner=runner)
    elif mode == "--winogrande":
        data_w = tasks.load_winogrande(text, warn=lambda s: _info(f"load_winogrande_from_csv: {s}"))
        if not data_w:
            raise GGUFRuntimeError(f"no WinoGrande tasks in {file}")
        _info(f"winogrande_score : loaded {len(data_w)} tasks from prompt.")
        if 0 < winogrande_tasks < len(data_w):
            data_w = [data_w[i] for i in tasks.pick_swap_remove(len(data_w), winogrande_tasks)]
        with _progress("WinoGrande", progress) as upd:
            tasks.winogrande(ctx, tok, data_w, emit=_out, progress=upd, runner=runner)
    else:
        mc = tasks.load_multiple_choice(data, multiple_choice_tasks)
        _info(f"multiple_choice_score : scoring {len(mc)} tasks")
        with _progress("multiple choice", progress) as upd:
            tasks.multiple_choice(ctx, tok, mc, emit=_out, progress=upd, runner=runner)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def common_identity(path) -> dict:
    from gguf_runtime.tools.distributed import file_identity

    return file_identity(path)


def _runner(resume: Path | None, **key):
    """The chunk scheduler: this process alone, or torchrun's ranks (gloo on CPU, NCCL on CUDA);
    with ``--resume`` a log of the finished chunks, checked to belong to this run (``key``)."""
    from gguf_runtime.tools.distributed import Dist, ResumeLog, Runner, run_key

    dist = Dist.from_env()
    log = ResumeLog(resume, run_key(**key)) if (resume is not None and dist.is_main) else None
    if dist.world > 1:
        _info(f"perplexity: {dist.world} processes share the work (torch.distributed)")
    return Runner(dist, log)


def _perplexity(m, tok, data: bytes, n_ctx: int, n_batch: int, n_ubatch: int, chunks: int, bos: int | None,
                base_path: Path | None, show: bool, runner=None, resuming: bool = False, swa_full: bool = False) -> None:
    """llama-perplexity's output: the ``[i]ppl,`` values on one stdout line, each written as its chunk
    is scored (held back only while a progress bar shares the terminal with stdout), then the final
    estimate. On Ctrl-C the values so far and the estimate over the chunks scored are printed before
    the interrupt goes on (exit 130)."""
    import torch

    from gguf_runtime.tools import tasks
    from gguf_runtime.tools.perplexity import check_params, make_context, running_perplexity

    ids = torch.tensor(tok.encode(data.decode("utf-8", errors="replace"), add_special=True), dtype=torch.long)
    n_chunk = check_params(len(ids), n_ctx, n_batch)
    n_chunk = n_chunk if chunks < 0 else min(chunks, n_chunk)
    n_seq = max(1, n_batch // n_ctx)
    _info(f"perplexity: tokenized the input into {len(ids)} tokens")
    _info(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={min(n_batch, n_seq * n_ctx)}, n_seq={n_seq}")
    writer = None
    if base_path is not None and runner is not None and (runner.dist.world > 1 or resuming):
        raise GGUFRuntimeError("--kl-divergence-base is written by one process in one run: drop --resume / torchrun")
    if base_path is not None and n_chunk > 0:
        writer = tasks.LogitsWriter(base_path, n_ctx, m.args.n_vocab, n_chunk, ids)
        _info(f"perplexity: saving all logits to {base_path}")
    stream = not (show and _isatty(sys.stderr) and _isatty(sys.stdout))
    line: list[str] = []
    r = None
    try:
        with _progress("perplexity", show) as upd:
            for r in running_perplexity(make_context(m, n_ctx, n_batch, n_ubatch, swa_full), ids, n_ctx, n_batch, n_ubatch,
                                        n_chunk, bos, on_logits=writer, runner=runner):
                line.append(f"[{r.n_chunks}]{r.chunk_ppl[-1]:.4f},")
                if stream:
                    _out(line[-1], end="")
                upd(r.n_chunks, n_chunk, f"PPL {r.ppl:.4f}")
        if writer is not None:
            writer.close()
            writer = None
    except KeyboardInterrupt:
        _out("" if stream else "".join(line))
        if r is not None:
            _out(f"Estimate over {r.n_chunks} of {n_chunk} chunks (interrupted): PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
        _info(f"perplexity: interrupted after {r.n_chunks if r else 0} of {n_chunk} chunks"
              + ("; the logits file was not written" if writer is not None else ""))
        raise
    finally:
        if writer is not None:
            writer.abort()
    if r is None:  # a rank other than 0 under torchrun: its chunks went to rank 0
        return
    _out("" if stream else "".join(line))
    _out(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    _info(f"perplexity: {r.n_chunks * r.n_ctx} tokens in {r.seconds:.2f} s ({r.tokens_per_s:.1f} tokens/s)")
