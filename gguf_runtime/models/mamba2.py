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
    y = ssd(x, dt, A, B, C) + D x                       # gguf_runtime.ssd: chunked, position aligned
    y = rms_norm_grouped(y * silu(z)) * ssm_norm        # n_group groups
    out = x_in + ssm_out(y)

Per sequence and layer the memory holds the conv window and the SSD state (the state at the last
chunk boundary and the tail of tokens after it; see :mod:`gguf_runtime.ssd`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..errors import GGUFFormatError
from ..memory.recurrent import RecurrentMemory, RecurrentView
from ..reader import GGUFFile
from ..ssd import CHUNK, SSDState, ssd_scan
from ..ssm import causal_conv
from . import build


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    d_conv: int
    d_inner: int
    d_state: int
    n_head: int
    n_group: int
    rms_eps: float
    n_ctx_train: int = 1 << 20
    tied: bool = False
    chunk: int = CHUNK

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_head

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_group * self.d_state

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        a = f.arch
        need = ["embedding_length", "block_count", "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size",
                "ssm.time_step_rank"]
        missing = [f"{a}.{k}" for k in need if f.get(f"{a}.{k}") is None]
        if missing:
            raise GGUFFormatError(f"{f.path.name}: mamba2 metadata missing: {', '.join(missing)}")
        if "token_embd.weight" not in f.tensor_infos:
            raise GGUFFormatError(f"{f.path.name}: mamba2 tensor missing: token_embd.weight")
        g = lambda k, d=None: f.get(f"{a}.{k}", d)  # noqa: E731
        args = cls(
            n_vocab=int(f.tensor_infos["token_embd.weight"].shape[0]),
            n_embd=int(g("embedding_length")),
            n_layer=int(g("block_count")),
            d_conv=int(g("ssm.conv_kernel")),
            d_inner=int(g("ssm.inner_size")),
            d_state=int(g("ssm.state_size")),
            n_head=int(g("ssm.time_step_rank")),
            n_group=int(g("ssm.group_count", 1)),
            rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            n_ctx_train=int(g("context_length", 1 << 20)),
            tied="output.weight" not in f.tensor_infos,
        )
        if args.n_head <= 0 or args.n_group <= 0 or args.d_inner % args.n_head or args.n_head % args.n_group:
            raise GGUFFormatError(f"{f.path.name}: inconsistent mamba2 metadata: inner_size {args.d_inner}, "
                                  f"{args.n_head} heads (time_step_rank), {args.n_group} groups")
        return args


class Mixer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = a = args
        p = lambda *s: nn.Parameter(torch.empty(*s), requires_grad=False)  # noqa: E731
        self.in_proj = p(2 * a.d_inner + 2 * a.n_group * a.d_state + a.n_head, a.n_embd)
        self.conv_w = p(a.conv_dim, a.d_conv)
        self.conv_b = p(a.conv_dim)
        self.dt_bias = p(a.n_head)
        self.A = p(a.n_head, 1)
        self.D = p(a.n_head, 1)
        self.norm = p(a.n_group, a.d_inner // a.n_group)
        self.out_proj = p(a.n_embd, a.d_inner)

    def forward(self, u: torch.Tensor, conv: torch.Tensor, ssd: SSDState, off: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, SSDState]:
        """u: (S, T, n_embd) normed input; conv: (S, d_conv-1, conv_dim) carried window. Returns the
        mixer output (S, T, n_embd) and the new conv window and SSD state."""
        a = self.args
        S, T, _ = u.shape
        H, P, G, N = a.n_head, a.head_dim, a.n_group, a.d_state
        z, xBC, dt = ops.linear(u, self.in_proj).split([a.d_inner, a.conv_dim, H], -1)
        xBC, conv = causal_conv(xBC, conv, self.conv_w, self.conv_b)
        xBC = ops.silu(xBC)
        x, B, C = xBC.split([a.d_inner, G * N, G * N], -1)
        dt = ops.softplus((dt + self.dt_bias).float())
        x = x.reshape(S, T, H, P)
        y, ssd = ssd_scan(x, dt, self.A.view(H), B.reshape(S, T, G, N), C.reshape(S, T, G, N), ssd, off)
        y = (y + x.float() * self.D.float().view(H, 1)) * ops.silu(z.float()).view(S, T, H, P)
        y = ops.rms_norm(y.reshape(S, T, G, -1), self.norm.float(), a.rms_eps).view(S, T, a.d_inner)
        return ops.linear(y.to(u.dtype), self.out_proj), conv, ssd


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.norm = nn.Parameter(torch.empty(args.n_embd), requires_grad=False)
        self.mixer = Mixer(args)

    def forward(self, x, conv, ssd, off):
        y, conv, ssd = self.mixer(ops.rms_norm(x, self.norm, self.args.rms_eps), conv, ssd, off)
        return x + y, conv, ssd


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embd = nn.Parameter(torch.empty(args.n_vocab, args.n_embd), requires_grad=False)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = nn.Parameter(torch.empty(args.n_embd), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(args.n_vocab, args.n_embd), requires_grad=False)

    # -- weights ---------------------------------------------------------------------------------
    _NAMES = {"attn_norm.weight": "norm", "ssm_in.weight": "mixer.in_proj", "ssm_conv1d.weight": "mixer.conv_w",
              "ssm_conv1d.bias": "mixer.conv_b", "ssm_dt.bias": "mixer.dt_bias", "ssm_a": "mixer.A",
              "ssm_d": "mixer.D", "ssm_norm.weight": "mixer.norm", "ssm_out.weight": "mixer.out_proj"}

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GGUF tensor names -> parameter names; a tied output reuses the embedding."""
        top = {"token_embd.weight": "tok_embd", "output_norm.weight": "norm", "output.weight": "lm_head"}
        out = {}
        for name, t in weights.items():
            if name in top:
                out[top[name]] = t
            elif name.startswith("blk."):
                _, i, kind = name.split(".", 2)
                if kind in cls._NAMES:
                    out[f"layers.{i}.{cls._NAMES[kind]}"] = t
        if "lm_head" not in out and "tok_embd" in out:
            out["lm_head"] = out["tok_embd"]
        return out

    @classmethod
    def from_gguf(cls, f: GGUFFile, device=None, dtype=torch.float32) -> "Model":
        """``ssm_a``/``ssm_d`` may come as (H,) or (H, 1) and ``ssm_norm`` flat: same element count suffices."""
        return build(cls, ModelArgs.from_gguf(f), f, device, dtype, reshape=True)[0]

    # -- memory ----------------------------------------------------------------------------------
    def make_cache(self, n_ctx: int = 0, n_seq_max: int = 1, dtype=None) -> RecurrentMemory:
        """One float32 state per sequence slot and layer (``n_ctx`` does not size it): the conv window,
        the SSD state at the last chunk boundary (``ssm``), the tail after it (``xdt``, ``B``, ``dt``)
        and the tail's length ``n``."""
        a = self.args
        tail = SSDState.shapes(a.n_head, a.head_dim, a.n_group, a.d_state, a.chunk)
        h = tail.pop("h")
        return RecurrentMemory(a.n_layer, n_seq_max, (a.d_conv - 1, a.conv_dim), h, dtype=torch.float32,
                               device=self.device, extra={**tail, "n": (1,)})

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, ub, view: RecurrentView) -> torch.Tensor:
        S, T = view.n_seqs, view.n_seq_tokens
        x = self.tok_embd[ub.tokens.to(self.device)].view(S, T, -1)
        off = view.state("n", 0).view(S).long()  # tokens since each sequence's last chunk boundary
        for i, layer in enumerate(self.layers):
            ssd = SSDState(view.ssm(i), view.state("xdt", i), view.state("B", i), view.state("dt", i))
            x, conv, ssd = layer(x, view.conv(i), ssd, off)
            view.set_conv(i, conv)
            view.set_ssm(i, ssd.h)
            for name in ("xdt", "B", "dt"):
                view.set_state(name, i, getattr(ssd, name))
        view.set_state("n", 0, ((off + T) % self.args.chunk).float().view(S, 1))
        return ops.rms_norm(x.view(S * T, -1), self.norm, self.args.rms_eps)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return ops.linear(h, self.lm_head).float()

