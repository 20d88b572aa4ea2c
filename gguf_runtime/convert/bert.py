"""BERT encoders (BertModel, e.g. sentence-transformers' all-MiniLM-L6-v2): llama.cpp's BertModel
conversion, with the pooling type read from modules.json / the Pooling module's config."""
from __future__ import annotations

import gguf

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register

_POOLING = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}


def pooling_type(model_dir) -> gguf.PoolingType | None:
    """sentence-transformers' pooling: the first module of type *Pooling in modules.json."""
    modules = vocab._json(model_dir / "modules.json")
    path = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None) \
        if isinstance(modules, list) else None
    if path is None:
        return None
    cfg = vocab._json(model_dir / path / "config.json")
    for flag, kind in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                       ("pooling_mode_lasttoken", "lasttoken")):
        if cfg.get(flag):
            return _POOLING[kind]
    if (mode := cfg.get("pooling_mode")) in _POOLING:
        return _POOLING[mode]
    raise ConvertError(f"{model_dir / path / 'config.json'}: only mean, cls and last-token pooling are supported")


@register("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
class BertConverter(ModelConverter):
    arch = gguf.MODEL_ARCH.BERT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.hp.get("id2label")
        if labels and len(labels) == 2 and labels.get("0", labels.get(0)) == "LABEL_0":
            labels = None  # the dummy labels AutoConfig adds
        self.labels = labels

    def set_params(self, w: gguf.GGUFWriter) -> None:
        self.text_params(w)
        w.add_causal_attention(False)
        if (pool := pooling_type(self.dir)) is not None:
            w.add_pooling_type(pool)
        if self.labels:
            w.add_classifier_output_labels([v for _, v in sorted(self.labels.items(), key=lambda kv: int(kv[0]))])

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        vocab.bert(w, self.dir, self.find("vocab_size", default=None), self.hp.get("type_vocab_size", 1))

    def rename(self, name: str) -> str | None:
        name = name.removeprefix("bert.")
        if name.endswith(".gamma"):
            name = name[:-6] + ".weight"
        elif name.endswith(".beta"):
            name = name[:-5] + ".bias"
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias") \
                or name.startswith(("cls.predictions", "cls.seq_relationship")):
            return None  # embeddings only: no pooler, no pre-training heads
        if self.labels and name in ("classifier.weight", "classifier.bias"):
            name = name.replace("classifier.", "classifier.out_proj.")
        return name
