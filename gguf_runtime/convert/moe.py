"""Mixture-of-experts checkpoints, as llama.cpp's converter writes them: the per-expert Hugging Face
tensors ``...experts.{x}.{kind}.weight`` of a layer become one 3-D GGUF tensor per kind, experts
stacked outermost (torch shape ``(n_expert, rows, cols)``), plus the generic expert-count keys.

llama.cpp emits a layer's stacked tensors when it reaches the last of that layer's expert tensors in
checkpoint order; so do we. The other experts are not mapped on their own: the stacking source loads
them itself (meta tensors while planning, data while writing), so peak memory is one layer's experts.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import gguf
import torch

from gguf_runtime.errors import ConvertError

from .base import ModelConverter, block_id

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<xid>\d+)\.(?P<kind>[^.]+)\.weight$")


def expert_params(conv: ModelConverter, w: gguf.GGUFWriter) -> None:
    """The expert keys of llama.cpp's TextModel.set_gguf_parameters."""
    if (n := conv.find("num_local_experts", "num_experts", "n_routed_experts", default=None)) is not None:
        w.add_expert_count(n)
    if (used := conv.find("num_experts_per_tok", "num_experts_per_token", "top_k_experts", default=None)) is not None:
        w.add_expert_used_count(used)
    score = conv.find("score_function", "scoring_func", "score_func", "moe_router_activation",
                      "moe_router_activation_func", "expert_selection_fn", default=None)
    if score is not None:
        funcs = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
        if score not in funcs:
            raise ConvertError(f"{conv.dir / 'config.json'}: unsupported expert gating function {score!r}")
        w.add_expert_gating_func(funcs[score])


class ExpertStacks:
    """Which checkpoint tensors are per-expert pieces, and how each layer's pieces stack.

    ``names``: (checkpoint name, renamed name) of every tensor; ``kinds``: the per-expert weight
    names in llama.cpp's output order (e.g. ``w1 w2 w3``); ``merged(bid, kind)``: the Hugging Face
    name the stack is mapped under (e.g. ``layers.{bid}.feed_forward.experts.w1.weight``).
    """

    def __init__(self, conv: ModelConverter, names: Iterable[tuple[str, str]], n_experts: int,
                 kinds: tuple[str, ...], merged: Callable[[int, str], str]):
        self.conv, self.kinds, self.merged, self.n = conv, kinds, merged, int(n_experts)
        self.src: dict[str, str] = {}                             # renamed -> checkpoint name
        self.layer: dict[int, dict[tuple[str, int], str]] = {}    # bid -> (kind, expert) -> renamed
        last: dict[int, str] = {}                                 # bid -> its last piece in checkpoint order
        for src, name in names:
            m = _EXPERT.match(name)
            if m is None or m["kind"] not in kinds:
                continue
            bid = block_id(name)
            if bid is None:
                raise ConvertError(f"expert tensor {src!r} has no layer number")
            self.src[name] = src
            self.layer.setdefault(bid, {})[(m["kind"], int(m["xid"]))] = name
            last[bid] = name
        self.trigger = {name: bid for bid, name in last.items()}  # the piece that emits layer bid
        want = {(k, x) for k in kinds for x in range(self.n)}
        for bid, pieces in self.layer.items():
            if set(pieces) != want:
                missing = sorted(want - set(pieces))
                extra = sorted(set(pieces) - want)
                what = f"missing {missing[0][1]}.{missing[0][0]}" if missing else f"unexpected expert {extra[0][1]}"
                raise ConvertError(f"layer {bid}: expected {self.n} experts x {'/'.join(kinds)} "
                                   f"(config.json), found {len(pieces)} tensors ({what})")

    def is_piece(self, name: str) -> bool:
        return name in self.src

    def keep(self, name: str) -> bool:
        """Whether renamed checkpoint tensor ``name`` is mapped: not a piece, or the one that emits."""
        return name not in self.src or name in self.trigger

    def stacked(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """For the emitting piece ``name`` (its tensor ``t``): (HF merged name, stack) per kind."""
        bid = self.trigger[name]
        for kind in self.kinds:
            parts = [t if self.layer[bid][(kind, x)] == name else self._load(self.layer[bid][(kind, x)], t.is_meta)
                     for x in range(self.n)]
            yield self.merged(bid, kind), torch.stack(parts, dim=0)

    def _load(self, name: str, meta: bool) -> torch.Tensor:
        src = self.src[name]
        t = self.conv.ckpt.meta(src) if meta else self.conv.ckpt.load(src)
        return t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)
