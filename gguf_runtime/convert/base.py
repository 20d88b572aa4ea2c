"""The model-converter base: hyperparameters, tensor renaming through gguf-py's TensorNameMap,
and the output-type rules of llama.cpp's convert_hf_to_gguf.py.

A converter subclass names its gguf ``arch``, writes its metadata (``set_params``, ``set_vocab``)
and maps each checkpoint tensor to GGUF tensors (``transform``). ``transform`` only reshapes,
permutes and applies elementwise maths, so it runs on meta tensors too: the driver plans the whole
file from shapes alone, then streams the data one tensor at a time.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import gguf
import torch
from gguf import GGMLQuantizationType as Q
from gguf import MODEL_TENSOR as MT

from gguf_runtime.errors import ConvertError

from .checkpoint import Checkpoint

REGISTRY: dict[str, type[ModelConverter]] = {}

# tensors llama.cpp's converter keeps in F32 whatever the output type
F32_TENSORS = (MT.FFN_GATE_INP, MT.POS_EMBD, MT.TOKEN_TYPES, MT.SSM_CONV1D)
OUTTYPES = {"f32": (gguf.LlamaFileType.ALL_F32, Q.F32), "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
            "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16), "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0)}
_MISSING = object()


def register(*hf_archs: str):
    def deco(cls):
        for a in hf_archs:
            REGISTRY[a] = cls
        return cls
    return deco


def block_id(name: str) -> int | None:
    """The first all-digit part of a dotted name (llama.cpp's block id)."""
    return next((int(p) for p in name.split(".") if p.isdecimal()), None)


class ModelConverter:
    arch: gguf.MODEL_ARCH
    vocab_pre: str | None = None  # --vocab-pre: the BPE pre-tokenizer name, overriding recognition

    def __init__(self, model_dir: Path, hparams: dict, ckpt: Checkpoint):
        self.dir, self.hp, self.ckpt = Path(model_dir), hparams, ckpt
        self.block_count = int(self.find("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
        self.tmap = gguf.get_tensor_name_map(self.arch, self.block_count)

    # -- hyperparameters

    def find(self, *keys: str, default=_MISSING):
        for k in keys:
            if self.hp.get(k) is not None:
                return self.hp[k]
        if default is _MISSING:
            raise ConvertError(f"{self.dir / 'config.json'}: none of {', '.join(keys)} is set")
        return default

    # -- tensors

    def rename(self, name: str) -> str | None:
        """Normalise a checkpoint name before mapping; None drops the tensor."""
        return name

    def drop(self, name: str, new: str) -> bool:
        """A data-dependent drop of tensor ``name`` (GGUF ``new``), decided once at planning time."""
        return False

    def map(self, name: str) -> str:
        new = self.tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"tensor {name!r} has no GGUF name for arch {gguf.MODEL_ARCH_NAMES[self.arch]}")
        return new

    def transform(self, name: str, t: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        yield self.map(name), t

    def generated(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Tensors computed from hyperparameters (e.g. rope factors); small, built eagerly."""
        return ()

    def is_tensor(self, name: str, key: MT, suffix: str = ".weight") -> bool:
        """Whether GGUF tensor ``name`` is a ``key`` tensor of this arch (any block)."""
        if key not in gguf.MODEL_TENSORS[self.arch]:
            return False
        pattern = re.escape(gguf.TENSOR_NAMES[key]).replace(r"\{bid\}", r"\d+")
        return re.fullmatch(pattern + re.escape(suffix), name) is not None

    def tensor_type(self, name: str, shape: tuple[int, ...], default: Q) -> Q:
        """llama.cpp's choice in prepare_tensors: 1-D, norms, biases and a few small tensors stay
        F32; Q8_0 falls back to F16 when a row is not a multiple of its block."""
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
                or any(self.is_tensor(name, k) for k in F32_TENSORS):
            return Q.F32
        if default not in (Q.F32, Q.F16, Q.BF16) and shape[-1] % gguf.GGML_QUANT_SIZES[default][0]:
            return Q.F16
        return default

    # -- metadata

    def set_params(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def rope_parameters(self) -> dict:
        rp = dict(self.hp.get("rope_parameters") or self.hp.get("rope_scaling") or {})
        rp = rp.get("full_attention", rp)
        if "rope_theta" not in rp and (theta := self.find("rope_theta", "rotary_emb_base", default=None)) is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        if "original_max_position_embeddings" not in rp and "original_max_position_embeddings" in self.hp:
            rp["original_max_position_embeddings"] = self.hp["original_max_position_embeddings"]
        return rp

    def text_params(self, w: gguf.GGUFWriter) -> None:
        """The generic transformer keys of llama.cpp's TextModel.set_gguf_parameters."""
        w.add_block_count(self.block_count)
        keys = [
            (w.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length")),
            (w.add_embedding_length, ("hidden_size", "n_embd", "dim")),
            (w.add_feed_forward_length, ("intermediate_size", "n_inner", "hidden_dim")),
            (w.add_head_count, ("num_attention_heads", "n_head", "n_heads")),
            (w.add_head_count_kv, ("num_key_value_heads", "n_kv_heads")),
        ]
        for add, names in keys:
            if (v := self.find(*names, default=None)) is not None:
                add(v)
        if self.hp.get("is_causal") is False:
            w.add_causal_attention(False)
        rp = self.rope_parameters()
        kind, factor = rp.get("rope_type"), rp.get("factor")
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if (v := rp.get(key, rp.get("attn_factor") if key == "attention_factor" else None)) is not None:
                    add(v)
        elif kind in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        if (theta := rp.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (eps := self.find("rms_norm_eps", "norm_eps", default=None)) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (eps := self.find("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", default=None)) is not None:
            w.add_layer_norm_eps(eps)
        if (head_dim := self.hp.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
