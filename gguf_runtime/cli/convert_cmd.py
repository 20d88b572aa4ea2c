"""``gguf-runtime convert DIR --outtype f32|f16|bf16|q8_0 --outfile OUT.gguf``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

COMMAND_KWARGS = {"help": "Convert a Hugging Face or state-spaces checkpoint folder to GGUF (as llama.cpp's converter)."}


def command(
    model_dir: Path = typer.Argument(..., help="Checkpoint folder: config.json, weights, tokenizer."),
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0, or auto (f16/bf16 after the weights)."),
    outfile: Optional[Path] = typer.Option(None, "--outfile", help="Output file (default ./<folder>-<outtype>.gguf)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    vocab_pre: Optional[str] = typer.Option(None, "--vocab-pre", help="BPE pre-tokenizer name (llama.cpp's, e.g. qwen2, gpt-2, llama-bpe) when the tokenizer is not recognised."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="general.name to write (default: model card, else folder name)."),
) -> None:
    from gguf_runtime.convert.hf import convert

    logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py's per-token notices
    out = convert(model_dir, outfile, outtype, progress=not quiet, vocab_pre=vocab_pre, model_name=model_name)
    typer.echo(str(out))
