"""``gguf-runtime quantize IN OUT TYPE``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

COMMAND_KWARGS = {"help": "Quantize an f32/f16/bf16 GGUF (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S, Q4_K_M, "
                          "Q5_K_S, Q5_K_M, Q6_K; Q4_K and Q5_K mean the _M mixes), as llama-quantize."}


def command(
    src: Path = typer.Argument(..., metavar="IN", help="Input GGUF (f32, f16 or bf16 weights)."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Output GGUF."),
    qtype: str = typer.Argument(..., metavar="TYPE", help="Target type, e.g. Q4_K_M."),
    pure: bool = typer.Option(False, "--pure", help="Same type for every quantizable tensor (no mixes)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Torch CPU threads."),
    device: Optional[str] = typer.Option(None, "--device", help="Device for the K-quant maths (cpu, cuda)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    from gguf_runtime.cli import common
    from gguf_runtime.convert.quantize import quantize

    common.threads(threads or 0)
    common.device(device)
    logging.getLogger("gguf").setLevel(logging.ERROR)
    typer.echo(str(quantize(src, dst, qtype, pure=pure, progress=not quiet, device=device)))
