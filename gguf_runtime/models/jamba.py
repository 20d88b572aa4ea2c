"""Jamba (AI21): Mamba-1 layers and attention layers interleaved, dense or expert MLPs, on a hybrid memory.

Reads llama.cpp's GGUF layout for ``jamba`` (convert_hf_to_gguf.py JambaModel, llm_build_jamba):
``token_embd``, ``output_norm``, ``output``; per layer ``attn_norm`` and ``ffn_norm``, then

- a Mamba layer where ``attention.head_count_kv[il] == 0``: ``ssm_in``, ``ssm_conv1d`` (weight,
  bias), ``ssm_x``, ``ssm_dt_norm``, ``ssm_b_norm``, ``ssm_c_norm`` (RMS norms of dt, B and C),
  ``ssm_dt`` (weight, bias), ``ssm_a`` (``-exp(A_log)``), ``ssm_d``, ``ssm_out``;
- an attention layer otherwise: ``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``, no RoPE
  (the Mamba layers carry position), scale ``1/sqrt(head_dim)``;
- the MLP: SwiGLU ``ffn_{gate,up,down}``, or, where the file has ``ffn_gate_inp``, experts
  ``ffn_{gate,up,down}_exps`` routed top-``expert_used_count`` by softmax, weights not renormalised
  (:func:`gguf_runtime.models.moe.moe_ffn` with ``norm_w=False``).

A layer: ``h = x + mixer(rms_norm(x)); out = h + mlp(rms_norm(h))``. The memory is a
:class:`~gguf_runtime.memory.hybrid.HybridMemory`: a KV cache for the attention layers and recurrent
slots (conv window and SSM state) for the Mamba layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..gguf.hparams import HParams
from ..kernels import ssm
from ..memory.hybrid import HybridMemory, HybridView
from ..memory.kv_cache import KVCache
from ..memory.recurrent import RecurrentMemory
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, Linear, RMSNorm, Weights, param, project
from .moe import Experts, moe_ffn


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_head_kv: list[int] = field(default_factory=list)  # per layer; 0 marks a Mamba layer
    n_ff: int = 0
    rms_eps: float = 1e-6
    d_inner: int = 0
    d_state: int = 0
    d_conv: int = 0
    dt_rank: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    moe: list[bool] = field(default_factory=list)  # per layer: experts (the file has ffn_gate_inp) or dense

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attn_layers(self) -> list[int]:
        return [il for il, h in enumerate(self.n_head_kv) if h > 0]

    @property
    def ssm_layers(self) -> list[int]:
        return [il for il, h in enumerate(self.n_head_kv) if h == 0]

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_layer = hp.n_layer()
        moe = [hp.has_tensor(f"blk.{il}.ffn_gate_inp.weight") for il in range(n_layer)]
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=hp.int("embedding_length"),
            n_layer=n_layer,
            n_ctx_train=hp.int("context_length", 1 << 20, hi=1 << 40),
            n_head=hp.int("attention.head_count"),
            n_head_kv=hp.per_layer("attention.head_count_kv", n_layer),
            n_ff=hp.int("feed_forward_length"),
            rms_eps=hp.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0),
            d_inner=hp.int("ssm.inner_size"),
            d_state=hp.int("ssm.state_size"),
            d_conv=hp.int("ssm.conv_kernel", hi=1024),
            dt_rank=hp.int("ssm.time_step_rank"),
            n_expert=hp.int("expert_count", 0, lo=0) if any(moe) else 0,
            n_expert_used=hp.int("expert_used_count", 0, lo=0) if any(moe) else 0,
            moe=moe,
        )
        hp.divides(args.n_head, args.n_embd, f"{args.n_head} heads for embedding_length {args.n_embd}")
        for h in args.n_head_kv:
            if h:
                hp.divides(h, args.n_head, f"{args.n_head} heads for {h} KV heads")
        if any(moe) and not 0 < args.n_expert_used <= args.n_expert:
            raise hp.fail(f"inconsistent jamba metadata: {args.n_expert_used} of {args.n_expert} experts used")
        return args


class Block(nn.Module):
    """One layer: a Mamba or an attention mixer, then a dense or an expert MLP."""

    def __init__(self, a: ModelArgs, il: int):
        super().__init__()
        self.args, self.il = a, il
        e, di, ds = a.n_embd, a.d_inner, a.d_state
        self.is_attn = a.n_head_kv[il] > 0
        self.is_moe = a.moe[il]
        self.attn_norm = RMSNorm(e, a.rms_eps)
        if self.is_attn:
            hkv, d = a.n_head_kv[il], a.head_dim
            self.attn_q = Linear(e, a.n_head * d)
            self.attn_k = Linear(e, hkv * d)
            self.attn_v = Linear(e, hkv * d)
            self.attn_output = Linear(a.n_head * d, e)
            self.scale = 1.0 / math.sqrt(d)
        else:
            self.ssm_in = Linear(e, 2 * di)
            self.ssm_conv1d = Weights(weight=(di, a.d_conv), bias=(di,))
            self.ssm_x = Linear(di, a.dt_rank + 2 * ds)
            self.ssm_dt_norm = RMSNorm(a.dt_rank, a.rms_eps)
            self.ssm_b_norm = RMSNorm(ds, a.rms_eps)
            self.ssm_c_norm = RMSNorm(ds, a.rms_eps)
            self.ssm_dt = Linear(a.dt_rank, di, bias=True)
            self.ssm_a = param(ds, di)  # transposed from GGUF's (d_inner, d_state): channels contiguous
            self.ssm_d = param(di)
            self.ssm_out = Linear(di, e)
        self.ffn_norm = RMSNorm(e, a.rms_eps)
        if self.is_moe:
            self.ffn_gate_inp = Linear(e, a.n_expert)
            self.ffn_gate_exps = Experts(a.n_expert, e, a.n_ff)
            self.ffn_up_exps = Experts(a.n_expert, e, a.n_ff)
            self.ffn_down_exps = Experts(a.n_expert, a.n_ff, e)
        else:
            self.ffn_gate = Linear(e, a.n_ff)
            self.ffn_up = Linear(e, a.n_ff)
            self.ffn_down = Linear(a.n_ff, e)

    def attention(self, x: torch.Tensor, kv) -> torch.Tensor:
        a, n = self.args, x.shape[0]
        q, k, v = project(x, self.attn_q, self.attn_k, self.attn_v)
        q = q.view(n, a.n_head, a.head_dim)
        k = k.view(n, -1, a.head_dim)
        v = v.view(n, -1, a.head_dim)
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def mamba(self, h: torch.Tensor, st) -> torch.Tensor:
        a = self.args
        S, T = st.view.n_seqs, st.view.n_seq_tokens
        x, z = self.ssm_in(h).view(S, T, 2 * a.d_inner).split([a.d_inner, a.d_inner], -1)
        x, st["conv"] = ssm.causal_conv(x, st["conv"], self.ssm_conv1d.weight, self.ssm_conv1d.bias)
        x = kernels.silu(x)
        dt, B, C = self.ssm_x(x).split([a.dt_rank, a.d_state, a.d_state], -1)
        dt = self.ssm_dt_norm(dt.contiguous())
        B, C = self.ssm_b_norm(B.contiguous()), self.ssm_c_norm(C.contiguous())
        dt = kernels.softplus(self.ssm_dt(dt))
        f32 = lambda t: t.float().contiguous()  # noqa: E731 - the scan runs in float32
        y = ssm.selective_scan(f32(x), f32(dt), f32(self.ssm_a), f32(B), f32(C), st["ssm"], st.view.pos0)
        y = (y.to(x.dtype) + x * self.ssm_d) * kernels.silu(z)
        return self.ssm_out(y.reshape(S * T, a.d_inner))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_moe:
            return moe_ffn(x, self.ffn_gate_inp, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps,
                           self.args.n_expert_used, norm_w=False)
        return self.ffn_down(kernels.swiglu(*project(x, self.ffn_gate, self.ffn_up)))

    def forward(self, x: torch.Tensor, mem) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + (self.attention(h, mem) if self.is_attn else self.mamba(h, mem))
        return x + self.mlp(self.ffn_norm(x))


class Model(BaseModel):
    Args = ModelArgs
    transforms = {"ssm_a": lambda t: t.t().contiguous()}
    reshape = frozenset({"ssm_conv1d.weight"})  # (d_inner, 1, d_conv) in some files

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.token_embd = Embedding(args.n_vocab, args.n_embd)
        self.blk = nn.ModuleList(Block(args, il) for il in range(args.n_layer))
        self.output_norm = RMSNorm(args.n_embd, args.rms_eps)
        self.output = Linear(args.n_embd, args.n_vocab)

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> HybridMemory:
        """A KV cache of ``n_ctx`` cells for the attention layers beside one recurrent slot per
        sequence (conv window, float32 SSM state) for the Mamba layers."""
        a = self.args
        tk, tv = numerics.kv_dtypes(self.dtype)
        attn = KVCache(a.n_layer, n_ctx, n_seq_max, [a.n_head_kv[il] for il in a.attn_layers], a.head_dim,
                       dtype=tk, dtype_v=tv, device=self.device, layers=a.attn_layers,
                       rotate=lambda il, k, delta: k)  # no RoPE: a position shift leaves keys as they are
        recr = RecurrentMemory(a.n_layer, n_seq_max, {"conv": (a.d_conv - 1, a.d_inner),
                                                      "ssm": ssm.state_shape(a.d_inner, a.d_state)},
                               dtype=torch.float32, device=self.device, layers=a.ssm_layers)
        return HybridMemory(attn, recr)

    def forward(self, ub, view: HybridView) -> torch.Tensor:
        x = self.token_embd(ub.tokens)
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il))
        return self.output_norm(x)
