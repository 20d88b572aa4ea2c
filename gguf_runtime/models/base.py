"""The model contract every architecture implements, and the one loader that fills them all.

A model is an ``nn.Module`` whose module tree is named as its GGUF tensors (:mod:`.layers`):
``blk[0].attn_q.weight`` is ``blk.0.attn_q.weight``. It declares

- ``Args``: a :class:`ModelArgs` subclass read from the file through :class:`~gguf_runtime.gguf.hparams.HParams`
  (every model has ``n_vocab``, ``n_embd``, ``n_layer``, ``n_ctx_train``, ``causal``, ``pooling``);
- ``make_memory(n_ctx, n_seq_max, numerics)``: the memory it needs (KV cache, recurrent slots, ...);
- ``forward(ubatch, view)``: final hidden states ``(n_tokens, n_embd)`` of one ubatch;
- ``logits(h)``: float32 logits of output rows;
- optionally ``optional`` (modules that may be absent), ``transforms`` (tensor kind -> function, where a file's layout really differs from the
  math's) and ``reshape`` (kinds that may arrive with the same elements in another shape).

:meth:`Model.from_gguf` reads the args, builds the module on the meta device, and
:func:`load_weights` fills every parameter from the tensor of the same name: a tied ``output``
falls back to ``token_embd``, optional tensors (``Linear(..., bias="optional")``) stay ``None`` when
absent, and a missing or mis-shaped tensor is one ``GGUFFormatError`` line, checked before the
tensor is dequantized.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..batch import UBatch
from ..device import resolve_device
from ..errors import GGUFFormatError, UnsupportedError
from ..gguf.dequant import _as_uint8 as as_bytes
from ..gguf.hparams import HParams
from ..gguf.reader import GGUFFile
from ..kernels.ggml import FileWeight
from ..memory.base import Memory
from ..numerics import Numerics
from .layers import Embedding, LayerNorm, Linear, QuantWeight, Scratch, row_blocks_exact

WEIGHT_MODES = ("resident", "lazy", "quant", "auto")


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ctx_train: int
    causal: bool = True
    pooling: str = "none"  # llama.cpp's pooling type for embeddings (none, mean, cls, last, rank)
    tied: bool = False  # no ``output.weight``: the output reuses ``token_embd``
    cls_labels: list[str] = field(default_factory=list)  # a classifier head's labels (rank pooling)

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        raise NotImplementedError


class Model(nn.Module, ABC):
    Args: ClassVar[type[ModelArgs]]
    transforms: ClassVar[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    reshape: ClassVar[frozenset[str]] = frozenset()
    ties: ClassVar[dict[str, str]] = {"output.weight": "token_embd.weight"}
    optional: ClassVar[frozenset[str]] = frozenset()  # modules whose tensors may be absent (``rope_freqs``)
    has_rank_head: ClassVar[bool] = False

    args: ModelArgs
    device: torch.device
    dtype: torch.dtype
    weights: str = "resident"  # the mode chosen at load (choose_weights): resident, lazy or quant

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args

    @classmethod
    def from_gguf(cls, f: GGUFFile, device=None, dtype=torch.float32, weights: str = "resident") -> "Model":
        """``weights``: ``resident`` (dequantized at load), ``lazy`` (large matrices kept in their
        file type and dequantized right before use), ``quant`` (kept in their file type and
        multiplied as they are, :func:`gguf_runtime.kernels.qlinear`), ``auto`` (lazy when the
        dequantized weights would not fit in the memory available)."""
        args = cls.Args.from_gguf(HParams(f))
        args.tied = "output.weight" not in f.tensor_infos
        with torch.device("meta"):
            model = cls(args)
        model.device, model.dtype = resolve_device(device), dtype
        model.weights = choose_weights(weights, f, model.device, dtype)
        load_weights(model, f, lazy=model.weights in ("lazy", "quant"), direct=model.weights == "quant")
        for m in model.modules():  # decide row blocks while little memory is in use (see layers.ROW_BLOCK)
            if isinstance(m, Linear) and m.lazy is not None and not m.lazy.direct:
                row_blocks_exact(m.lazy.shape, m.lazy.dtype, m.lazy.raw.device)
        model.loaded(f)
        return model.eval()

    def loaded(self, f: GGUFFile) -> None:
        """Called once the weights are in (tables that live on the model's device)."""

    @abstractmethod
    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> Memory: ...

    @abstractmethod
    def forward(self, ub: UBatch, view) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.output
        if out is None:
            raise UnsupportedError(f"{type(self).__module__.rsplit('.', 1)[-1]} has no language-model head: "
                                   f"create the context with embeddings=True")
        return out(h).float()

    def rank(self, h: torch.Tensor) -> torch.Tensor:
        raise UnsupportedError("this model has no classifier head for rank pooling")


def _kind(name: str) -> str:
    """``blk.3.ssm_a`` -> ``ssm_a``; ``token_embd.weight`` -> ``token_embd.weight``."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blk" and len(parts) > 2 else name


def choose_weights(mode: str, f: GGUFFile, device: torch.device, dtype: torch.dtype) -> str:
    """``resident``, ``lazy`` or ``quant`` for ``mode``; ``auto`` is lazy when the file's tensors, dequantized
    to ``dtype``, would take more than 80% of the memory available on ``device``; ``quant`` on
    another device or dtype than CPU float32 is ``auto``. ``resident`` is
    refused (one line, before anything is allocated) when they would take more than all of it."""
    if mode not in WEIGHT_MODES:
        raise UnsupportedError(f"unknown weights mode '{mode}' (choose from {', '.join(WEIGHT_MODES)})")
    if mode == "lazy" or (mode == "quant" and device.type == "cpu" and dtype == torch.float32):
        return mode
    if mode == "quant":  # the fused kernel is CPU float32 only: elsewhere, as auto
        mode = "auto"
    need = sum(_numel(i.shape) for i in f.tensor_infos.values()) * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if mode == "resident" and need > free:
        raise UnsupportedError(f"{f.path.name}: resident weights need {_size(need)} as {str(dtype).split('.')[-1]}, "
                               f"{_size(free)} available on {device}: use --weights lazy or auto")
    if mode == "resident":
        return mode
    return "lazy" if need > 0.8 * free else "resident"


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def load_weights(model: Model, f: GGUFFile, lazy: bool = False, direct: bool = False) -> None:
    """Fill every parameter of ``model`` from the GGUF tensor of the same name (see the module
    docstring). ``lazy``: ``Linear`` / ``Embedding`` weights (the matrices) keep the file's bytes
    (:class:`~gguf_runtime.models.layers.QuantWeight`) and share one :class:`Scratch`; ``direct``:
    their products read those bytes (``--weights quant``)."""
    where, arch = f.path.name, f.arch
    cache: dict[str, torch.Tensor] = {}  # a tied output shares the embedding's tensor
    kinds = type(model)
    model.scratch = Scratch()
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{pname}" if mod_name else pname
            src = name
            if src not in f.tensor_infos and kinds.ties.get(name) in f.tensor_infos:
                src = kinds.ties[name]
            if src not in f.tensor_infos:
                if isinstance(mod, (Linear, LayerNorm)) and pname in mod.optional:
                    setattr(mod, pname, None)
                    continue
                if mod_name in kinds.optional:
                    setattr(mod, pname, None)
                    continue
                raise GGUFFormatError(f"{where}: {arch} tensor missing: {name}")
            info = f.tensor_infos[src]
            kind = _kind(name)
            if tuple(info.shape) != tuple(p.shape) and kind not in kinds.transforms:
                if not (kind in kinds.reshape and _numel(info.shape) == p.numel()):
                    raise GGUFFormatError(f"{where}: {arch} tensor {src} has shape {tuple(info.shape)}, "
                                          f"expected {tuple(p.shape)} from the metadata")
            if lazy and isinstance(mod, (Linear, Embedding)) and pname == "weight" and tuple(info.shape) == tuple(p.shape):
                raw = cache.get("raw:" + src)
                if raw is None:
                    raw = cache["raw:" + src] = as_bytes(f.raw(src), model.device)
                mod.lazy = QuantWeight(raw, info.qtype, tuple(p.shape), model.dtype, model.scratch,
                                       direct=direct and isinstance(mod, Linear))
                setattr(mod, pname, None)
                if isinstance(mod, Linear):
                    mod.source = FileWeight(info.qtype.name, f, src)
                continue
            if kind in kinds.transforms and _numel(info.shape) != p.numel():  # before the transform sees it
                raise GGUFFormatError(f"{where}: {arch} tensor {src} has shape {tuple(info.shape)}, "
                                      f"expected {tuple(p.shape)} from the metadata")
            t = cache.get(src)
            if t is None:
                t = cache[src] = f.tensor(src, device=model.device, dtype=model.dtype)
            if kind in kinds.transforms:
                t = kinds.transforms[kind](t)
                if t.numel() != p.numel():
                    raise GGUFFormatError(f"{where}: {arch} tensor {src} has shape {tuple(info.shape)}, "
                                          f"expected {tuple(p.shape)} from the metadata")
            if tuple(t.shape) != tuple(p.shape):
                t = t.reshape(p.shape)
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
            if isinstance(mod, Linear) and pname == "weight":
                mod.source = FileWeight(info.qtype.name, f, src)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

