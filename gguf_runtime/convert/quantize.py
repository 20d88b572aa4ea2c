"""``quantize IN OUT TYPE``: an f32 / f16 / bf16 GGUF -> a quantized GGUF, as llama-quantize does.

Per-tensor types follow llama.cpp's llama_tensor_get_type (src/llama-quant.cpp): which tensors
may be quantized, the Q4_K_M / Q5_K_M mixes (output Q6_K; attn_v and ffn_down Q6_K on the
"more bits" layers), and the fallbacks for rows that are not a multiple of the block size (Q4_K ->
Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). Q4_0 ... Q8_0 go through gguf-py's quantizer; Q4_K,
Q5_K and Q6_K through ours (kquants.py). Tensors are read, quantized and written one at a time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from gguf_runtime.atomic import AtomicWriteError, check_not_input
from gguf_runtime.errors import ConvertError, UnsupportedError
from gguf_runtime.gguf.hparams import MAX_LAYERS, HParams
from gguf_runtime.gguf.reader import GGUFFile

from .kquants import BLOCK_BYTES, quantize_k
from .writer import TensorPlan, add_infos, write_gguf

FTYPES: dict[str, tuple[F, Q]] = {
    "Q4_0": (F.MOSTLY_Q4_0, Q.Q4_0), "Q4_1": (F.MOSTLY_Q4_1, Q.Q4_1), "Q5_0": (F.MOSTLY_Q5_0, Q.Q5_0),
    "Q5_1": (F.MOSTLY_Q5_1, Q.Q5_1), "Q8_0": (F.MOSTLY_Q8_0, Q.Q8_0),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, Q.Q4_K), "Q4_K_M": (F.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, Q.Q5_K), "Q5_K_M": (F.MOSTLY_Q5_K_M, Q.Q5_K), "Q6_K": (F.MOSTLY_Q6_K, Q.Q6_K),
    "F16": (F.MOSTLY_F16, Q.F16), "BF16": (F.MOSTLY_BF16, Q.BF16), "F32": (F.ALL_F32, Q.F32),
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize's
FLOATS = (Q.F32, Q.F16, Q.BF16)
_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")  # llama.cpp's attention-V-like categories
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# tensors llama.cpp never quantizes (tensor_allows_quantization), besides 1-D ones and non-weights
_KEEP = re.compile(r"_norm\.weight|ffn_gate_inp\.weight|ffn_gate_tid2eid\.weight|altup|laurel|per_layer_model_proj"
                   r"|ssm_conv1d|shortconv\.conv\.weight|indexer\.[kq]_proj\.weight|attn_rel_b\.weight"
                   r"|time_mix_(first|[wvag][0-2]|decay_w[12]|lerp_fused)\.weight|\.position_embd|\.rel_pos"
                   r"|\.patch_embd|\.patch_merger")
_EXACT_KEEP = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",
               gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_TYPES] + ".weight"}


def resolve(type_name: str) -> tuple[str, F, Q]:
    name = ALIASES.get(type_name.upper(), type_name.upper())
    if name not in FTYPES:
        raise UnsupportedError(f"unknown quantization type {type_name!r} (one of {', '.join([*FTYPES, *ALIASES])})")
    return (name, *FTYPES[name])


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def allows_quantization(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and name not in _EXACT_KEEP and not _KEEP.search(name)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                 "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class Mixer:
    """llama_tensor_get_type's per-file state and rules, for the ftypes supported here."""
    ftype: F
    default: Q
    arch: str
    n_layer: int
    n_expert: int = 0
    is_70b: bool = False
    tied: bool = True
    n_attn_v: int = 0
    i_attn_v: int = 0
    i_ffn_down: int = 0
    n_fallback: int = 0

    def choose(self, name: str, ncols: int) -> Q:
        t = self.default
        cat, falcon, f = category(name), self.arch == "falcon", self.ftype
        if cat == "output" or (self.tied and cat == "token_embd"):
            if falcon or ncols % gguf.GGML_QUANT_SIZES[t][0]:
                t = Q.Q8_0
            elif t != Q.Q8_0:
                t = Q.Q6_K
        elif cat in _ATTN_V:
            if f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(self.i_attn_v, self.n_attn_v):
                t = Q.Q6_K
            elif f == F.MOSTLY_Q4_K_S and self.i_attn_v < 4:
                t = Q.Q5_K
            if self.is_70b and t == Q.Q4_K:
                t = Q.Q5_K
            if self.n_expert == 8:
                t = Q.Q8_0
            self.i_attn_v += 1
        elif cat == "attn_k" and self.n_expert == 8:
            t = Q.Q8_0
        elif cat == "ffn_down":
            i = layer_of(name) if self.n_expert > 1 else self.i_ffn_down
            n = self.n_layer
            if f == F.MOSTLY_Q4_K_M:
                if falcon:
                    t = Q.Q6_K if i < n // 16 else Q.Q5_K if _use_more_bits(i, n) else Q.Q4_K
                elif _use_more_bits(i, n):
                    t = Q.Q6_K
            elif f == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
                t = Q.Q6_K
            elif f == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
                t = Q.Q5_K
            self.i_ffn_down += 1
        elif cat == "attn_output" and not falcon and self.n_expert == 8 and f in (F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
            t = Q.Q5_K
        return t

    def fallback(self, t: Q, ncols: int) -> Q:
        """A type whose block divides the rows, as tensor_type_fallback picks it."""
        if ncols % gguf.GGML_QUANT_SIZES[t][0] == 0:
            return t
        self.n_fallback += 1
        t = _FALLBACK.get(t, t)
        return t if ncols % gguf.GGML_QUANT_SIZES[t][0] == 0 else Q.F16


def encode(x, qtype: Q, device=None) -> np.ndarray:
    """Float rows -> ``qtype`` bytes (gguf-py for float and legacy types, ours for K-quants)."""
    if qtype in BLOCK_BYTES:
        return quantize_k(x, qtype, device=device)
    return gguf.quants.quantize(np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float32), qtype)


