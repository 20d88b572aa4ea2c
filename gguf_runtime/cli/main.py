"""The ``gguf-runtime`` command. Each subcommand lives in its own module under cli/ and is
registered here; errors of the project become one line on stderr and exit code 2."""
from __future__ import annotations

import importlib
import sys

import typer

from gguf_runtime.errors import GGUFRuntimeError

app = typer.Typer(
    name="gguf-runtime",
    help="A Python (torch) runtime for GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def _root(
    ctx: typer.Context,
    invariant: bool = typer.Option(True, "--invariant/--no-invariant",
                                   help="batch-invariant numerics (default); --no-invariant trades them for raw speed"),
) -> None:
    from gguf_runtime.device import keep_host_memory

    ctx.obj = {"invariant": invariant}  # read by cli.common.numerics
    keep_host_memory()  # reuse freed activation memory instead of page-faulting fresh maps


# (module under gguf_runtime.cli, command name). A module exposes `command(...)`.
COMMANDS = [
    ("inspect_cmd", "inspect"),
    ("convert_cmd", "convert"),
    ("quantize_cmd", "quantize"),
    ("perplexity_cmd", "perplexity"),
    ("generate_cmd", "generate"),
    ("embed_cmd", "embed"),
    ("drift_cmd", "drift"),
]

for _mod, _name in COMMANDS:
    try:
        _m = importlib.import_module(f"gguf_runtime.cli.{_mod}")
    except ModuleNotFoundError as e:  # command not built yet
        if e.name != f"gguf_runtime.cli.{_mod}":
            raise
        continue
    app.command(name=_name, **getattr(_m, "COMMAND_KWARGS", {}))(_m.command)


def main() -> None:
    try:
        app()
    except GGUFRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
