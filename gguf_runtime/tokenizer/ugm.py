"""UGM (unigram) tokenizer from a GGUF vocabulary: T5's ``tokenizer.ggml.model = t5``.

llama.cpp's UGM session (llama-vocab.cpp ``llm_tokenizer_ugm``) reproduces sentencepiece's unigram
model: the text is normalized with the file's ``tokenizer.ggml.precompiled_charsmap`` (sentencepiece's
compiled NFKC-style rules), extra whitespace removed (``remove_extra_whitespaces``), a space put in
front (``add_space_prefix``), spaces escaped as ``\u2581``, then the best segmentation under the piece
scores is found by Viterbi (unknown characters scored below every piece).

Here the same model runs in sentencepiece itself: the GGUF's pieces, scores, types and charsmap are
serialized as a sentencepiece UNIGRAM ``ModelProto`` (no protobuf dependency), so normalization and
Viterbi are sentencepiece's own.
"""
from __future__ import annotations

from typing import Callable

import sentencepiece as spm

from ..errors import GGUFFormatError

_UNIGRAM = 1  # TrainerSpec.model_type


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb(field: int, value: bytes | int | float) -> bytes:
    import struct

    if isinstance(value, bytes):
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3) + _varint(int(value))


def model_proto(tokens: list[str], scores: list[float], types: list[int], unk_id: int, charsmap: bytes,
                add_space_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """A sentencepiece UNIGRAM ModelProto: pieces (1), trainer spec (2), normalizer spec (3)."""
    pieces = [_pb(1, _pb(1, t.encode()) + _pb(2, float(s)) + _pb(3, k)) for t, s, k in zip(tokens, scores, types)]
    trainer = _pb(3, _UNIGRAM) + _pb(40, unk_id) + _pb(41, -1) + _pb(42, -1) + _pb(43, -1)
    normalizer = (_pb(1, b"user_defined") + (_pb(2, charsmap) if charsmap else b"") + _pb(3, int(add_space_prefix))
                  + _pb(4, int(remove_extra_whitespaces)) + _pb(5, 1))
    return b"".join(pieces) + _pb(2, trainer) + _pb(3, normalizer)


def backend(tokens: list[str], scores: list[float], types: list[int], unk_id: int, charsmap: bytes,
            add_space_prefix: bool, remove_extra_whitespaces: bool) -> Callable[[list[str]], list[list[int]]]:
    """``encode(texts) -> ids`` for each text (no special tokens added)."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto(tokens, scores, types, unk_id, charsmap, add_space_prefix,
                                               remove_extra_whitespaces))
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise GGUFFormatError(f"cannot build the unigram tokenizer from this vocabulary: {e}") from None
    return lambda texts: sp.encode(texts, out_type=int)
