"""T5 (T5ForConditionalGeneration, and MT5 / UMT5 of the same layout): llama.cpp's T5Model
conversion, arch ``t5``.

One token embedding: the first of ``decoder.embed_tokens``, ``encoder.embed_tokens`` and
``shared.weight`` in checkpoint order becomes ``token_embd`` (T5 ties them), the others are left
out. The vocabulary is ``tokenizer.model`` or ``spiece.model``: a unigram model is written as
tokenizer.ggml.model ``t5`` (UGM) with its normalizer's ``add_dummy_prefix``,
``remove_extra_whitespaces`` and ``precompiled_charsmap``; a BPE one as an ordinary sentencepiece
vocabulary (Pile-T5). The sentencepiece ModelProto is read here field by field (no protobuf
dependency).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

from gguf_runtime.errors import ConvertError

from . import vocab
from .base import ModelConverter, register

_EMBEDDINGS = ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "shared.weight")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields: number -> values (ints for varints, bytes for the rest)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        out.setdefault(num, []).append(v)
    return out


def spm_spec(path: Path) -> tuple[int, bool, bool, bytes]:
    """(model_type, add_dummy_prefix, remove_extra_whitespaces, precompiled_charsmap) of a
    sentencepiece ModelProto (trainer_spec = 2 -> model_type = 3; normalizer_spec = 3 -> charsmap 2,
    add_dummy_prefix 3, remove_extra_whitespaces 4; proto2 defaults UNIGRAM, true, true)."""
    try:
        top = _fields(path.read_bytes())
        trainer = _fields(top.get(2, [b""])[-1])
        norm = _fields(top.get(3, [b""])[-1])
    except (OSError, ValueError, TypeError) as e:
        raise ConvertError(f"{path}: not a sentencepiece model ({e})") from None
    return (trainer.get(3, [1])[-1], bool(norm.get(3, [1])[-1]), bool(norm.get(4, [1])[-1]), norm.get(2, [b""])[-1])


@register("T5ForConditionalGeneration", "T5WithLMHeadModel", "MT5ForConditionalGeneration",
          "UMT5ForConditionalGeneration", "UMT5Model")
class T5Converter(ModelConverter):
    arch = gguf.MODEL_ARCH.T5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding = next((n for n in self.ckpt.names() if n in _EMBEDDINGS), None)
        if self.embedding is None:
            raise ConvertError(f"{self.dir}: no token embedding ({', '.join(_EMBEDDINGS)})")

    def set_params(self, w: gguf.GGUFWriter) -> None:
        w.add_context_length(self.find("n_positions", default=None) or 512)
        w.add_embedding_length(self.find("d_model"))
        w.add_feed_forward_length(self.find("d_ff"))
        w.add_block_count(self.block_count)
        if (n_dec := self.hp.get("num_decoder_layers")) is not None:
            w.add_decoder_block_count(n_dec)
        w.add_head_count(self.find("num_heads"))
        w.add_key_length(self.find("d_kv"))
        w.add_value_length(self.find("d_kv"))
        w.add_layer_norm_eps(self.find("layer_norm_epsilon"))
        w.add_relative_attn_buckets_count(self.find("relative_attention_num_buckets"))
        w.add_layer_norm_rms_eps(self.find("layer_norm_epsilon"))
        w.add_decoder_start_token_id(self.find("decoder_start_token_id"))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        path = self.dir / "tokenizer.model"
        if not path.is_file():
            path = self.dir / "spiece.model"
        if not path.is_file():
            raise ConvertError(f"{self.dir}: no tokenizer.model or spiece.model")
        model_type, add_prefix, remove_ws, charsmap = spm_spec(path)
        if model_type == 2:  # BPE (Pile-T5): an ordinary sentencepiece vocabulary
            if path.name != "tokenizer.model":
                raise ConvertError(f"{path}: a BPE sentencepiece model must be named tokenizer.model")
            vocab.sentencepiece(w, self.dir, self.find("vocab_size", default=None))
            return
        if model_type != 1:
            raise ConvertError(f"{path}: sentencepiece model type {model_type} (only unigram or BPE)")
        self._ugm(w, path, add_prefix, remove_ws, charsmap)

    def _ugm(self, w: gguf.GGUFWriter, path: Path, add_prefix: bool, remove_ws: bool, charsmap: bytes) -> None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        try:
            sp.LoadFromFile(str(path))
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{path}: not a sentencepiece model ({e})") from None
        n = int(self.hp.get("vocab_size") or sp.vocab_size())
        tokens = [f"[PAD{i}]".encode() for i in range(n)]
        scores = [-10000.0] * n
        types = [TokenType.UNUSED] * n
        for i in range(min(n, sp.vocab_size())):
            tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
            types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                        else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
        added = self.dir / "added_tokens.json"
        if added.is_file():
            try:
                entries = json.loads(added.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConvertError(f"{added}: not valid JSON ({e})") from None
            for text, i in entries.items():
                if int(i) < n:
                    tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED
        w.add_tokenizer_model("t5")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(add_prefix)
        w.add_remove_extra_whitespaces(remove_ws)
        if charsmap:
            w.add_precompiled_charsmap(charsmap)
        vocab._special(w, self.dir, n_vocab=n)

    def rename(self, name: str) -> str | None:
        if name in _EMBEDDINGS:
            return "shared.weight" if name == self.embedding else None
        return name
