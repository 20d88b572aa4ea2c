"""Tokenizers built from GGUF metadata, giving llama.cpp's token ids (``llama_tokenize``).

The vocabulary kinds, each run by a native library rather than Python loops:

* ``llama`` (SPM): a sentencepiece BPE model serialized from the GGUF's tokens, scores and types;
  sentencepiece merges by score exactly as llama.cpp's SPM session does, with byte fallback.
* ``gpt2`` (byte-level BPE): a HF ``tokenizers`` BPE over the GGUF's tokens and merges, preceded by
  the pre-tokenizer regexes llama.cpp uses for ``tokenizer.ggml.pre`` (each splits what the previous
  left, keeping matches and gaps, as llama.cpp's ``unicode_regex_split`` does).
* ``bert`` (WPM): a HF ``tokenizers`` WordPiece. llama.cpp's converter stores word-initial pieces
  with a phantom-space prefix (``"\u2581the"``) and continuations bare (``"##ing"`` -> ``"ing"``);
  we map them back to WordPiece's spelling, where greedy longest-match is the same algorithm.
* ``gemma4``: HF BPE on raw UTF-8 with ``<0xXX>`` byte fallback, spaces as ``\u2581``, split at newlines.

Special tokens are split out first, as llama.cpp's ``tokenizer_st_partition`` does: longest text
first; user-defined tokens always, control/unknown tokens only with ``parse_special``.
"""
from __future__ import annotations

import re
import struct
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
from gguf import Keys, TokenType
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from ..errors import GGUFFormatError, UnsupportedError
from . import ugm

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (
    int(t) for t in (TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.BYTE))
_ASCII_WS = " \t\n\v\f\r"  # C isspace(), what llama.cpp's lstrip/rstrip attributes strip

# ---- pre-tokenizer regexes, per llama.cpp's llama-vocab.cpp (HF's originals where it adapted them)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+")
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "deepseek-llm": ("[\r\n]", _DEEPSEEK_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt4o": (_GPT4O,),
}
# tokenizer.ggml.pre -> (regex set, llama.cpp flags that differ from the BPE defaults)
_PRE: dict[str, tuple[str, dict]] = {}
for _names, _rx, _flags in [
    ("default", "default", {}),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
     {"ignore_merges": True, "add_bos": True}),
    ("dbrx smaug-bpe", "llama3", {}),
    ("chatglm-bpe", "llama3", {"no_bos": True}),
    ("glm4 glm5", "llama3", {"no_bos": True, "ignore_merges": True}),
    ("deepseek-llm", "deepseek-llm", {"clean_spaces": False}),
    ("deepseek-coder", "deepseek-coder", {"clean_spaces": False}),
    ("falcon", "falcon", {}),
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais exaone4"
     " jina-v1-en jina-v2-code roberta-bpe", "gpt2", {}),
    ("trillion granite-docling", "gpt2", {"clean_spaces": False}),
    ("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder", {}),
    ("command-r smollm", "starcoder", {"clean_spaces": False}),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", "qwen2", {"clean_spaces": False}),
    ("megrez stablelm2", "qwen2", {}),
    ("qwen35", "qwen35", {"clean_spaces": False}),
    ("poro-chat", "poro", {"clean_spaces": False}),
    ("bloom gpt3-finnish", "poro", {}),
    ("viking", "viking", {"clean_spaces": False}),
    ("tekken", "tekken", {"clean_spaces": False, "ignore_merges": True, "add_bos": True}),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", {"clean_spaces": False}),
]:
    for _n in _names.split():
        _PRE[_n] = (_rx, _flags)

# End-of-generation detection by token text, as llama.cpp's vocab loader does it.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOG_TEXTS = _EOT_TEXTS + ("<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "</s>", "<|eom_id|>", "[EOS]",
                           "<eos>", "<turn|>", "<|tool_response>", "[e~[")
_FIM_EOG_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",  # pad, repo, file-sep
                  "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")
_K = "tokenizer.ggml."
# tokenizer.ggml.model -> llama.cpp's default (bos, eos, unk, sep, pad, mask) ids
_DEFAULT_IDS: dict[str, tuple[int | None, ...]] = {
    "llama": (1, 2, 0, None, None, None), "gpt2": (11, 11, None, None, None, None),
    "bert": (101, None, 100, 102, 0, 103), "gemma4": (None,) * 6, "t5": (None, 1, 2, None, 0, None)}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the rest for 256+n."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}


