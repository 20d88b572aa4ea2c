"""``convert``: a Hugging Face or state-spaces checkpoint folder -> GGUF, as llama.cpp's
convert_hf_to_gguf.py writes it.

The file is planned from tensor shapes alone (each converter's transform runs on meta tensors),
then written one checkpoint tensor at a time: peak memory is about the largest tensor.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from gguf_runtime.errors import ConvertError

from . import bert, gpt2, llama, mamba  # noqa: F401 - register the converters
from . import gemma, mixtral, phi3, qwen  # noqa: F401 - register the converters (#14, #15)
from . import granitehybrid, jamba, t5  # noqa: F401 - register the converters (#21)
from .base import OUTTYPES, REGISTRY, ModelConverter
from .checkpoint import Checkpoint
from .writer import TensorPlan, add_infos, write_gguf

log = logging.getLogger(__name__)


def load_config(model_dir: Path) -> dict:
    cfg = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConvertError(f"{model_dir}: not a folder")
    if not cfg.is_file():
        raise ConvertError(f"{model_dir}: no config.json")
    try:
        hp = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(hp, dict):
        raise ConvertError(f"{cfg}: not a JSON object")
    return {**hp, **hp["text_config"]} if isinstance(hp.get("text_config"), dict) else hp


def converter_class(hp: dict, model_dir: Path) -> type[ModelConverter]:
    """By HF ``architectures``; a state-spaces Mamba config (``d_model``, ``ssm_cfg``, no
    architectures: llama.cpp stops there, #8690) is recognised by its keys."""
    archs = hp.get("architectures") or []
    if not archs and "d_model" in hp and "ssm_cfg" in hp:
        return mamba.Mamba2Converter if (hp.get("ssm_cfg") or {}).get("layer") == "Mamba2" else mamba.MambaConverter
    if not archs:
        raise ConvertError(f"{model_dir / 'config.json'}: no 'architectures' and not a state-spaces Mamba config")
    cls = REGISTRY.get(archs[0])
    if cls is None:
        raise ConvertError(f"unsupported architecture {archs[0]} (supported: {', '.join(sorted(REGISTRY))})")
    return cls


def _auto_outtype(ckpt: Checkpoint) -> str:
    """llama.cpp's "auto": bf16 or f16 after the first 2-D tensor's dtype, else f16."""
    for name in ckpt.names():
        t = ckpt.meta(name)
        if t.dim() >= 2:
            return "bf16" if t.dtype == torch.bfloat16 else "f16"
    return "f16"


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(t.detach().cpu().contiguous().numpy(), qtype)


def convert(model_dir: str | Path, outfile: str | Path | None = None, outtype: str = "auto",
            progress: bool = True, vocab_pre: str | None = None, model_name: str | None = None) -> Path:
    """Convert the checkpoint in ``model_dir`` to a GGUF at ``outfile`` (default
    ``./<folder>-<type>.gguf``); ``outtype`` is f32, f16, bf16, q8_0 or auto. ``vocab_pre`` names
    the BPE pre-tokenizer (llama.cpp's name), ``model_name`` sets general.name (llama.cpp's
    --model-name)."""
    model_dir = Path(model_dir)
    hp = load_config(model_dir)
    cls = converter_class(hp, model_dir)
    ckpt = Checkpoint(model_dir)
    with _config_errors(model_dir):
        conv = cls(model_dir, hp, ckpt)
    conv.vocab_pre = vocab_pre
    outtype = outtype.lower()
    if outtype == "auto":
        outtype = _auto_outtype(ckpt)
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r} (f32, f16, bf16, q8_0 or auto)")
    ftype, default = OUTTYPES[outtype]
    out = Path(outfile) if outfile else Path.cwd() / f"{model_dir.resolve().name}-{outtype}.gguf"

    # plan: every output tensor's name, shape and type, from meta tensors
    plans: list[TensorPlan] = []
    sources: list[tuple[str | None, str, list[TensorPlan]]] = []  # (checkpoint name, renamed, outputs)
    for name, t in conv.generated():
        plan = TensorPlan(name, tuple(t.shape), conv.tensor_type(name, tuple(t.shape), default))
        plans.append(plan)
        sources.append((None, name, [plan]))
    for src in ckpt.names():
        name = conv.rename(src)
        if name is None:
            continue
        outs = []
        try:
            mapped = list(conv.transform(name, _as_float(ckpt.meta(src))))
        except (RuntimeError, ValueError) as e:  # e.g. a head count that does not divide the rows
            raise ConvertError(f"{src} {tuple(ckpt.meta(src).shape)} does not fit config.json ({str(e).splitlines()[0]})") from None
        for new, t in mapped:
            if not conv.drop(src, new):
                outs.append(TensorPlan(new, tuple(t.shape), conv.tensor_type(new, tuple(t.shape), default)))
        plans += outs
        sources.append((src, name, outs))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConvertError(f"two checkpoint tensors map to {dup}")

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[conv.arch])
    add_infos(w, plans)
    _general(w, model_dir, model_name)
    with _config_errors(model_dir):
        conv.set_params(w)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        conv.set_vocab(w)

    generated = dict(conv.generated())

    def encoded(src: str, name: str, outs: list[TensorPlan]) -> list[tuple[str, np.ndarray]]:
        """One checkpoint tensor's outputs; the tensor itself is released on return."""
        want = {p.name: p.qtype for p in outs}
        return [(new, _encode(t, want[new])) for new, t in conv.transform(name, _as_float(ckpt.load(src))) if new in want]

    def data() -> Iterator[tuple[str, np.ndarray]]:
        for src, name, outs in sources:
            if src is None:
                yield name, _encode(generated[name], outs[0].qtype)
            elif outs:
                yield from encoded(src, name, outs)

    inputs = [p for p in model_dir.iterdir() if p.is_file()]  # never write over the checkpoint's own files
    return write_gguf(w, out, plans, data(), progress, f"convert {model_dir.name}", inputs=inputs)


@contextmanager
def _config_errors(model_dir: Path):
    """A config or tokenizer value of an unexpected kind: one line, not a traceback."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConvertError(f"{model_dir}: unexpected config or tokenizer contents ({type(e).__name__}: {e})") from None


def _general(w: gguf.GGUFWriter, model_dir: Path, model_name: str | None = None) -> None:
    """general.* provenance as llama.cpp derives it (model card, folder name, size label)."""
    total, shared, expert, count = w.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, model_dir, model_name, total)
    except Exception as e:  # noqa: BLE001 - a malformed model card must not stop a conversion
        log.warning("ignoring model card metadata: %s", e)
        meta = gguf.Metadata()
    meta.name = model_name or meta.name or model_dir.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