def _copy_kv(w: gguf.GGUFWriter, f: GGUFFile, skip: set[str]) -> None:
    """Copy ``f``'s metadata (already parsed and validated by our reader) to ``w``, types kept."""
    V = gguf.GGUFValueType
    for key, val in f.metadata.items():
        if key in skip:
            continue
        vtype, sub = f.field_types[key]
        if vtype == V.ARRAY:
            if sub == V.ARRAY or len(val) == 0:
                continue  # nested or empty arrays: gguf-py's writer cannot write them
            w.add_key_value(key, val.tolist() if isinstance(val, np.ndarray) else list(val), vtype, sub_type=sub)
        else:
            w.add_key_value(key, val, vtype)


def quantize(src: str | Path, dst: str | Path, type_name: str, pure: bool = False, progress: bool = True,
             device=None) -> Path:
    """Quantize GGUF ``src`` to ``dst`` as llama-quantize ``src dst TYPE`` (``--pure``: no mixes)."""
    src, dst = Path(src), Path(dst)
    name, ftype, default = resolve(type_name)
    try:
        check_not_input(dst, [src])  # same inode: the path itself, a symlink or a hard link
    except AtomicWriteError as e:
        raise ConvertError(str(e)) from None
    f = GGUFFile(src)
    arch = f.arch
    hp = HParams(f)
    names = sorted(f.tensor_infos, key=lambda n: (layer_of(n), n))  # llama.cpp's weight order
    n_layer = hp.int("block_count", 0, lo=0, hi=MAX_LAYERS)
    mixer = Mixer(ftype, default, arch, n_layer, n_expert=hp.int("expert_count", 0, lo=0),
                  tied="output.weight" not in names,
                  is_70b=arch == "llama" and n_layer == 80
                  and f.get("{arch}.attention.head_count") != f.get("{arch}.attention.head_count_kv"),
                  n_attn_v=sum(category(n) in _ATTN_V for n in names))
    plans = []
    for n in names:
        info = f.tensor_infos[n]
        t = info.qtype
        if allows_quantization(n, len(info.shape)):
            t = default
            if default not in FLOATS:
                t = mixer.fallback(t if pure else mixer.choose(n, info.shape[-1]), info.shape[-1])
            if t != info.qtype and info.qtype not in FLOATS:
                raise ConvertError(f"{src}: {n} is already quantized ({info.qtype.name}); quantize an f32/f16/bf16 GGUF")
        plans.append(TensorPlan(n, info.shape, t))

    w = gguf.GGUFWriter(None, arch)
    if "general.alignment" in f.metadata:  # the data must be laid out as the copied key says
        w.add_custom_alignment(f.alignment)
    add_infos(w, plans)
    _copy_kv(w, f, {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION,
                    gguf.Keys.General.ALIGNMENT})
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(ftype)

    def data() -> Iterator[tuple[str, np.ndarray]]:
        for p in plans:
            if p.qtype == f.tensor_infos[p.name].qtype:
                yield p.name, np.asarray(f.raw(p.name))
            else:
                yield p.name, encode(f.tensor(p.name), p.qtype, device)

    return write_gguf(w, dst, plans, data(), progress, f"quantize {name}", inputs=[src])
