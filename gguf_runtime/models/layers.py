"""The modules models are built from, named as GGUF names its tensors.

A model's module tree *is* the GGUF tensor table: ``Model.blk[0].attn_q.weight`` is
``blk.0.attn_q.weight``, so one loader (:func:`gguf_runtime.models.base.load_weights`) serves every
model. Parameters are created on the meta device and filled by the loader; a bias declared
``optional`` is loaded when the file has it and stays ``None`` otherwise (llama.cpp's optional
tensors).

Lazy and quant weights (``--weights lazy|quant``): a ``Linear`` or ``Embedding`` may instead hold its weight as the
file's bytes (:class:`QuantWeight`, memory-mapped on CPU, copied once to an accelerator) and
dequantize it right before use into a scratch buffer shared by every weight of that shape (one
layer's worth of float memory); an embedding dequantizes only the rows it looks up. The dequant
and the product are the ones the resident path runs, so results are ``torch.equal`` to it.
With ``--weights quant`` a ``Linear`` instead multiplies by the bytes directly
(:func:`gguf_runtime.kernels.qlinear`: no float copy of the weight at all, each output one
fixed-order sum), falling back to the lazy path where that kernel does not apply.
A matrix of more than ``2 * ROW_BLOCK`` rows (a vocabulary head: 768 MiB of float32 on a 7B model,
twice that with its blocked copy) is dequantized and applied ``ROW_BLOCK`` output rows at a time,
where :func:`row_blocks_exact` has found that the product computes each output column the same way
alone (checked once per shape, backend and thread count on random data, at load).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels, numerics
from ..gguf.dequant import dequantize
from ..kernels.ggml import FileWeight
from ..kernels.linear import fused_product_applies, tiled_randn

ROW_BLOCK = 8192
_EXACT: dict[tuple, bool] = {}


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Scratch:
    """Float buffers that lazy weights dequantize into, one per (shape, dtype, device), reused."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    @property
    def n_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class QuantWeight:
    """A weight kept in its GGUF type: the raw bytes (rows of whole blocks), dequantized on demand.
    ``direct`` (``--weights quant``): products read the bytes themselves (:func:`kernels.qlinear`)."""

    def __init__(self, raw: torch.Tensor, qtype, shape: tuple[int, ...], dtype: torch.dtype, scratch: Scratch,
                 direct: bool = False):
        self.raw = raw.view(shape[0], -1)  # (rows, bytes per row): quant blocks never straddle rows
        self.qtype, self.shape, self.dtype, self.scratch = qtype, tuple(shape), dtype, scratch
        self.direct = direct
        self.kernel = kernels.qmatmul(qtype, self.raw, self.shape) if direct and len(shape) == 2 else None

    def full(self) -> torch.Tensor:
        """The whole weight, in the shared scratch buffer of its shape (valid until the next use)."""
        out = self.scratch.get(self.shape, self.dtype, self.raw.device)
        return dequantize(self.raw, self.qtype, self.shape, out=out)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` in the shared scratch buffer of that block's shape (valid until the next use)."""
        shape = (r1 - r0, *self.shape[1:])
        out = self.scratch.get(shape, self.dtype, self.raw.device)
        return dequantize(self.raw[r0:r1], self.qtype, shape, out=out)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` only (a new tensor)."""
        raw = self.raw.index_select(0, idx.to(self.raw.device))
        return dequantize(raw, self.qtype, (idx.numel(), *self.shape[1:]), dtype=self.dtype)


class Linear(nn.Module):
    """``{name}.weight`` (out, in) and an optional ``{name}.bias``; ``source`` (set by the loader)
    is the weight's GGUF type, which ggml numerics round activations for; ``lazy`` (set by the
    loader for lazy weights) holds the weight in its file type instead of ``weight``."""

    def __init__(self, n_in: int, n_out: int, bias: bool | str = False):
        super().__init__()
        self.weight = param(n_out, n_in)
        self.bias = param(n_out) if bias else None
        self.optional = {"bias"} if bias == "optional" else set()
        self.source: FileWeight | None = None
        self.lazy: QuantWeight | None = None
        self.plans: dict[tuple[int, ...], object] = {}  # project()'s native calls of groups led by this module

    @property
    def present(self) -> bool:
        """The file has this weight (an optional module may be absent)."""
        return self.weight is not None or self.lazy is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lazy is None:
            return kernels.linear(x, self.weight, self.bias, self.source)
        w = self.lazy
        if w.kernel is not None:
            y = kernels.qlinear(x, w.raw, w.kernel, w.shape, self.bias)
            if y is not None:
                return y
        if not row_blocks_exact(w.shape, w.dtype, w.raw.device):
            return kernels.linear(x, w.full(), self.bias, self.source, fresh=True)
        b = self.bias
        return torch.cat([kernels.linear(x, w.block(r, min(r + ROW_BLOCK, w.shape[0])),
                                         None if b is None else b[r:r + ROW_BLOCK], self.source, fresh=True)
                          for r in range(0, w.shape[0], ROW_BLOCK)], -1)


def project(x: torch.Tensor, *mods: Linear) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in mods)``: the projections of one input (q, k, v; gate, up). With quant
    weights and the native kernels, one call computes them all (``native.matmul_group``; each
    product exactly its own call's, so the same bits), saving the per-call overhead at decode."""
    key = tuple(map(id, mods))  # (the first module keeps its groups' plans: they die with the model)
    plan = mods[0].plans[key] if key in mods[0].plans else _plan(mods, key)
    if plan is None or x.dim() != 2 or not fused_product_applies(x):
        return tuple(m(x) for m in mods)
    x = x.contiguous()
    buf = torch.empty(x.shape[0] * plan.total)
    ys, o = [], 0
    for n in plan.ns:
        ys.append(buf[o:o + x.shape[0] * n].view(x.shape[0], n))
        o += x.shape[0] * n
    plan(x, ys)
    return tuple(ys)


