"""Set-up every command shares: the compute dtype option, numerics from flags, opening a model."""
from __future__ import annotations

import importlib

from gguf_runtime.errors import GGUFRuntimeError

# torch is imported inside the functions: a command module imports this one, and `--help` must not
# import torch.
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def dtype(name: str):
    """The torch dtype of ``--dtype name``."""
    import torch

    dt = DTYPES.get(name)
    if dt is None:
        raise GGUFRuntimeError(f"unknown --dtype '{name}' (use f32, f16 or bf16)")
    return getattr(torch, dt)


def device(name: str | None):
    """``--device``: None (cuda if present, else cpu), or a torch device this process can use."""
    if name is None or name == "auto":
        return None
    import torch

    try:
        d = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise GGUFRuntimeError(f"invalid --device '{name}' (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
            raise GGUFRuntimeError(f"--device {name}: this torch {torch.__version__} has no CUDA ({why}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise GGUFRuntimeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif d.type != "cpu":
        raise GGUFRuntimeError(f"--device {name}: unsupported device type '{d.type}' (use cpu, cuda or cuda:N)")
    return d


_device = device  # open_model's parameter shadows the name


def threads(n: int) -> None:
    """``-t N``: torch's CPU threads (0: the CPUs this process may use, less those other runnable
    tasks hold now: :func:`gguf_runtime.threads.default_threads`)."""
    if n < 0:
        raise GGUFRuntimeError(f"-t must be >= 0 (0: the free CPUs), got {n}")
    import torch

    from gguf_runtime.threads import default_threads

    torch.set_num_threads(n or default_threads())


WEIGHTS_HELP = ("resident (dequantized at load), lazy (kept in the file's types, dequantized layer by layer "
                "right before use), quant (kept in the file's types and multiplied as they are: least memory, "
                "fastest decode; CPU float32, else as auto), auto (lazy when resident would not fit in memory)")


def weights(name: str) -> str:
    """``--weights``: resident, lazy, quant or auto."""
    from gguf_runtime.models.base import WEIGHT_MODES

    if name not in WEIGHT_MODES:
        raise GGUFRuntimeError(f"unknown --weights '{name}' (use resident, lazy, quant or auto)")
    return name


def numerics(ggml: bool = False, ctk: str | None = None, ctv: str | None = None):
    """The command's :class:`~gguf_runtime.numerics.Numerics`, from the root ``--[no-]invariant`` and
    the command's own flags, put in force for the rest of the command (a CLI process runs one
    command, so it stays in force until exit)."""
    from gguf_runtime import numerics as nxm

    obj = _root_obj()
    invariant = obj.get("invariant", True) if isinstance(obj, dict) else True
    return nxm.enter(nxm.Numerics.from_flags(invariant=invariant, ggml=ggml, ctk=ctk, ctv=ctv))


def _root_obj():
    """The root command's ``ctx.obj`` (set by ``cli.main``'s callback), or None outside a command.
    Typer >= 0.29 runs on its own copy of click (``typer._click``), older ones on click."""
    for mod in ("typer._click.globals", "click"):
        try:
            get = importlib.import_module(mod).get_current_context
        except (ImportError, AttributeError):
            continue
        ctx = get(silent=True)
        if ctx is not None:
            return ctx.find_root().obj
    return None


def open_model(path, device=None, dtype_name: str = "f32", weights_mode: str = "auto"):
    """``(GGUFFile, Tokenizer, model)`` for a GGUF path; ``weights_mode``: see ``--weights``."""
    from gguf_runtime.gguf.reader import GGUFFile
    from gguf_runtime.models import load_model
    from gguf_runtime.tokenizer import Tokenizer

    dt = dtype(dtype_name)
    dev = _device(device) if isinstance(device, str) else device
    f = GGUFFile(path)
    tok = Tokenizer.from_gguf(f)
    return f, tok, load_model(f, device=dev, dtype=dt, weights=weights(weights_mode))
