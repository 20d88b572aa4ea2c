"""`gguf-runtime drift -m FILE -f TEXT --dtype f32|f16|bf16`: the #25420 table, reproduced then zeroed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gguf_runtime.cli.common import WEIGHTS_HELP
from gguf_runtime.errors import GGUFRuntimeError

COMMAND_KWARGS = {"help": "Per-layer drift of the last token between full recompute and cached decode."}


def command(
    model: Path = typer.Option(..., "-m", "--model", help="GGUF model file"),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="text file (default: the bundled sample)"),
    n_tokens: int = typer.Option(128, "-n", "--n-tokens", help="tokens of the text to use"),
    dtype: str = typer.Option("f32", "--dtype", help="compute dtype: f32, f16, bf16"),
    weights: str = typer.Option("auto", "--weights", help="weights in memory: " + WEIGHTS_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG bar chart here (needs matplotlib)"),
):
    from rich.console import Console
    from rich.table import Table

    from gguf_runtime import fixtures
    from gguf_runtime.cli import common
    from gguf_runtime.tools.drift import drift

    common.dtype(dtype)
    common.weights(weights)
    common.device(device)
    plt = _pyplot() if plot is not None else None  # before the computation, not after it
    if n_tokens < 2:
        raise GGUFRuntimeError(f"-n must be at least 2, got {n_tokens}")
    path = file or fixtures.bundled_text()
    if not Path(path).is_file():
        raise GGUFRuntimeError(f"{path}: no such text file")
    nx = common.numerics()
    f, tok, m = common.open_model(model, device, dtype, weights)
    ids = tok.encode(Path(path).read_text(encoding="utf-8", errors="replace"))[:n_tokens]
    if len(ids) < 2:
        raise GGUFRuntimeError(f"{path}: fewer than 2 tokens of text")
    rows = drift(m, ids, nx)
    t = Table(title=f"drift: full recompute vs cached prefix + 1 token ({len(ids)} tokens, {dtype})")
    t.add_column("output")
    t.add_column("invariant max|Δ|", justify="right")
    t.add_column("fast max|Δ|", justify="right")
    for r in rows:
        t.add_row(r.name, f"{r.invariant:.3e}", f"{r.fast:.3e}")
    Console().print(t)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r.fast for r in rows], 0.4, label="fast")
        ax.bar([i + 0.2 for i in x], [r.invariant for r in rows], 0.4, label="invariant")
        ax.set_xticks(list(x), [r.name for r in rows], rotation=30)
        ax.set_ylabel("max |Δ|")
        ax.set_title(f"drift ({dtype}): recompute vs cache")
        ax.legend()
        fig.tight_layout()
        tmp = Path(str(plot) + ".part")
        fig.savefig(tmp, format="png")
        tmp.replace(plot)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GGUFRuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt
