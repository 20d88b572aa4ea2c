"""Vocabularies written the way llama.cpp's convert_hf_to_gguf.py writes them.

- sentencepiece ``tokenizer.model`` -> tokenizer.ggml.model "llama" (tokens, scores, types);
- ``tokenizer.json`` BPE -> "gpt2" (tokens, types, merges) with the pre-tokenizer recognised from
  the token ids of a probe text, as llama.cpp does;
- WordPiece ``tokenizer.json`` -> "bert", tokens in llama.cpp's phantom-space form.
Special tokens (ids, add_bos/eos, merges, chat template) come from gguf-py's ``SpecialVocab``.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

from gguf_runtime.errors import ConvertError

from . import bpe_pre

# The probe text and llama.cpp's table of its hashes live in bpe_pre (kept here under their old names).
PROBE = bpe_pre.PROBE
KNOWN_PRE = bpe_pre.CHKHSH


def looks_special(tok: str) -> bool:
    """Added tokens llama.cpp treats as control tokens even when not flagged special."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<\uff5c") and tok.endswith("\uff5c>")) or (tok.startswith("<unused") and tok.endswith(">")))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _special(w: gguf.GGUFWriter, d: Path, n_vocab: int | None = None, merges: bool = False) -> gguf.SpecialVocab:
    sv = gguf.SpecialVocab(d, load_merges=merges, n_vocab=n_vocab)
    sv.add_to_gguf(w, quiet=True)
    return sv


# ---------------------------------------------------------------- sentencepiece


def sentencepiece(w: gguf.GGUFWriter, d: Path, vocab_size: int | None) -> None:
    """tokenizer.model (+ added_tokens.json, tokenizer_config.json added tokens) as llama.cpp's
    _set_vocab_sentencepiece writes it; vocab_size pads with [PADi] tokens."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(d / "tokenizer.model"))
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{d / 'tokenizer.model'}: not a sentencepiece model ({e})") from None
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [TokenType.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
    for text, i in _json(d / "added_tokens.json").items():
        if i < n:
            tokens[i], scores[i], types[i] = text.encode(), -1000.0, TokenType.USER_DEFINED
    for i, data in _json(d / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        i, text = int(i), data["content"]
        if i >= n:
            continue
        if data.get("special") or looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text, types[i] = text.replace("\u2581", " "), TokenType.USER_DEFINED
        tokens[i], scores[i] = text.encode(), -1000.0
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    sv = _special(w, d, n_vocab=n)
    if not any(k in sv.special_token_ids for k in ("bos", "eos")):
        # e.g. state-spaces checkpoints: no ids in any config; take them from the sentencepiece model
        if sp.bos_id() >= 0:
            w.add_bos_token_id(sp.bos_id())
        if sp.eos_id() >= 0:
            w.add_eos_token_id(sp.eos_id())


def llama_hf(w: gguf.GGUFWriter, d: Path) -> bool:
    """A sentencepiece-style tokenizer.json (llama.cpp's _set_vocab_llama_hf through gguf-py's
    LlamaHfVocab). False when tokenizer.json is not of that kind."""
    try:
        vocab = gguf.LlamaHfVocab(d)
    except (FileNotFoundError, TypeError):
        return False
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    _special(w, d, n_vocab=len(tokens))
    return True


# ---------------------------------------------------------------- tokenizer.json (BPE, WordPiece)


def _tokenizer(d: Path):
    from tokenizers import Tokenizer

    path = d / "tokenizer.json"
    if not path.is_file():
        raise ConvertError(f"{d}: no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path}: cannot load tokenizer ({e})") from None
    tok.no_padding()  # encode as transformers' tokenizer.encode does: no padding, no truncation
    tok.no_truncation()
    return tok, _json(path)


def pre_tokenizer(tok, spec: dict, override: str | None = None, where: str = "tokenizer.json") -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer: ``--vocab-pre``, the probe hash, the declared
    pre-tokenizer, else an error (bpe_pre.choose)."""
    return bpe_pre.choose(tok, spec, override, where)


def base_vocab(d: Path, vocab_size: int | None, pre: str | None = None) -> tuple[list[str], list[int], str, dict]:
    """Tokens, token types and pre-tokenizer name of tokenizer.json, as get_vocab_base builds them
    (and the parsed tokenizer.json); ``pre`` is a --vocab-pre override."""
    tok, spec = _tokenizer(d)
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    n = vocab_size or len(vocab)
    if max(vocab.values()) >= n:
        raise ConvertError(f"{d}: tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {n}")
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        t = rev[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                t = tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or looks_special(t):
                types.append(TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(t)
    return tokens, types, pre_tokenizer(tok, spec, pre, str(d / "tokenizer.json")), spec


def gpt2(w: gguf.GGUFWriter, d: Path, vocab_size: int | None, pre: str | None = None) -> None:
    """A BPE tokenizer.json as llama.cpp's _set_vocab_gpt2 writes it; ``pre``: --vocab-pre."""
    tokens, types, pre, spec = base_vocab(d, vocab_size, pre)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = _special(w, d, merges=True)
    if (spec.get("post_processor") or {}).get("type") == "ByteLevel":
        # a byte-level post-processor adds no BOS/EOS: newer llama.cpp writes that down
        for typ, add in (("bos", w.add_add_bos_token), ("eos", w.add_add_eos_token)):
            if typ not in sv.add_special_token:
                add(False)


def bert(w: gguf.GGUFWriter, d: Path, vocab_size: int | None, type_vocab_size: int) -> None:
    """WordPiece as llama.cpp's BertModel writes it: "##x" -> "x", other non-control tokens get
    the phantom space "\u2581"."""
    tokens, types, pre, spec = base_vocab(d, vocab_size)
    tokens = [t if ty == TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
              for t, ty in zip(tokens, types)]
    w.add_token_type_count(type_vocab_size)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    _special(w, d, n_vocab=len(tokens))
    if (lower := _lowercase(spec.get("normalizer") or {})) is not None:
        # newer llama.cpp writes this; gguf-py 0.19 has no constant for the key yet
        w.add_bool(getattr(gguf.Keys.Tokenizer, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase"), lower)


def _lowercase(norm: dict) -> bool | None:
    """Whether a tokenizer.json normalizer lowercases (None: it does not say)."""
    kind, out = norm.get("type"), None
    if kind == "Lowercase":
        out = True
    elif kind == "BertNormalizer" and "lowercase" in norm:
        out = bool(norm["lowercase"])
    for sub in norm.get("normalizers") or [] if kind == "Sequence" else []:
        out = v if (v := _lowercase(sub)) is not None else out
    return out
