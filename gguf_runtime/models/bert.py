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
ubatch and attends each token over its own sequence with the same fixed-order kernel as every other model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gguf import PoolingType
from torch import nn

from .. import kernels
from ..errors import UnsupportedError
from ..gguf.hparams import HParams
from ..memory.encoder import EncoderMemory, EncoderView
from ..numerics import Numerics
from .base import Model as BaseModel
from .base import ModelArgs as BaseArgs
from .layers import Embedding, LayerNorm, Linear

POOLING = {int(p): p.name.lower() for p in PoolingType}


@dataclass
class ModelArgs(BaseArgs):
    n_head: int = 0
    n_ff: int = 0
    norm_eps: float = 1e-12
    fused_qkv: bool = False
    n_cls_out: int = 0  # classifier labels (rank pooling), 0 without a classifier

    @classmethod
    def from_gguf(cls, hp: HParams) -> "ModelArgs":
        n_embd, n_head = hp.int("embedding_length"), hp.int("attention.head_count")
        labels = hp.raw("classifier.output_labels", [])
        args = cls(
            n_vocab=hp.tensor_shape("token_embd.weight")[0],
            n_embd=n_embd, n_layer=hp.n_layer(), n_head=n_head,
            n_ctx_train=hp.tensor_shape("position_embd.weight")[0],
            n_ff=hp.int("feed_forward_length"),
            norm_eps=hp.float("attention.layer_norm_epsilon", 1e-12, lo=0.0),
            pooling=POOLING.get(hp.int("pooling_type", 0, lo=-1, hi=1 << 16), "none"),
            causal=hp.bool("attention.causal", False),
            fused_qkv=hp.has_tensor("blk.0.attn_qkv.weight"),
            n_cls_out=hp.tensor_shape("cls.output.weight")[0] if hp.has_tensor("cls.output.weight") else 0,
            cls_labels=[str(x) for x in (labels if isinstance(labels, list) else [])],
        )
        if args.causal:
            raise UnsupportedError(f"{hp.where}: causal BERT ({hp.key('attention.causal')} = true) is not supported")
        hp.divides(n_head, n_embd, f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
        return args


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        e, ff = a.n_embd, a.n_ff
        self.args = a
        if a.fused_qkv:
            self.attn_qkv = Linear(e, 3 * e, bias="optional")
        else:
            self.attn_q, self.attn_k, self.attn_v = (Linear(e, e, bias="optional") for _ in range(3))
        self.attn_output = Linear(e, e, bias="optional")
        self.attn_output_norm = LayerNorm(e, a.norm_eps)
        self.ffn_up = Linear(e, ff, bias="optional")
        self.ffn_down = Linear(ff, e, bias="optional")
        self.layer_output_norm = LayerNorm(e, a.norm_eps)
        self.scale = 1.0 / math.sqrt(e // a.n_head)

    def attention(self, x: torch.Tensor, kv: EncoderView) -> torch.Tensor:
        a, n = self.args, x.shape[0]
        if a.fused_qkv:
            q, k, v = self.attn_qkv(x).view(n, 3, a.n_head, -1).unbind(1)
        else:
            q, k, v = (lin(x).view(n, a.n_head, -1) for lin in (self.attn_q, self.attn_k, self.attn_v))
        return self.attn_output(kv.attend(q, k, v, scale=self.scale).reshape(n, -1))

    def forward(self, x: torch.Tensor, kv: EncoderView) -> torch.Tensor:
        x = self.attn_output_norm(x + self.attention(x, kv))
        return self.layer_output_norm(x + self.ffn_down(kernels.gelu(self.ffn_up(x))))


class Model(BaseModel):
    Args = ModelArgs
    optional = frozenset({"token_types", "cls", "cls.output"})

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        e = args.n_embd
        self.token_embd = Embedding(args.n_vocab, e)
        self.token_types = Embedding(2, e)  # row 0 ("sentence A") is added to every token, as llama.cpp does
        self.position_embd = Embedding(args.n_ctx_train, e)
        self.token_embd_norm = LayerNorm(e, args.norm_eps)
        self.blk = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.cls = Linear(e, e, bias="optional")  # the classifier head of rank pooling, when present
        self.cls.output = Linear(e, max(1, args.n_cls_out), bias="optional")
        self.output = None  # no language-model head

    def loaded(self, f) -> None:
        zero = torch.zeros(1, dtype=torch.long)
        self.type0 = self.token_types(zero)[0] if self.token_types.present else \
            torch.zeros(self.args.n_embd, dtype=self.dtype, device=self.device)

    @property
    def has_rank_head(self) -> bool:
        return self.cls.present or self.cls.output.present

    @property
    def n_cls_out(self) -> int:
        return self.args.n_cls_out if self.cls.output.present else 0

    def make_memory(self, n_ctx: int, n_seq_max: int, numerics: Numerics) -> EncoderMemory:
        return EncoderMemory(n_seq_max, self.args.n_ctx_train, self.device)

    def forward(self, ub, view: EncoderView) -> torch.Tensor:
        n, pad = ub.n_tokens, view.n_rows - ub.n_tokens
        tokens, pos = (torch.cat([t, t.new_zeros(pad)]) for t in (ub.tokens, ub.pos))
        x = self.token_embd(tokens) + self.type0 + self.position_embd(pos)
        x = self.token_embd_norm(x)
        for il, block in enumerate(self.blk):
            x = block(x, view.layer(il))
        return x[:n]

    def rank(self, h: torch.Tensor) -> torch.Tensor:
        """Classifier head of rank pooling (llama.cpp build_pooling RANK): tanh(cls(h)), then cls.output."""
        x = h.to(self.dtype)
        if self.cls.present:
            x = torch.tanh(self.cls(x))
        if self.cls.output.present:
            x = self.cls.output(x)
        return x.float()
