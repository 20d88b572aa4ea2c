"""Session state: save a context (or one sequence) to a file and restore it, llama.cpp's
``llama_state_*`` and ``--prompt-cache`` (docs/state.md).

A state file is a safetensors file. Its tensors are the memory's own (``mem.*``, from
:meth:`Memory.state_tensors`: one mechanism per memory kind, whole or one sequence), the token
history the caller gives (``ctx.tokens``) and, for a whole context, the outputs of the last
``decode`` (``ctx.out_idx``, ``ctx.logits``, ``ctx.hidden``). Its metadata names the format and
version, the architecture, a hash of the model's hyperparameters and tensor table, the compute
dtype, the numerics (:meth:`Numerics.describe`, which carries the cache dtypes), the sequence saved
(empty: every one), the memory's own metadata (``mem.*``) and a CRC-32 of every tensor.

:func:`load` checks everything — the container, the checksum, the model, the numerics, then the
memory's own checks (shapes, dtypes, room in the context) — before it changes anything, so a file
that cannot be restored is one :class:`~gguf_runtime.errors.StateError` line and the context is
left as it was. Writes go through :func:`~gguf_runtime.atomic.atomic_write`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from .atomic import atomic_write
from .batch import Batch
from .errors import StateError
from .models.layers import LayerNorm, Linear, RMSNorm

FORMAT = "gguf-runtime-state"
VERSION = 1


def model_hash(model) -> str:
    """A hash of the model's hyperparameters (its args) and tensor table: every linear's name and
    file type, and the values of every norm weight (small, always resident; they tell two
    checkpoints of the same shape apart)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.args), sort_keys=True, default=str).encode())
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            h.update(f"{name}:{mod.source.qtype if mod.source is not None else ''};".encode())
        elif isinstance(mod, (RMSNorm, LayerNorm)) and mod.weight is not None:
            h.update(f"{name}:".encode())
            h.update(mod.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def products(model) -> str:
    """How the model's linears multiply: ``quant`` (``--weights quant``: the fused kernel on the file's
    blocks) or ``float`` (dequantized weights: resident and lazy, which give the same bits)."""
    return "quant" if model.weights == "quant" else "float"


def header(ctx) -> dict[str, str]:
    """What a state must agree on with the context that restores it."""
    m = ctx.model
    return {"format": FORMAT, "version": str(VERSION), "arch": type(m).__module__.rsplit(".", 1)[-1],
            "model": model_hash(m), "dtype": str(m.dtype).removeprefix("torch."),
            "products": products(m), **{f"numerics.{k}": v for k, v in ctx.numerics.describe().items()}}


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    c = 0
    for name in sorted(tensors):
        c = zlib.crc32(name.encode(), c)
        c = zlib.crc32(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy(), c)
    return f"{c:08x}"


def _check_seq(ctx, seq_id: int | None, what: str) -> None:
    if seq_id is not None and not 0 <= seq_id < ctx.n_seq_max:
        raise StateError(f"{what} {seq_id} out of range: this context has n_seq_max = {ctx.n_seq_max}")


def save(ctx, path, seq_id: int | None = None, tokens=None) -> int:
    """Write the state of ``ctx`` (or of sequence ``seq_id``) and ``tokens`` to ``path``; returns the
    file's size in bytes."""
    _check_seq(ctx, seq_id, "seq_id")
    mt, mm = ctx.memory.state_tensors(seq_id)
    tensors = {f"mem.{k}": v.detach().cpu().contiguous() for k, v in mt.items()}
    tensors["ctx.tokens"] = torch.tensor([int(t) for t in (tokens or [])], dtype=torch.long)
    if seq_id is None and ctx._out_idx is not None:  # the last decode's outputs belong to the whole context
        tensors["ctx.out_idx"] = ctx._out_idx.cpu()
        for name, t in (("logits", ctx._logits), ("hidden", ctx._hidden)):
            if t is not None:
                tensors[f"ctx.{name}"] = t.detach().cpu().contiguous()
    meta = {**header(ctx), "seq_id": "" if seq_id is None else str(seq_id), "n_ctx": str(ctx.n_ctx),
            "n_seq_max": str(ctx.n_seq_max), **{f"mem.{k}": v for k, v in mm.items()}, "crc32": _crc(tensors)}
    data = safetensors.torch.save(tensors, meta)
    try:
        atomic_write(path, [data])
    except OSError as e:
        raise StateError(f"{path}: cannot write the state ({e.strerror or e})") from None
    return len(data)


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a state file, with its container and checksum checked."""
    where = Path(path).name
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StateError(f"{path}: cannot read the state ({e.strerror or e})") from None
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if n < 0 or 8 + n > len(data):
        raise StateError(f"{where}: truncated state file ({len(data)} bytes)")
    try:
        meta = json.loads(data[8: 8 + n])["__metadata__"]
        ok = isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok or meta.get("format") != FORMAT:
        raise StateError(f"{where}: not a gguf-runtime state file")
    if meta.get("version") != str(VERSION):
        raise StateError(f"{where}: state format version {meta.get('version')}, this runtime reads {VERSION}")
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError:
        raise StateError(f"{where}: truncated or corrupt state file") from None
    if _crc(tensors) != meta.get("crc32"):
        raise StateError(f"{where}: corrupt state file (checksum mismatch)")
    return tensors, meta


def load(ctx, path, seq_id: int | None = None, dest_seq_id: int | None = None) -> list[int]:
    """Restore a state written by :func:`save` into ``ctx`` and return its token history.

    ``seq_id=None``: a whole-context file replaces the whole context (memory and outputs); a
    one-sequence file replaces its sequence (or ``dest_seq_id``). Otherwise sequence ``seq_id`` of
    the file (whole or one-sequence) replaces sequence ``dest_seq_id`` (default ``seq_id``), beside
    the other live sequences."""
    where = Path(path).name
    tensors, meta = read(path)
    mine = header(ctx)
    if meta.get("arch") != mine["arch"]:
        raise StateError(f"{where}: made for a {meta.get('arch')} model, this context runs {mine['arch']}")
    if meta.get("model") != mine["model"]:
        raise StateError(f"{where}: made for another {mine['arch']} model (model hash {meta.get('model')}, "
                         f"this one {mine['model']})")
    for k in [k for k in mine if k.startswith("numerics.")] + ["dtype", "products"]:
        saved = meta.get(k, "float" if k == "products" else None)  # files from before products: float
        if saved != mine[k]:
            raise StateError(f"{where}: made with {k} = {saved}, this context has {mine[k]}")
    saved_seq = meta.get("seq_id", "")
    if saved_seq and seq_id is None:
        seq_id = int(saved_seq)
    if seq_id is None and dest_seq_id is not None:
        raise StateError(f"{where}: holds every sequence: give seq_id to restore one into dest_seq_id")
    _check_seq(ctx, seq_id if dest_seq_id is None else dest_seq_id, "sequence")  # the file's ids may be any
    pre = "mem."
    mem_t = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    mem_m = {k[len(pre):]: v for k, v in meta.items() if k.startswith(pre)}
    try:
        commit = ctx.memory.state_load(mem_t, mem_m, seq_id, dest_seq_id)
    except StateError as e:
        raise StateError(f"{where}: {e}") from None
    tokens = tensors.get("ctx.tokens")
    if tokens is None or tokens.dtype != torch.long or tokens.dim() != 1:
        raise StateError(f"{where}: no token history (ctx.tokens)")
    outputs = None
    if seq_id is None:
        idx, logits, hidden = (tensors.get(f"ctx.{k}") for k in ("out_idx", "logits", "hidden"))
        if idx is not None:
            n = idx.shape[0]
            if (logits is not None and tuple(logits.shape) != (n, ctx.n_vocab)) or \
                    (hidden is not None and hidden.shape[0] != n):
                raise StateError(f"{where}: the saved outputs do not match their indices")
            dev = ctx.model.device
            outputs = (idx, None if logits is None else logits.to(dev), None if hidden is None else hidden.to(dev))
    commit()
    if seq_id is None:
        ctx._out_idx, ctx._logits, ctx._hidden = outputs or (None, None, None)
    return tokens.tolist()


def prompt_cache(ctx, path, ids: list[int], seq_id: int = 0) -> int:
    """llama.cpp's ``--prompt-cache``: restore ``path`` if it exists, keep the longest prefix of
    ``ids`` it holds (short of the last prompt token, which is evaluated again for its logits, as
    llama.cpp does) and decode the rest of ``ids[:-1]``. Returns how many prompt tokens came from
    the file; on return the context holds ``ids[:-1]`` and the caller decodes ``ids[-1:]``."""
    keep = 0
    if Path(path).exists():
        saved = load(ctx, path)
        while keep < min(len(saved), len(ids) - 1) and saved[keep] == ids[keep]:
            keep += 1
        if not ctx.memory.seq_rm(seq_id, keep, -1):  # a recurrent state without a snapshot there
            ctx.memory.clear()
            keep = 0
    for s in range(keep, len(ids) - 1, ctx.n_batch):
        piece = ids[s: min(s + ctx.n_batch, len(ids) - 1)]
        ctx.decode(Batch(piece, seq_ids=[seq_id] * len(piece), output=[False] * len(piece)))
    return keep
