"""BERT encoders (all-MiniLM, bge, e5, ...): non-causal attention, absolute positions, post-LayerNorm, GELU.

Reads llama.cpp's BERT GGUF layout (``convert_hf_to_gguf.py`` BertModel): ``token_embd``,
``token_types`` (row 0 is added to every token: "sentence A", as llama.cpp does), ``position_embd``,
``token_embd_norm``, ``blk.N.{attn_q,attn_k,attn_v | attn_qkv, attn_output, attn_output_norm, ffn_up,
ffn_down, layer_output_norm}`` (weights and biases), and the optional classifier head ``cls`` /
``cls.output`` used by rank pooling. Metadata: ``bert.attention.layer_norm_epsilon``,
``bert.pooling_type``, ``bert.classifier.output_labels``.

The FFN activation is the exact (erf) GELU that BERT checkpoints are trained with (HF ``hidden_act:
gelu``); llama.cpp's ggml_gelu uses the tanh approximation, a difference of ~1e-4 in the hidden states.
The model keeps no state: :class:`~gguf_runtime.memory.encoder.EncoderMemory` packs whole sequences per
ubatch and lays them out for :func:`attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gguf import PoolingType
from torch import nn

from .. import ops
from ..device import resolve_device
from ..errors import GGUFFormatError, UnsupportedError
from ..memory.encoder import EncoderMemory, EncoderView
from ..reader import GGUFFile

POOLING = {int(p): p.name.lower() for p in PoolingType}


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    norm_eps: float
    n_ctx_train: int
    n_token_types: int = 2
    pooling: str = "none"
    causal: bool = False
    cls_labels: list[str] = field(default_factory=list)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        a = f.arch
        g = lambda k, d=None: f.get(f"{a}.{k}", d)  # noqa: E731
        try:
            n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
            args = cls(
                n_vocab=int(f.tensor_infos["token_embd.weight"].shape[0]),
                n_embd=n_embd, n_layer=int(g("block_count")), n_head=n_head,
                n_ff=int(g("feed_forward_length")),
                norm_eps=float(g("attention.layer_norm_epsilon", 1e-12)),
                n_ctx_train=int(f.tensor_infos["position_embd.weight"].shape[0]),
                n_token_types=int(f.get("tokenizer.ggml.token_type_count", 2)),
                pooling=POOLING.get(int(g("pooling_type", 0)), "none"),
                causal=bool(g("attention.causal", False)),
                cls_labels=[str(x) for x in (g("classifier.output_labels") or [])],
            )
        except (KeyError, TypeError) as e:
            raise GGUFFormatError(f"{f.path}: BERT metadata or tensor missing ({e})") from None
        if args.causal:
            raise UnsupportedError(f"{f.path}: causal BERT ({a}.attention.causal = true) is not supported")
        if n_embd % n_head:
            raise GGUFFormatError(f"{f.path}: embedding_length {n_embd} is not a multiple of head_count {n_head}")
        return args


def attention(qkv: torch.Tensor, view: EncoderView, scale: float) -> torch.Tensor:
    """Non-causal attention of every token over its own sequence: qkv (n, 3, n_head, d) -> (n, n_head * d).

    Each bucket of the view holds sequences padded to one length L (padding keys masked out), so a
    token's attention is computed with shapes set by its own sequence only, whatever shares the ubatch."""
    n, _, h, d = qkv.shape
    outs = []
    for b in view.buckets:
        q, k, v = qkv[b.idx].permute(2, 0, 3, 1, 4).unbind(0)  # (S, h, L, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.valid[:, None, None, :], scale=scale)
        outs.append(o.transpose(1, 2).reshape(-1, h * d))
    return torch.cat(outs)[view.inv]


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        e, ff = args.n_embd, args.n_ff
        self.args = args
        self.wqkv, self.bqkv = _param(3 * e, e), _param(3 * e)
        self.wo, self.bo = _param(e, e), _param(e)
        self.attn_norm_w, self.attn_norm_b = _param(e), _param(e)
        self.up, self.up_b = _param(ff, e), _param(ff)
        self.down, self.down_b = _param(e, ff), _param(e)
        self.out_norm_w, self.out_norm_b = _param(e), _param(e)
        self.scale = 1.0 / math.sqrt(e // args.n_head)

    def forward(self, x: torch.Tensor, view: EncoderView) -> torch.Tensor:
        a, n = self.args, x.shape[0]
        o = attention(ops.linear(x, self.wqkv, self.bqkv).view(n, 3, a.n_head, -1), view, self.scale)
        x = ops.layer_norm(x + ops.linear(o, self.wo, self.bo), self.attn_norm_w, self.attn_norm_b, a.norm_eps)
        f = ops.linear(ops.gelu(ops.linear(x, self.up, self.up_b)), self.down, self.down_b)
        return ops.layer_norm(x + f, self.out_norm_w, self.out_norm_b, a.norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        e = args.n_embd
        self.args = args
        self.tok_embd = _param(args.n_vocab, e)
        self.type_embd = _param(args.n_token_types, e)
        self.pos_embd = _param(args.n_ctx_train, e)
        self.norm_w, self.norm_b = _param(e), _param(e)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.cls = self.cls_b = self.cls_out = self.cls_out_b = None

    # -- weights ---------------------------------------------------------------------------------
    _TOP = {"token_embd.weight": "tok_embd", "token_types.weight": "type_embd", "position_embd.weight": "pos_embd",
            "token_embd_norm.weight": "norm_w", "token_embd_norm.bias": "norm_b", "cls.weight": "cls",
            "cls.bias": "cls_b", "cls.output.weight": "cls_out", "cls.output.bias": "cls_out_b"}
    _BLK = {"attn_qkv.weight": "wqkv", "attn_qkv.bias": "bqkv", "attn_output.weight": "wo", "attn_output.bias": "bo",
            "attn_output_norm.weight": "attn_norm_w", "attn_output_norm.bias": "attn_norm_b",
            "ffn_up.weight": "up", "ffn_up.bias": "up_b", "ffn_down.weight": "down", "ffn_down.bias": "down_b",
            "layer_output_norm.weight": "out_norm_w", "layer_output_norm.bias": "out_norm_b"}

    @classmethod
    def sanitize(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GGUF names -> parameters. Separate Q/K/V are fused into one projection; the biases and the
        token-type table llama.cpp treats as optional become zeros when absent."""
        out, qkv = {}, {}
        for name, t in weights.items():
            if name in cls._TOP:
                out[cls._TOP[name]] = t
            elif name.startswith("blk."):
                _, i, kind = name.split(".", 2)
                if kind in cls._BLK:
                    out[f"layers.{i}.{cls._BLK[kind]}"] = t
                elif kind.split(".")[0] in ("attn_q", "attn_k", "attn_v"):
                    qkv.setdefault(f"layers.{i}.", {})[kind] = t
        for pre, parts in qkv.items():
            if all(f"attn_{p}.weight" in parts for p in "qkv"):
                out[pre + "wqkv"] = torch.cat([parts[f"attn_{p}.weight"] for p in "qkv"])
                if all(f"attn_{p}.bias" in parts for p in "qkv"):
                    out[pre + "bqkv"] = torch.cat([parts[f"attn_{p}.bias"] for p in "qkv"])
        for key in [k for k in out if k.startswith("layers.")]:
            pre, name = key.rsplit(".", 1)
            bias = {"wqkv": "bqkv", "wo": "bo", "up": "up_b", "down": "down_b"}.get(name)
            if bias:
                out.setdefault(f"{pre}.{bias}", out[key].new_zeros(out[key].shape[0]))
        if "type_embd" not in out and "tok_embd" in out:
            out["type_embd"] = out["tok_embd"].new_zeros(1, out["tok_embd"].shape[1])
        return out

    @classmethod
    def from_gguf(cls, f: GGUFFile, device=None, dtype=torch.float32) -> "Model":
        dev = resolve_device(device)
        args = ModelArgs.from_gguf(f)
        weights = cls.sanitize({n: f.tensor(n, device=dev, dtype=dtype) for n in f.tensor_infos})
        args.n_token_types = int(weights["type_embd"].shape[0]) if "type_embd" in weights else 1
        head = {k: weights.pop(k, None) for k in ("cls", "cls_b", "cls_out", "cls_out_b")}
        with torch.device("meta"):
            model = cls(args)
        missing = sorted(set(model.state_dict()) - set(weights))
        if missing:
            raise GGUFFormatError(f"{f.path}: not a complete BERT GGUF (missing {', '.join(missing[:3])})")
        try:
            model.load_state_dict(weights, strict=False, assign=True)
        except RuntimeError as e:  # shape mismatch: name the first line torch gives
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise GGUFFormatError(f"{f.path}: BERT tensor with a wrong shape ({detail})") from None
        for k, t in head.items():
            setattr(model, k, t)
        model.dtype, model.device = dtype, dev
        return model.eval()

    # -- memory ----------------------------------------------------------------------------------
    def make_cache(self, n_ctx: int, n_seq_max: int = 1) -> EncoderMemory:
        return EncoderMemory(n_seq_max, self.args.n_ctx_train, self.device)

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, ub, view: EncoderView) -> torch.Tensor:
        dev, n, pad = self.device, ub.n_tokens, view.n_rows - ub.n_tokens
        tokens, pos = (torch.cat([t, t.new_zeros(pad)]).to(dev) for t in (ub.tokens, ub.pos))
        x = self.tok_embd[tokens] + self.type_embd[0] + self.pos_embd[pos]
        x = ops.layer_norm(x, self.norm_w, self.norm_b, self.args.norm_eps)
        for layer in self.layers:
            x = layer(x, view)
        return x[:n]

    def output(self, h: torch.Tensor) -> torch.Tensor:
        raise UnsupportedError("BERT has no language-model head: create the context with embeddings=True")

    @property
    def has_rank_head(self) -> bool:
        return self.cls is not None or self.cls_out is not None

    @property
    def n_cls_out(self) -> int:
        return 0 if self.cls_out is None else int(self.cls_out.shape[0])

    def rank(self, h: torch.Tensor) -> torch.Tensor:
        """Classifier head of rank pooling (llama.cpp build_pooling RANK): tanh(cls(h)), then cls.output."""
        x = h.to(self.dtype)
        if self.cls is not None:
            x = torch.tanh(ops.linear(x, self.cls, self.cls_b))
        if self.cls_out is not None:
            x = ops.linear(x, self.cls_out, self.cls_out_b)
        return x.float()
