"""Mamba2 (mamba-codestral and friends): SSD mixer layers on the recurrent memory.

Reads llama.cpp's GGUF layout for ``mamba2`` (convert_hf_to_gguf.py Mamba2Model): ``token_embd``,
``blk.N.{attn_norm, ssm_in, ssm_conv1d (weight, bias), ssm_dt.bias, ssm_a, ssm_d, ssm_norm,
ssm_out}``, ``output_norm``, ``output`` (absent when tied). ``ssm_a`` is already ``-exp(A_log)``,
one value per head; ``ssm_norm`` is ``(n_group, d_inner / n_group)``. Metadata: ``ssm.conv_kernel``,
``ssm.inner_size``, ``ssm.state_size``, ``ssm.time_step_rank`` (the number of heads),
``ssm.group_count``.

A layer, as llama.cpp's build_mamba2_layer computes it::

    z | xBC | dt = ssm_in(rms_norm(x))
    xBC = silu(causal_conv1d(xBC) + conv_bias)          # the last d_conv-1 inputs are carried
    x | B | C = xBC;  dt = softplus(dt + dt_bias)
    y = ssd(x, dt, A, B, C) + D x                       # gguf_runtime.kernels.ssd: chunked, position aligned
    y = rms_norm_grouped(y * silu(z)) * ssm_norm        # n_group groups
    out = x_in + ssm_out(y)

Per sequence and layer the memory holds the conv window and the SSD state (the state at the last
chunk boundary and the tail of tokens after it; see :mod:`gguf_runtime.ssd`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..gguf.hparams import HParams
from ..kernels.ssd import CHUNK, SSDState, ssd_scan
from ..kernels.ssm import causal_conv
from ..memory.recurrent import RecurrentMemory, RecurrentView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights, param


@dataclass
class ModelArgs(BaseArgs):
    d_conv: int = 0
    d_inner: int = 0
    d_state: int = 0
    n_head: int = 0
    n_group: int = 1
    rms_eps: float = 1e-5
    chunk: int = CHUNK

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_head

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_group * self.d_state

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=hp.int("embedding_length"),
            n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length", 1 << 20, hi=1 << 40),
            d_conv=hp.int("ssm.conv_kernel", hi=1024),
            d_inner=hp.int("ssm.inner_size"),
            d_state=hp.int("ssm.state_size"),
            n_head=hp.int("ssm.time_step_rank"),
            n_group=hp.int("ssm.group_count", 1),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
        )
        if args.d_inner % args.n_head or args.n_head % args.n_group:
            raise hp.fail(f"inconsistent mamba2 metadata: inner_size {args.d_inner}, "
                          f"{args.n_head} heads (time_step_rank), {args.n_group} groups")
        return args


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.attn_norm = RMSNorm(a.n_embd, a.rms_eps)
        self.ssm_in = Linear(a.n_embd, 2 * a.d_inner + 2 * a.n_group * a.d_state + a.n_head)
        self.ssm_conv1d = Weights(weight=(a.conv_dim, a.d_conv), bias=(a.conv_dim,))
        self.ssm_dt = Weights(bias=(a.n_head,))
        self.ssm_a = param(a.n_head, 1)
        self.ssm_d = param(a.n_head, 1)
        self.ssm_norm = Weights(weight=(a.n_group, a.d_inner // a.n_group))
        self.ssm_out = Linear(a.d_inner, a.n_embd)

    def mixer(self, u: torch.Tensor, st, off: torch.Tensor) -> torch.Tensor:
        """u: (S, T, n_embd) normed input; the layer's conv window and SSD state are updated in ``st``."""
        a = self.args
        S, T, _ = u.shape
        H, P, G, N = a.n_head, a.head_dim, a.n_group, a.d_state
        z, xBC, dt = self.ssm_in(u).split([a.d_inner, a.conv_dim, H], -1)
        xBC, st["conv"] = causal_conv(xBC, st["conv"], self.ssm_conv1d.weight, self.ssm_conv1d.bias)
        xBC = kernels.silu(xBC)
        x, B, C = xBC.split([a.d_inner, G * N, G * N], -1)
        dt = kernels.softplus((dt + self.ssm_dt.bias).float())
        x = x.reshape(S, T, H, P)
        ssd = SSDState(st["ssm"], st["xdt"], st["B"], st["dt"])
        y, ssd = ssd_scan(x, dt, self.ssm_a.view(H), B.reshape(S, T, G, N), C.reshape(S, T, G, N), ssd, off)
        st["ssm"], st["xdt"], st["B"], st["dt"] = ssd.h, ssd.xdt, ssd.B, ssd.dt
        y = (y + x.float() * self.ssm_d.float().view(H, 1)) * kernels.silu(z.float()).view(S, T, H, P)
        y = kernels.rms_norm(y.reshape(S, T, G, -1), self.ssm_norm.weight.float(), a.rms_eps).view(S, T, a.d_inner)
        return self.ssm_out(y.to(u.dtype))

    def forward(self, x, st, off):
        return x + self.mixer(self.attn_norm(x), st, off)


class Model(BaseModel):
    Args = ModelArgs
    reshape = frozenset({"ssm_a", "ssm_d", "ssm_norm.weight"})  # (H,) or (H, 1); ssm_norm flat or grouped

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> RecurrentMemory:
        """One float32 state per sequence slot and layer (``n_ctx`` does not size it): the conv window,
        the SSD state at the last chunk boundary (``ssm``), the tail after it (``xdt``, ``B``, ``dt``)
        and the tail's length ``n`` (an integer)."""
        a = self.args
        tail = SSDState.shapes(a.n_head, a.head_dim, a.n_group, a.d_state, a.chunk)
        ssm = tail.pop("h")
        return RecurrentMemory(a.n_layer, n_seq_max, {"conv": (a.d_conv - 1, a.conv_dim), "ssm": ssm, **tail, "n": ()},
                               dtype=torch.float32, dtypes={"n": torch.long}, device=self.device)

    def forward(self, ub, view: RecurrentView) -> torch.Tensor:
        S, T = view.n_seqs, view.n_seq_tokens
        x = self.token_embd(ub.tokens).view(S, T, -1)
        first = view.layer(0)
        off = first["n"].clone()  # tokens since each sequence's last chunk boundary
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il), off)
        first["n"] = (off + T) % self.args.chunk
        return self.output_norm(x.view(S * T, -1))