def _plan(mods: tuple[Linear, ...], key: tuple[int, ...]):
    """The native group call of ``mods`` (None where one of them has no fused kernel, a bias, or
    another input width), remembered by the first module."""
    from ..gguf import native

    ws = [m.lazy for m in mods]
    plan = None
    if all(w is not None and w.kernel is not None for w in ws) and all(m.bias is None for m in mods) \
            and len({w.shape[1] for w in ws}) == 1:
        plan = native.matmul_group([(w.qtype, w.raw, w.shape[0]) for w in ws], ws[0].shape[1])
        if plan is not None:
            plan.ns = [w.shape[0] for w in ws]
            plan.total = sum(plan.ns)
    mods[0].plans[key] = plan
    return plan


def row_blocks_exact(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a lazy (out, in) matrix is applied ``ROW_BLOCK`` output rows at a time: it has more
    than ``2 * ROW_BLOCK`` rows, ggml numerics are off (their Q4_1 / Q5_1 min term reads the whole
    weight), and on random data of this shape the blocks' products, side by side, are
    ``torch.equal`` to the whole product for 1, 2, 3 and 64 input rows under the numerics in force.
    Tested once per shape, dtype, device, linear rule and thread count (the kernel a backend picks
    depends on shapes, not values); the loader asks first, while little memory is in use."""
    nx = numerics.current()
    if shape[0] <= 2 * ROW_BLOCK or nx.ggml:
        return False
    key = (tuple(shape), dtype, device, ROW_BLOCK, nx.invariant, nx.linear_rule(), torch.get_num_threads())
    ok = _EXACT.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(shape[0])
        w = tiled_randn(tuple(shape), g).to(device=device, dtype=dtype)
        ok = True
        for n in (1, 2, 3, 64):
            x = torch.randn(n, shape[1], generator=g).to(device=device, dtype=dtype)
            whole = kernels.linear(x, w, fresh=True)
            parts = torch.cat([kernels.linear(x, w[r:r + ROW_BLOCK].clone(), fresh=True)
                               for r in range(0, shape[0], ROW_BLOCK)], -1)
            ok = ok and torch.equal(whole, parts)
        _EXACT[key] = ok
    return ok


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = param(n)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float, bias: bool | str = True):
        super().__init__()
        self.weight = param(n)
        self.bias = param(n) if bias else None
        self.optional = {"bias"} if bias == "optional" else set()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    """``{name}.weight`` (rows, dim): rows looked up by index (lazy: only those rows dequantized)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = param(n, dim)
        self.lazy: QuantWeight | None = None

    @property
    def present(self) -> bool:
        return self.weight is not None or self.lazy is not None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.lazy is not None:
            return self.lazy.rows(idx)
        return self.weight[idx.to(self.weight.device)]


class Weights(nn.Module):
    """A GGUF name prefix whose tensors the model reads directly (``ssm_conv1d.weight`` and
    ``.bias``, a lone ``ssm_dt.bias``, ``rope_freqs.weight``): ``Weights(weight=(4, 8), bias=(4,))``."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, param(*shape))
