"""The ``gguf-runtime`` command. Each subcommand lives in its own module under cli/ and is imported
only when it runs (or its ``--help`` is asked for), so ``gguf-runtime --help`` answers without
importing torch. Errors of the project, bad flag values and usage errors become one line on stderr
and exit code 2; Ctrl-C exits 130."""
from __future__ import annotations

import importlib
import sys

import typer
from typer.core import TyperGroup

from gguf_runtime.errors import GGUFRuntimeError

# command name -> (module under gguf_runtime.cli exposing `command(...)`, one-line summary for the
# command list). The summary is the module's COMMAND_KWARGS["help"] (a test keeps them equal); it is
# kept here so listing the commands imports none of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd", "Show a GGUF file's architecture, metadata and tensors (like gguf-dump, readable)."),
    "convert": ("convert_cmd", "Convert a Hugging Face or state-spaces checkpoint folder to GGUF (as llama.cpp's converter)."),
    "quantize": ("quantize_cmd", "Quantize an f32/f16/bf16 GGUF (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S, Q4_K_M, "
                                 "Q5_K_S, Q5_K_M, Q6_K; Q4_K and Q5_K mean the _M mixes), as llama-quantize."),
    "perplexity": ("perplexity_cmd", "Perplexity, HellaSwag, WinoGrande, multiple choice and KL-divergence, as llama-perplexity."),
    "generate": ("generate_cmd", "Generate text from a prompt (greedy with --temp 0, else seeded sampling)."),
    "embed": ("embed_cmd", "Embed texts (BERT, Llama, Mamba GGUFs) with llama-embedding's pooling, normalisation and formats."),
    "drift": ("drift_cmd", "Per-layer drift of the last token between full recompute and cached decode."),
}

_SETTINGS = {"help_option_names": ["-h", "--help"]}
_loaded: dict = {}  # name -> click command (typer's click)


class Interrupted(Exception):
    """Ctrl-C inside a command (typer would turn a KeyboardInterrupt into a silent exit 130)."""


def _with_host_memory(fn):
    def run(*args, **kwargs):
        from gguf_runtime.device import keep_host_memory

        keep_host_memory()  # reuse freed activation memory instead of page-faulting fresh maps
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None
    return run


def load_command(name: str):
    """The click command of ``name``, built from its module on first use."""
    if name not in _loaded:
        module = importlib.import_module(f"gguf_runtime.cli.{COMMANDS[name][0]}")
        sub = typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False)
        sub.command(name=name, context_settings=_SETTINGS,
                    **getattr(module, "COMMAND_KWARGS", {}))(module.command)
        cmd = typer.main.get_command(sub)
        cmd.callback = _with_host_memory(cmd.callback)
        _loaded[name] = cmd
    return _loaded[name]


class LazyGroup(TyperGroup):
    """Lists the commands from :data:`COMMANDS` and imports a command's module only to run it."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        return load_command(name) if name in COMMANDS else None

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, summary) for n, (_, summary) in COMMANDS.items()])


def _version(value: bool) -> None:
    if value:
        from gguf_runtime import __version__

        typer.echo(f"gguf-runtime {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="gguf-runtime",
    cls=LazyGroup,
    help="A Python (torch) runtime for GGUF models.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: full option names at any width, no <bool> metavars
    context_settings=_SETTINGS,
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    invariant: bool = typer.Option(True, "--invariant/--no-invariant",
                                   help="batch-invariant numerics (default); --no-invariant trades them for raw speed"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    ctx.obj = {"invariant": invariant}  # read by cli.common.numerics
    if ctx.invoked_subcommand is None:  # bare `gguf-runtime`: the help, exit 0
        typer.echo(ctx.get_help())
        raise typer.Exit()


def _one_line(e: Exception) -> str:
    """A click (typer) error as one line; a usage error names the help to read."""
    msg = " ".join((e.format_message() if hasattr(e, "format_message") else str(e)).split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(e, "exit_code", 2) == 2:
        msg += f" (see '{ctx.command_path} --help')"
    return msg


def main(argv: list[str] | None = None) -> None:
    """The console script: always ends with ``sys.exit`` (0 ok, 2 bad input, 130 interrupted)."""
    from gguf_runtime.threads import set_wait_policy

    set_wait_policy()  # before anything imports torch (gguf_runtime/threads.py says why)
    try:
        rc = app(args=argv, prog_name="gguf-runtime", standalone_mode=False)
    except GGUFRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.TyperException as e:  # click's usage errors (bad value, unknown option or command): exit 2
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except (Interrupted, KeyboardInterrupt, typer.Abort):
        rc = 130
    if rc == 130:  # Ctrl-C (typer returns 130 itself when it lands outside a command)
        print("error: interrupted", file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
