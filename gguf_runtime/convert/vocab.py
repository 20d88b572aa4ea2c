"""Vocabularies written the way llama.cpp's convert_hf_to_gguf.py writes them.

- sentencepiece ``tokenizer.model`` -> tokenizer.ggml.model "llama" (tokens, scores, types);
- ``tokenizer.json`` BPE -> "gpt2" (tokens, types, merges) with the pre-tokenizer recognised from
  the token ids of a probe text, as llama.cpp does;
- WordPiece ``tokenizer.json`` -> "bert", tokens in llama.cpp's phantom-space form.
Special tokens (ids, add_bos/eos, merges, chat template) come from gguf-py's ``SpecialVocab``.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf
from gguf import TokenType

from gguf_runtime.errors import ConvertError

# llama.cpp recognises a BPE pre-tokenizer by the sha256 of str(token ids) of this probe text
# (convert_hf_to_gguf.py, get_vocab_base_pre). The probe text is part of that protocol.
PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f '
         '(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 '
         '3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?'
         '\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 '
         '\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been '
         '\'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# The resulting names for a few well-known tokenizers (llama.cpp keeps the last match of its list).
KNOWN_PRE = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",           # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",       # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",          # SmolLM-135M
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",      # bge-small, MiniLM
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",           # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",           # Qwen3-Embedding
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",    # deepseek-llm-7b
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",          # falcon-7b
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",            # mpt-7b, OLMo
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",       # starcoder2-3b
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",       # stablelm-2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",           # phi-2
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",     # stsb-roberta-base
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",          # gpt-4o
}


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


def pre_tokenizer(tok, spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer (probe hash, then its declared pieces)."""
    h = sha256(str(tok.encode(PROBE).ids).encode()).hexdigest()
    if h in KNOWN_PRE:
        return KNOWN_PRE[h]
    pre, model = spec.get("pre_tokenizer") or {}, (spec.get("model") or {}).get("type")
    if model == "WordPiece":
        return "default"  # llama.cpp's WordPiece tokenizer does not use the pre-tokenizer type
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer"):
        return "gpt-2"  # GPT-2's byte-level regex split
    raise ConvertError(f"unrecognised BPE pre-tokenizer (probe hash {h}); llama.cpp does not know it either")


def base_vocab(d: Path, vocab_size: int | None) -> tuple[list[str], list[int], str, dict]:
    """Tokens, token types and pre-tokenizer name of tokenizer.json, as get_vocab_base builds them
    (and the parsed tokenizer.json)."""
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
    return tokens, types, pre_tokenizer(tok, spec), spec


def gpt2(w: gguf.GGUFWriter, d: Path, vocab_size: int | None) -> None:
    tokens, types, pre, spec = base_vocab(d, vocab_size)
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
