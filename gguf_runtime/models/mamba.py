"""Mamba (v1): RMSNorm -> selective SSM mixer -> residual, tied output by default.

Reads llama.cpp's GGUF layout: ``token_embd``, ``blk.N.{attn_norm, ssm_in, ssm_conv1d (weight, bias),
ssm_x, ssm_dt (weight, bias), ssm_a, ssm_d, ssm_out}``, ``output_norm``, ``output`` (absent when tied)
and the ``mamba.ssm.{conv_kernel, inner_size, state_size, time_step_rank, dt_b_c_rms}`` metadata.
llama.cpp's converter stores ``ssm_a = -exp(A_log)`` and the conv weight as ``(d_inner, d_conv)``.

State per sequence and layer lives in a :class:`RecurrentMemory`: the conv state (the last
``d_conv - 1`` mixer inputs) and the SSM state of :mod:`gguf_runtime.ssm` (chunk-aligned, so
results are bitwise independent of the ubatch split).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..gguf.hparams import HParams
from ..kernels import ssm
from ..memory.recurrent import RecurrentMemory, RecurrentView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights, param


@dataclass
class ModelArgs(BaseArgs):
    d_inner: int = 0
    d_state: int = 0
    d_conv: int = 0
    dt_rank: int = 0
    rms_eps: float = 1e-5
    dt_b_c_rms: bool = False

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        return cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=hp.int("embedding_length"),
            n_layer=hp.n_layer(),
            n_ctx_train=hp.int("context_length", 1 << 20, hi=1 << 40),
            d_inner=hp.int("ssm.inner_size"),
            d_state=hp.int("ssm.state_size"),
            d_conv=hp.int("ssm.conv_kernel", hi=1024),
            dt_rank=hp.int("ssm.time_step_rank"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
            dt_b_c_rms=hp.bool("ssm.dt_b_c_rms", False),
        )


class Block(nn.Module):
    """RMSNorm -> selective-SSM mixer -> residual."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        e, di, ds, r = a.n_embd, a.d_inner, a.d_state, a.dt_rank
        self.attn_norm = RMSNorm(e, a.rms_eps)
        self.ssm_in = Linear(e, 2 * di)
        self.ssm_conv1d = Weights(weight=(di, a.d_conv), bias=(di,))
        self.ssm_x = Linear(di, r + 2 * ds)
        self.ssm_dt = Linear(r, di, bias=True)
        self.ssm_a = param(ds, di)  # transposed from GGUF's (d_inner, d_state): channels contiguous
        self.ssm_d = param(di)
        self.ssm_out = Linear(di, e)

    def mixer(self, h: torch.Tensor, st) -> torch.Tensor:
        a = self.args
        S, T = st.view.n_seqs, st.view.n_seq_tokens
        xz = self.ssm_in(h).view(S, T, 2 * a.d_inner)
        x, z = xz[..., : a.d_inner], xz[..., a.d_inner:]
        x, st["conv"] = ssm.causal_conv(x, st["conv"], self.ssm_conv1d.weight, self.ssm_conv1d.bias)
        x = kernels.silu(x)
        dt, B, C = self.ssm_x(x).split([a.dt_rank, a.d_state, a.d_state], -1)
        if a.dt_b_c_rms:
            dt, B, C = (kernels.rms_norm(t.contiguous(), None, a.rms_eps) for t in (dt, B, C))
        dt = kernels.softplus(self.ssm_dt(dt.contiguous()))
        f32 = lambda t: t.float().contiguous()  # noqa: E731 - the scan runs in float32
        # the SSM state is updated in place in the memory
        y = ssm.selective_scan(f32(x), f32(dt), f32(self.ssm_a), f32(B), f32(C), st["ssm"], st.view.pos0)
        y = (y.to(x.dtype) + x * self.ssm_d) * kernels.silu(z)
        return self.ssm_out(y.reshape(S * T, a.d_inner))

    def forward(self, x: torch.Tensor, st) -> torch.Tensor:
        return x + self.mixer(self.attn_norm(x), st)


class Model(BaseModel):
    Args = ModelArgs
    transforms = {"ssm_a": lambda t: t.t().contiguous()}
    reshape = frozenset({"ssm_conv1d.weight"})  # (d_inner, 1, d_conv) in some files

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> RecurrentMemory:
        """Per sequence slot and layer: the conv window and the SSM state (float32; ``n_ctx`` does not size it)."""
        a = self.args
        return RecurrentMemory(a.n_layer, n_seq_max, {"conv": (a.d_conv - 1, a.d_inner),
                                                      "ssm": ssm.state_shape(a.d_inner, a.d_state)},
                               dtype=torch.float32, device=self.device)

    def forward(self, ub, view: RecurrentView) -> torch.Tensor:
        x = self.token_embd(ub.tokens)
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il))
        return self.output_norm(x)