# ---- a sentencepiece ModelProto, written by hand (no protobuf dependency)
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb(field: int, value: bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3) + _varint(int(value))


_VARINT = [_varint(i) for i in range(1 << 14)]  # the lengths and types of pieces, precomputed


def _spm_model(tokens: list[str], scores: list[float], sp_types: list[int], unk_id: int, byte_fallback: bool) -> bytes:
    # each piece is _pb(1, _pb(1, text) + _pb(2, float32 score) + _pb(3, type)), spelled out: a 262k
    # vocabulary (Gemma 3) is a million fields, which the generic helpers build in seconds
    f32 = np.asarray(scores, dtype="<f4").tobytes()
    v, pieces = _VARINT, []
    for i, (t, k) in enumerate(zip(tokens, sp_types)):
        tb = t.encode()
        inner = b"\n" + (v[len(tb)] if len(tb) < 1 << 14 else _varint(len(tb))) + tb + b"\x15" + f32[4 * i:4 * i + 4] + b"\x18" + _varint(k)
        pieces.append(b"\n" + (v[len(inner)] if len(inner) < 1 << 14 else _varint(len(inner))) + inner)
    trainer = _pb(3, 2) + _pb(35, int(byte_fallback)) + _pb(40, unk_id) + _pb(41, -1) + _pb(42, -1) + _pb(43, -1)
    normalizer = _pb(1, b"identity") + _pb(3, 0) + _pb(4, 0) + _pb(5, 1)  # no dummy prefix, keep spaces, escape ' '
    return b"".join(pieces) + _pb(2, trainer) + _pb(3, normalizer)


# Places where a long text can be cut into independently tokenized chunks (so the native libraries
# can spread them over threads) without changing any token: before a space that follows a non-space
# (SPM, when no piece glues a character to a following '\u2581'), after a newline before an ASCII
# letter (no pre-tokenizer regex here lets a piece run across that).
_SPM_CUT = re.compile("(?<=[^ \u2581])(?= )")
_LINE_CUT = re.compile("(?<=\n)(?=[A-Za-z])")


def _chunked(encode_many, cut: re.Pattern | None, size: int = 1 << 13):
    """Wrap ``encode_many(list[str]) -> list[list[int]]`` so long texts go through as chunks cut at ``cut``."""
    def chunks(text: str) -> list[str]:
        out, start = [], 0
        while cut is not None and len(text) - start > 2 * size and (m := cut.search(text, start + size)):
            out.append(text[start:m.start()])
            start = m.start()
        return out + [text[start:]]

    def run(texts: list[str]) -> list[list[int]]:
        parts = [chunks(t) for t in texts]
        flat = iter(encode_many([c for cs in parts for c in cs]))
        return [[i for _ in cs for i in next(flat)] for cs in parts]
    return run


def _hf_encoder(tok: HFTokenizer):
    return lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)] if texts else []


def _clean_spaces(s: str) -> str:
    """llama.cpp's detokenize clean-up: ' ?' ' !' ' .' ' ,' -> no space, " ' " -> "'", " 's" " 'm" " 're" " 've"."""
    s = re.sub(r" ([?!.,])", r"\1", s)
    s = s.replace(" ' ", "'")
    return re.sub(r" '(s|m|re|ve)", r"'\1", s)


