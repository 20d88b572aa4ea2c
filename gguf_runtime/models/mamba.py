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

from .. import ops, ssm
from ..errors import GGUFFormatError
from ..memory.recurrent import RecurrentMemory, RecurrentView
from ..reader import GGUFFile
from . import build


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    rms_eps: float = 1e-5
    dt_b_c_rms: bool = False
    n_ctx_train: int = 1 << 20
    tied: bool = True

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        a = f.arch

        def g(k, d=None):
            v = f.get(f"{a}.{k}", d)
            if v is None:
                raise GGUFFormatError(f"{f.path.name}: missing metadata key '{a}.{k}'")
            return v

        return cls(
            n_vocab=int(f.tensor_infos["token_embd.weight"].shape[0]),
            n_embd=int(g("embedding_length")),
            n_layer=int(g("block_count")),
            d_inner=int(g("ssm.inner_size")),
            d_state=int(g("ssm.state_size")),
            d_conv=int(g("ssm.conv_kernel")),
            dt_rank=int(g("ssm.time_step_rank")),
            rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            dt_b_c_rms=bool(g("ssm.dt_b_c_rms", False)),
            n_ctx_train=int(g("context_length", 1 << 20)),
            tied="output.weight" not in f.tensor_infos,
        )


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Mixer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        e, di, ds, r, k = args.n_embd, args.d_inner, args.d_state, args.dt_rank, args.d_conv
        self.in_proj = _param(2 * di, e)
        self.conv_w, self.conv_b = _param(di, k), _param(di)
        self.x_proj = _param(r + 2 * ds, di)
        self.dt_proj, self.dt_bias = _param(di, r), _param(di)
        self.A = _param(ds, di)  # transposed from GGUF's (d_inner, d_state): channels contiguous
        self.D = _param(di)
        self.out_proj = _param(e, di)

    def forward(self, h: torch.Tensor, layer: int, view: RecurrentView) -> torch.Tensor:
        a = self.args
        S, T = view.n_seqs, view.n_seq_tokens
        xz = ops.linear(h, self.in_proj).view(S, T, 2 * a.d_inner)
        x, z = xz[..., : a.d_inner], xz[..., a.d_inner:]
        x, conv_state = ssm.causal_conv(x, view.conv(layer), self.conv_w, self.conv_b)
        view.set_conv(layer, conv_state)
        x = ops.silu(x)
        dt, B, C = ops.linear(x, self.x_proj).split([a.dt_rank, a.d_state, a.d_state], -1)
        if a.dt_b_c_rms:
            dt, B, C = (ops.rms_norm(t.contiguous(), None, a.rms_eps) for t in (dt, B, C))
        dt = ops.softplus(ops.linear(dt.contiguous(), self.dt_proj, self.dt_bias))
        f32 = lambda t: t.float().contiguous()  # noqa: E731 - the scan runs in float32
        # the SSM state is updated in place in the memory
        y = ssm.selective_scan(f32(x), f32(dt), f32(self.A), f32(B), f32(C), view.ssm(layer), view.pos0)
        y = (y.to(x.dtype) + x * self.D) * ops.silu(z)
        return ops.linear(y.reshape(S * T, a.d_inner), self.out_proj)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = _param(args.n_embd)
        self.mixer = Mixer(args)
        self.eps = args.rms_eps

    def forward(self, x: torch.Tensor, layer: int, view: RecurrentView) -> torch.Tensor:
        return x + self.mixer(ops.rms_norm(x, self.norm, self.eps), layer, view)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embd = _param(args.n_vocab, args.n_embd)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = _param(args.n_embd)
        self.lm_head = _param(args.n_vocab, args.n_embd)

    # -- weights ---------------------------------------------------------------------------------
    _NAMES = {"attn_norm": "norm", "ssm_in": "mixer.in_proj", "ssm_conv1d.weight": "mixer.conv_w",
              "ssm_conv1d.bias": "mixer.conv_b", "ssm_x": "mixer.x_proj", "ssm_dt.weight": "mixer.dt_proj",
              "ssm_dt.bias": "mixer.dt_bias", "ssm_a": "mixer.A", "ssm_d": "mixer.D", "ssm_out": "mixer.out_proj"}
    _TOP = {"token_embd.weight": "tok_embd", "output_norm.weight": "norm", "output.weight": "lm_head"}

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GGUF tensor names -> parameter names; A transposed to (d_state, d_inner), the conv weight
        squeezed to (d_inner, d_conv); a tied output reuses the embedding."""
        out = {}
        for name, t in weights.items():
            if name.startswith("blk."):
                _, i, kind = name.split(".", 2)
                kind = kind if kind in cls._NAMES else kind.removesuffix(".weight")
                if kind not in cls._NAMES:
                    continue
                if kind == "ssm_a":
                    t = t.t().contiguous()
                elif kind == "ssm_conv1d.weight":
                    t = t.reshape(t.shape[0], -1)
                out[f"layers.{i}.{cls._NAMES[kind]}"] = t
            else:
                key = cls._TOP.get(name)
                if key:
                    out[key] = t
        out.setdefault("lm_head", out.get("tok_embd"))
        return out

    @classmethod
    def from_gguf(cls, f: GGUFFile, device=None, dtype=torch.float32) -> "Model":
        return build(cls, ModelArgs.from_gguf(f), f, device, dtype)[0]

    # -- memory ----------------------------------------------------------------------------------
    def make_cache(self, n_ctx: int, n_seq_max: int = 1, dtype=None) -> RecurrentMemory:
        a = self.args
        return RecurrentMemory(a.n_layer, n_seq_max, (a.d_conv - 1, a.d_inner), ssm.state_shape(a.d_inner, a.d_state),
                               dtype=dtype or torch.float32, device=self.device)

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, ub, view: RecurrentView) -> torch.Tensor:
        x = self.tok_embd[ub.tokens.to(self.device)]
        for i, layer in enumerate(self.layers):
            x = layer(x, i, view)
        return ops.rms_norm(x, self.norm, self.args.rms_eps)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return ops.linear(h, self.lm_head).float()
