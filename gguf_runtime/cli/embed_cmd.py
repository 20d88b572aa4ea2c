"""`gguf-runtime embed`: llama-embedding. The prompt (-p, or the file -f) is split on --embd-separator
into texts, each becomes its own sequence; texts are packed into batches of -b tokens, decoded in
ubatches of -ub, pooled per sequence, normalised, and printed in llama-embedding's formats on stdout."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

from gguf_runtime.cli.common import WEIGHTS_HELP
from gguf_runtime.errors import GGUFRuntimeError

COMMAND_KWARGS = {"help": "Embed texts (BERT, Llama, Mamba GGUFs) with llama-embedding's pooling, normalisation and formats."}

_ESC = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def process_escapes(s: str) -> str:
    r"""llama.cpp's string_process_escapes: \n \r \t \' \" \\ and \xHH; other sequences stay as written."""
    def sub(m: re.Match) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if e[0] == "x" else _ESC.get(e, "\\" + e)
    return re.sub(r"\\(x[0-9a-fA-F]{2}|.)", sub, s, flags=re.S)


def command(
    model: Path = typer.Option(..., "-m", "--model", help="GGUF model (BERT, Llama, Mamba, ...)"),
    prompt: Optional[list[str]] = typer.Option(None, "-p", "--prompt", metavar="<str>",
                                               help="texts, separated by --embd-separator (given twice, the last "
                                                    "counts, as in llama-embedding)"),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="file holding the texts (one per line by default)"),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="none, mean, cls, last, rank (default: the file's)"),
    embd_normalize: int = typer.Option(2, "--embd-normalize",
                                       help="-1 none, 0 max-abs int16, 1 taxicab, 2 euclidean, >2 p-norm"),
    embd_output_format: str = typer.Option("", "--embd-output-format",
                                           help="'' listing, array, json, json+ (with cosine matrix), raw"),
    embd_separator: str = typer.Option("\n", "--embd-separator", help="separator of the texts (default newline)",
                                       show_default=False),
    cls_separator: str = typer.Option("\t", "--cls-separator", help="separator of query/document pairs (rank; default tab)",
                                      show_default=False),
    ctx_size: int = typer.Option(0, "-c", "--ctx-size", help="context size; the batch grows to fill it (0: -b)"),
    batch_size: int = typer.Option(2048, "-b", "--batch-size", help="tokens per batch (many texts per batch)"),
    ubatch_size: int = typer.Option(0, "-ub", "--ubatch-size", help="tokens per ubatch (0: -b for encoders, 512 otherwise)"),
    parallel: int = typer.Option(256, "-np", "--parallel", help="most texts (sequences) per batch"),
    threads: int = typer.Option(0, "-t", "--threads", help="CPU threads (0: torch default)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)"),
    dtype: str = typer.Option("f32", "--dtype", help="compute dtype: f32, f16, bf16"),
    weights: str = typer.Option("auto", "--weights", help="weights in memory: " + WEIGHTS_HELP),
):
    from gguf_runtime.cli import common
    from gguf_runtime.tools.embedding import FORMATS, POOLINGS, Embedder, format_embeddings

    if (prompt is None) == (file is None):
        raise GGUFRuntimeError("give the texts with exactly one of -p TEXT or -f FILE")
    if pooling is not None and pooling not in POOLINGS:
        raise GGUFRuntimeError(f"invalid --pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
    if embd_output_format not in FORMATS:
        raise GGUFRuntimeError(f"invalid --embd-output-format '{embd_output_format}' (choose from array, json, json+, raw)")
    if embd_normalize < -1:
        raise GGUFRuntimeError(f"invalid --embd-normalize {embd_normalize} (-1, 0, 1, 2 or a p-norm order > 2)")
    if not embd_separator:
        raise GGUFRuntimeError("--embd-separator must not be empty")
    for name, v in (("-b", batch_size), ("-np", parallel)):
        if v <= 0:
            raise GGUFRuntimeError(f"{name} must be positive, got {v}")
    for name, v in (("-c", ctx_size), ("-ub", ubatch_size), ("-t", threads)):
        if v < 0:
            raise GGUFRuntimeError(f"{name} must not be negative, got {v}")
    common.dtype(dtype)
    common.weights(weights)
    common.threads(threads)
    common.device(device)
    if prompt is not None and len(prompt) > 1:  # llama.cpp's -p overwrites: the last one counts
        print(f"embed: -p given {len(prompt)} times: using the last one, as llama-embedding does; put several "
              f"texts in one -p, separated by --embd-separator (default: newline)", file=sys.stderr)

    if file is not None:
        from gguf_runtime.tools.tasks.data import read_prompt_file  # regular files only, never a FIFO

        try:
            text = read_prompt_file(file).decode("utf-8")  # one trailing newline dropped, as before
        except UnicodeDecodeError as e:
            raise GGUFRuntimeError(f"cannot read prompt file {file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        text = prompt[-1]
    prompts = process_escapes(text).split(embd_separator)

    common.numerics()
    f, tok, m = common.open_model(model, device, dtype, weights)
    emb = Embedder(m, pooling, n_batch=batch_size, n_ubatch=ubatch_size or None, n_seq_max=parallel, n_ctx=ctx_size)
    if emb.pooling == "rank":
        joiner = "".join(tok.token_to_piece(t) for t, on in ((tok.eos_id, tok.add_eos), (tok.sep_id, tok.add_sep))
                         if on and t is not None)
        prompts_tok = [joiner.join(p.split(cls_separator)) for p in prompts]
    else:
        prompts_tok = prompts
    seqs = [tok.encode(p, add_special=True, parse_special=True) for p in prompts_tok]
    from gguf_runtime.tools.distributed import Dist, Runner

    dist = Dist.from_env()  # under torchrun the texts are shared among the ranks; rank 0 alone prints
    if dist.world == 1:
        vecs = emb.embed_tokens(seqs, embd_normalize)
    else:  # a text's vector does not depend on its batch neighbours (batch invariance): same bytes
        done = Runner(dist).iterate(len(seqs), parallel, lambda ids: emb.embed_tokens([seqs[i] for i in ids], embd_normalize))
        vecs = [v for _, v in done]
        if not dist.is_main:
            return
    import torch

    rows = torch.cat(vecs) if emb.pooling == "none" else torch.stack(vecs)
    labels = list(m.args.cls_labels)
    listing = format_embeddings(rows, embd_output_format, embd_normalize, prompts, emb.pooling, labels)
    if emb.pooling == "none" and embd_output_format == "":  # say which text and token each row is
        where = [f"text {k}, token {i} {tok.token_to_piece(t)!r}" for k, s in enumerate(seqs) for i, t in enumerate(s)]
        listing = re.sub(r"^embedding (\d+): ", lambda mo: f"embedding {mo[1]} ({where[int(mo[1])]}): ", listing,
                         flags=re.M)
    sys.stdout.write(listing)
    sys.stdout.flush()
