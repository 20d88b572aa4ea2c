"""Set-up every command shares: the compute dtype option, numerics from flags, opening a model."""
from __future__ import annotations

import click
import torch

from gguf_runtime.errors import GGUFRuntimeError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def dtype(name: str) -> torch.dtype:
    dt = DTYPES.get(name)
    if dt is None:
        raise GGUFRuntimeError(f"unknown --dtype '{name}' (use f32, f16 or bf16)")
    return dt


def numerics(ggml: bool = False, ctk: str | None = None, ctv: str | None = None):
    """The command's :class:`~gguf_runtime.numerics.Numerics`, from the root ``--[no-]invariant`` and
    the command's own flags, put in force for the rest of the command (a CLI process runs one
    command, so it stays in force until exit)."""
    from gguf_runtime import numerics as nxm

    root = click.get_current_context(silent=True)
    invariant = True
    if root is not None and isinstance(root.find_root().obj, dict):
        invariant = root.find_root().obj.get("invariant", True)
    return nxm.enter(nxm.Numerics.from_flags(invariant=invariant, ggml=ggml, ctk=ctk, ctv=ctv))


def open_model(path, device=None, dtype_name: str = "f32"):
    """``(GGUFFile, Tokenizer, model)`` for a GGUF path."""
    from gguf_runtime.gguf.reader import GGUFFile
    from gguf_runtime.models import load_model
    from gguf_runtime.tokenizer import Tokenizer

    dt = dtype(dtype_name)
    f = GGUFFile(path)
    tok = Tokenizer.from_gguf(f)
    return f, tok, load_model(f, device=device, dtype=dt)