class Tokenizer:
    """llama.cpp-compatible tokenizer for a GGUF's ``tokenizer.ggml.*`` metadata."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    sep_id: int | None
    cls_id: int | None
    pad_id: int | None
    unk_id: int | None
    mask_id: int | None
    add_bos: bool
    add_eos: bool
    model: str
    pre: str

    @classmethod
    def from_gguf(cls, f) -> "Tokenizer":
        """From a ``GGUFFile`` (or a path to one)."""
        if isinstance(f, (str, Path)):
            from ..gguf.reader import GGUFFile
            f = GGUFFile(f)
        return cls(f.metadata, name=str(f.path))

    def __init__(self, meta: dict, name: str = "GGUF"):
        model = meta.get(_K + "model")
        if model is None:
            raise UnsupportedError(f"{name}: no tokenizer in this file ({Keys.Tokenizer.MODEL} missing)")
        self.model = str(model)
        if self.model not in _DEFAULT_IDS:
            raise UnsupportedError(
                f"{name}: tokenizer model '{self.model}' is not supported (supported: {', '.join(_DEFAULT_IDS)})")
        for key, elem in ((Keys.Tokenizer.LIST, str), (Keys.Tokenizer.MERGES, str), (Keys.Tokenizer.TOKEN_TYPE, int),
                          (Keys.Tokenizer.SCORES, (int, float))):  # mistyped vocabularies: one line (issue 18)
            v = meta.get(key)
            if v is not None and not hasattr(v, "dtype") and (
                    not isinstance(v, list) or not all(isinstance(x, elem) for x in v)):
                raise GGUFFormatError(f"{name}: {key} must be an array of "
                                      f"{'strings' if elem is str else 'numbers'}")
        tokens = meta.get(Keys.Tokenizer.LIST)
        if not tokens:
            raise GGUFFormatError(f"{name}: {Keys.Tokenizer.LIST} is missing or empty")
        self.tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = self.n_vocab = len(self.tokens)
        types = meta.get(Keys.Tokenizer.TOKEN_TYPE)
        if types is not None and len(types) < n:
            raise GGUFFormatError(f"{name}: {Keys.Tokenizer.TOKEN_TYPE} has {len(types)} entries for {n} tokens")
        self.token_types: list[int] = [int(t) for t in types[:n]] if types is not None else [NORMAL] * n
        file_types = list(self.token_types)  # as converted; token_types gets llama.cpp's by-text overrides
        self.scores: list[float] = list(meta.get(Keys.Tokenizer.SCORES) or [0.0] * n)
        if len(self.scores) < n:
            raise GGUFFormatError(f"{name}: {Keys.Tokenizer.SCORES} has {len(self.scores)} entries for {n} tokens")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != n:
            raise GGUFFormatError(f"{name}: {Keys.Tokenizer.LIST} holds duplicate tokens")

        # llama.cpp's defaults per vocabulary kind, then the file's keys
        self.pre = "gemma4" if self.model == "gemma4" else str(meta.get(Keys.Tokenizer.PRE) or "default")
        defaults = _DEFAULT_IDS[self.model]
        self.add_space_prefix = self.model == "llama"
        self.clean_spaces = self.model != "llama"
        self.add_bos, self.add_eos, self.add_sep = self.model in ("llama", "bert"), False, self.model == "bert"
        self.add_eos = self.model == "t5"  # llama.cpp's UGM default: EOS closes the input
        regexes, ignore_merges = (), False
        if self.model == "gpt2":
            if self.pre not in _PRE:
                raise UnsupportedError(f"{name}: pre-tokenizer '{self.pre}' ({Keys.Tokenizer.PRE}) is not supported")
            regex_set, flags = _PRE[self.pre]
            regexes, ignore_merges = _REGEXES[regex_set], flags.get("ignore_merges", False)
            self.clean_spaces = flags.get("clean_spaces", True)
            self.add_bos = flags.get("add_bos", False)
            if flags.get("no_bos"):
                defaults = (None,) + defaults[1:]

        def sid(key: str, default: int | None) -> int | None:
            v = meta.get(_K + key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):  # llama.cpp: wrong type
                raise GGUFFormatError(f"{name}: {_K + key} = {str(v)[:40]} must be an integer")
            v = default if v is None or not 0 <= int(v) < n else int(v)
            return v if v is not None and 0 <= v < n else None

        self.bos_id = sid("bos_token_id", defaults[0])
        self.eos_id = sid("eos_token_id", defaults[1])
        self.unk_id = sid("unknown_token_id", defaults[2])
        self.sep_id = sid("seperator_token_id", defaults[3])  # sic: llama.cpp's spelling
        self.pad_id = sid("padding_token_id", defaults[4])
        self.mask_id = sid("mask_token_id", defaults[5])
        self.cls_id = sid("cls_token_id", self.bos_id if self.model == "bert" else None)
        if self.model == "bert" and meta.get(_K + "bos_token_id") is None and self.cls_id is not None:
            self.bos_id = self.cls_id  # llama.cpp starts a BERT input with its BOS (default 101 = [CLS])
        self.add_space_prefix = bool(meta.get(Keys.Tokenizer.ADD_PREFIX, self.add_space_prefix))
        self.add_bos = bool(meta.get(Keys.Tokenizer.ADD_BOS, self.add_bos))
        self.add_eos = bool(meta.get(Keys.Tokenizer.ADD_EOS, self.add_eos))
        self.add_sep = bool(meta.get(_K + "add_sep_token", self.add_sep))
        self.add_bos |= self.model == "gemma4"  # llama.cpp forces BOS on for Gemma 4
        self._find_eog(meta)
        self._lstrip, self._rstrip = self._strip_attrs(meta)
        special = sorted((i for i, t in enumerate(self.token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN)),
                         key=lambda i: -len(self.tokens[i].encode()))
        self._specials = {True: special, False: [i for i in special if self.token_types[i] == USER_DEFINED]}
        self._special_groups = {mode: self._group_by_first_char(ids) for mode, ids in self._specials.items()}

        if self.model == "llama":
            self._encode_texts = self._spm_backend()
        elif self.model in ("gpt2", "gemma4"):
            self._encode_texts = self._bpe_backend(meta, name, regexes, ignore_merges)
        elif self.model == "t5":
            self._encode_texts = ugm.backend(self.tokens, self.scores, file_types, self.unk_id if self.unk_id is not None else 2,
                                             bytes(meta.get(_K + "precompiled_charsmap") or b""), self.add_space_prefix,
                                             bool(meta.get(_K + "remove_extra_whitespaces", True)))
        else:
            lower = bool(meta.get(_K + "normalizer.lowercase", True))
            self._encode_texts = self._wpm_backend(file_types, lower,
                                                   bool(meta.get(_K + "normalizer.strip_accents", lower)))

    # ---- construction helpers
    def _find_eog(self, meta: dict) -> None:
        """EOT/EOM and the end-of-generation set, detected by token text where the file is silent."""
        ids, types, n = self.token_to_id, self.token_types, self.n_vocab

        def key(k: str) -> int | None:
            v = meta.get(_K + k)
            return int(v) if v is not None and 0 <= int(v) < n else None

        def by_text(texts: Iterable[str]) -> list[int]:
            return [ids[t] for t in texts if t in ids]

        detected = []
        for attr, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",))):
            v = key(f"{attr}_token_id")
            if v is None and (found := by_text(texts)):
                v = found[0]
                detected.append(v)
            setattr(self, f"{attr}_id", v)
        eog = set()
        for k, texts in zip(("pad", "rep", "sep"), (_FIM_EOG_TEXTS[:5], _FIM_EOG_TEXTS[5:10], _FIM_EOG_TEXTS[10:])):
            v = key(f"fim_{k}_token_id")
            if v is None and (found := by_text(texts)):
                v = found[0]
                detected.append(v)
            if v is not None:
                eog.add(v)
        found = by_text(_EOG_TEXTS)
        eog.update(found)
        for i in detected + found:  # control-looking tokens are made control, as llama.cpp does
            types[i] = CONTROL
        for i in by_text(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")):  # gpt-oss: always rendered
            types[i] = USER_DEFINED
        eog |= {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        texts = {self.tokens[i] for i in eog}
        if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts):
            eog.discard(ids["<|end|>"])  # o200k_harmony / solar-open: <|end|> does not end generation
            types[ids["<|end|>"]] = USER_DEFINED
        if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(ids["</s>"])
            types[ids["</s>"]] = NORMAL
        self.eog_ids = frozenset(eog)

    def _strip_attrs(self, meta: dict) -> tuple[set[int], set[int]]:
        """The per-model lstrip/rstrip attributes llama.cpp sets by name (they eat spaces beside a special)."""
        name, arch = str(meta.get("general.name", "")).lower(), str(meta.get("general.architecture", ""))
        ids = self.token_to_id
        specials = [i for i, t in enumerate(self.token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        if self.pre in ("jina-v2-de", "jina-v2-es", "jina-v2-code") or arch in ("nomic-bert-moe", "jina-bert-v3"):
            return ({ids["<mask>"]} if "<mask>" in ids else set()), set()
        if "phi-3" in name or "phi3" in name:
            rstrip = set(specials) | ({ids["</s>"]} if "</s>" in ids else set())
            return set(), rstrip - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids}
        if "modern-bert" in name:
            return ({ids["[MASK]"]} if "[MASK]" in ids else set()), set()
        return set(), set()

    def _spm_backend(self):
        byte_ids = {f"<0x{b:02X}>": b for b in range(256)}
        byte_fallback = sum(1 for t, k in zip(self.tokens, self.token_types) if k == BYTE and t in byte_ids) == 256
        unk = self.unk_id if self.unk_id is not None else 0
        sp_types = [UNKNOWN if i == unk else BYTE if k == BYTE and byte_fallback else NORMAL
                    for i, k in enumerate(self.token_types)]
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(_spm_model(self.tokens, self.scores, sp_types, unk, byte_fallback))
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise GGUFFormatError(f"cannot build the sentencepiece tokenizer from this vocabulary: {e}") from None
        prefix = " " if self.add_space_prefix else ""
        glued = re.compile("[^\u2581]\u2581")  # a piece with a space after another character: no safe cut
        pieces = (t for t, k in zip(self.tokens, sp_types) if k == NORMAL and "\u2581" in t[1:])
        cut = None if any(glued.search(t) for t in pieces) else _SPM_CUT
        run = _chunked(lambda texts: sp.encode(texts, out_type=int), cut)
        return lambda texts: run([prefix + t for t in texts])

    def _bpe_backend(self, meta: dict, name: str, regexes: tuple[str, ...], ignore_merges: bool):
        merges = meta.get(Keys.Tokenizer.MERGES)
        if merges is None:
            raise GGUFFormatError(f"{name}: BPE vocabulary without {Keys.Tokenizer.MERGES}")
        vocab = self.token_to_id
        pairs = [(m[:k], m[k + 1:]) for m in merges for k in (m.find(" ", 1),)] if any(
            m.startswith(" ") for m in merges) else [tuple(m.split(" ", 1)) for m in merges]
        spm_style = self.model == "gemma4"  # SPM-like BPE: '▁' for spaces, raw UTF-8, <0xXX> byte fallback

        def build(pairs):
            return models.BPE(vocab, pairs, ignore_merges=ignore_merges, byte_fallback=spm_style)
        try:
            bpe = build(pairs)
        except Exception:  # noqa: BLE001 - a merge whose parts or result are not tokens: llama.cpp never forms it
            bpe = build([(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab])
        tok = HFTokenizer(bpe)
        if not spm_style:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            return _chunked(_hf_encoder(tok), _LINE_CUT)

        hf, newlines = _hf_encoder(tok), re.compile(r"(\n+)")

        def whole(p: str) -> bool:  # a run of newlines that is itself a token stays whole (llama.cpp's gemma4 rule)
            return p in vocab and not p.strip("\n")

        def encode(texts: list[str]) -> list[list[int]]:
            lines = [[p.replace(" ", "\u2581") for p in newlines.split(t) if p] for t in texts]
            enc = iter(hf([p for ps in lines for p in ps if not whole(p)]))
            return [[i for p in ps for i in ([vocab[p]] if whole(p) else next(enc))] for ps in lines]
        return encode

    def _wpm_backend(self, file_types: list[int], lowercase: bool, strip_accents: bool):
        vocab = {}
        for i, (t, k) in enumerate(zip(self.tokens, file_types)):
            word = t if k == CONTROL else t[1:] if t.startswith("\u2581") else "##" + t
            vocab.setdefault(word, i)
        unk = self.tokens[self.unk_id] if self.unk_id is not None else "[UNK]"
        vocab.setdefault(unk, self.unk_id if self.unk_id is not None else 0)
        tok = HFTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=1 << 30))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return _chunked(_hf_encoder(tok), _LINE_CUT)

    # ---- encoding
    def _group_by_first_char(self, ids: list[int]) -> dict[str, tuple[list[int], list[int], dict[str, int]]]:
        groups: dict[str, tuple[list[int], list[int], dict[str, int]]] = {}
        for i in ids:
            t = self.tokens[i]
            members, lengths, table = groups.setdefault(t[0], ([], [], {}))
            members.append(i)
            table[t] = i
            if len(t) not in lengths:
                lengths.append(len(t))
        return groups

    def _present(self, text: str, parse_special: bool) -> set[int]:
        """The special tokens that occur in ``text``: a substring search per token, or for a large family
        sharing a first character (Gemma's 6,000 ``<...>``), a lookup at every occurrence of that character."""
        found: set[int] = set()
        for c, (members, lengths, table) in self._special_groups[parse_special].items():
            if c not in text:
                continue
            if len(members) <= 32:
                found.update(i for i in members if self.tokens[i] in text)
                continue
            p = text.find(c)
            while p >= 0:
                found.update(table[s] for n in lengths if (s := text[p:p + n]) in table)
                p = text.find(c, p + 1)
        return found

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split out special tokens: longest first, every occurrence, left to right (tokenizer_st_partition)."""
        present = self._present(text, parse_special)
        frags: list[str | int] = [text]
        for tid in (i for i in self._specials[parse_special] if i in present):
            s = self.tokens[tid]
            lstrip, rstrip = tid in self._lstrip, tid in self._rstrip
            out: list[str | int] = []
            for fr in frags:
                if isinstance(fr, int) or s not in fr:
                    out.append(fr)
                    continue
                parts = fr.split(s)
                for k, p in enumerate(parts):
                    if k:
                        out.append(tid)
                    if lstrip and k < len(parts) - 1:
                        p = p.rstrip(_ASCII_WS)
                    if rstrip and k:
                        p = p.lstrip(_ASCII_WS)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids as llama.cpp's ``llama_tokenize(text, add_special, parse_special)`` gives them."""
        frags = self._partition(text, parse_special) if text else []
        texts = [f for f in frags if isinstance(f, str)]
        encoded = iter(self._encode_texts(texts) if texts else ())
        bert = self.model == "bert"
        out: list[int] = []
        if add_special and (self.add_bos or bert) and self.bos_id is not None:
            out.append(self.bos_id)
        for f in frags:
            if isinstance(f, int):
                out.append(f)
            else:
                out.extend(next(encoded))
        if add_special and bert and self.sep_id is not None:
            out.append(self.sep_id)
        elif add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    # ---- decoding
    @cached_property
    def _pieces(self) -> list[bytes]:
        """Each token's bytes as llama.cpp's token_to_piece(special=True) renders it."""
        dec = _byte_decoder() if self.model == "gpt2" else None
        out = []
        for t, k in zip(self.tokens, self.token_types):
            if k in (CONTROL, UNKNOWN, USER_DEFINED):
                out.append(t.encode())
            elif k == BYTE and t.startswith("<0x") and len(t) == 6:  # strtol: the leading hex digits, else 0
                out.append(bytes([int(re.match(r"[0-9a-fA-F]*", t[3:5]).group() or "0", 16)]))
            elif k != NORMAL:
                out.append(b"")
            elif dec is not None:
                out.append(b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in t))
            else:
                out.append(t.replace("\u2581", " ").encode())
        return out

    def token_to_bytes(self, id: int) -> bytes:
        """The raw bytes of one token (a byte-fallback token may be part of a UTF-8 character)."""
        return self._pieces[id]

    def token_to_piece(self, id: int) -> str:
        """One token's text, specials rendered (invalid UTF-8 from a partial byte token becomes U+FFFD)."""
        return self._pieces[id].decode("utf-8", errors="replace")

    def is_special(self, id: int) -> bool:
        """Control or unknown: rendered empty by ``decode(skip_special=True)``."""
        return self.token_types[id] in (CONTROL, UNKNOWN)

    def is_eog(self, id: int) -> bool:
        return id in self.eog_ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` as llama.cpp's ``llama_detokenize`` renders it (clean-up of spaces included),
        except that the phantom space SPM/BERT put before the first word is always removed."""
        pieces, types = self._pieces, self.token_types
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if types[i] not in (CONTROL, UNKNOWN)]
        chunks = [pieces[i] for i in ids]
        if self.add_space_prefix or self.model == "bert":
            first = next((k for k, i in enumerate(ids) if types[i] not in (CONTROL, UNKNOWN, USER_DEFINED)), None)
            if first is not None and chunks[first].startswith(b" "):
                chunks[first] = chunks[first][1:]
        text = b"".join(chunks).decode("utf-8", errors="replace")
        return _clean_spaces(text) if self.clean_spaces else text

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")
