"""Tokenizer: llama.cpp's own tokenizer test vectors, sentencepiece / HF tokenizers references."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gguf_runtime import fixtures
from gguf_runtime.errors import GGUFRuntimeError, UnsupportedError
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp's models/ggml-vocab-*.gguf{,.inp,.out}
SEP = "\n__ggml_vocab_test__\n"


def llama_cpp_vocab_dir() -> Path:
    """llama.cpp's vocab-only GGUFs with their .inp/.out test vectors, from the llama-cpp-python sdist
    (downloaded once with pip into the fixtures cache; only models/ggml-vocab-* is kept)."""
    d = fixtures.cache_dir() / "llama-cpp-python"
    out = d / "vocab"
    if (out / "ggml-vocab-llama-spm.gguf.out").exists():
        return out
    sdist = next(iter(sorted(d.glob("llama_cpp_python-*.tar.gz"))), None)
    if sdist is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "-d", str(d), LLAMA_CPP_PYTHON]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdist = next(iter(sorted(d.glob("llama_cpp_python-*.tar.gz"))), None)
        if proc.returncode != 0 or sdist is None:
            last = (proc.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise fixtures.FixtureUnavailable(f"could not download {LLAMA_CPP_PYTHON}: {last}")
    tmp = Path(tempfile.mkdtemp(dir=d))
    with tarfile.open(sdist, "r:gz") as tf:
        for m in tf:
            if m.isfile() and re.search(r"/vendor/llama\.cpp/models/ggml-vocab-[^/]+$", m.name):
                (tmp / Path(m.name).name).write_bytes(tf.extractfile(m).read())
    tmp.replace(out)
    return out


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    try:
        return llama_cpp_vocab_dir()
    except fixtures.FixtureUnavailable as e:
        pytest.skip(f"registry unreachable: {e}")


def read_vectors(path: Path) -> dict[str, list[int]]:
    """test-tokenizer-0's format: inputs separated by SEP, one line of ids per input."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        inputs.append(raw[pos:] if nxt < 0 else raw[pos:nxt])
        pos = len(raw) if nxt < 0 else nxt + len(SEP)
    lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(lines), path
    return {s: [int(t) for t in line.split()] for s, line in zip(inputs, lines)}


VOCABS = ["llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "qwen35", "starcoder", "refact", "deepseek-coder",
          "deepseek-llm", "falcon", "command-r", "mpt", "bert-bge", "gemma-4"]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_vectors(vocab_dir, name):
    """Exactly llama.cpp's ids: tests/test-tokenizer-0 tokenizes with add_special=false, parse_special=false."""
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer.from_gguf(GGUFFile(path))
    cases = read_vectors(path)
    assert len(cases) > 30
    bad = {s: (got, want) for s, want in cases.items() if (got := tok.encode(s, add_special=False)) != want}
    assert not bad, f"{len(bad)}/{len(cases)} differ, e.g. {next(iter(bad.items()))}"


def test_vocab_special_ids(vocab_dir):
    spm_tok = Tokenizer.from_gguf(GGUFFile(vocab_dir / "ggml-vocab-llama-spm.gguf"))
    assert (spm_tok.model, spm_tok.bos_id, spm_tok.eos_id, spm_tok.unk_id, spm_tok.add_bos) == ("llama", 1, 2, 0, True)
    assert spm_tok.encode("Hello world") == [1, *spm_tok.encode("Hello world", add_special=False)]
    bpe = Tokenizer.from_gguf(GGUFFile(vocab_dir / "ggml-vocab-llama-bpe.gguf"))
    # llama-bpe: BOS on by llama.cpp's rule for this pre-tokenizer; <|eot_id|> found by its text, and EOG
    assert bpe.add_bos and bpe.encode("hi")[0] == bpe.bos_id == bpe.token_to_id["<|begin_of_text|>"]
    assert bpe.eot_id == bpe.token_to_id["<|eot_id|>"] and bpe.is_eog(bpe.eot_id) and bpe.is_eog(bpe.eos_id)
    assert bpe.encode("<|eot_id|>x", add_special=False, parse_special=True)[0] == bpe.eot_id
    assert bpe.eot_id not in bpe.encode("<|eot_id|>x", add_special=False)
    bert = Tokenizer.from_gguf(GGUFFile(vocab_dir / "ggml-vocab-bert-bge.gguf"))
    ids = bert.encode("Hello world")
    assert ids[0] == bert.cls_id == bert.token_to_id["[CLS]"] and ids[-1] == bert.sep_id == bert.token_to_id["[SEP]"]
    assert bert.decode(ids, skip_special=True) == "hello world"


def test_llama_tiny_wikitext(gguf_dir, wikitext, shared):
    """llama.cpp's perplexity made 683 chunks of 128 from these bytes; ids equal sentencepiece's (+ BOS)."""
    tok = Tokenizer.from_gguf(GGUFFile(gguf_dir / "llama-tiny-f32.gguf"))
    sp = spm.SentencePieceProcessor(model_file=str(shared / "models" / "llama-tiny-hf" / "tokenizer.model"))
    text = wikitext.read_bytes()[:200_000].decode("utf-8")
    ids = tok.encode(text)
    assert 683 * 128 <= len(ids) < 684 * 128
    assert ids == [sp.bos_id(), *sp.encode(text)]
    full = wikitext.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    ids = tok.encode(full)
    dt = time.perf_counter() - t0
    assert ids == [sp.bos_id(), *sp.encode(full)]
    assert dt < 10, f"1.2 MB took {dt:.1f}s"
    assert tok.decode(ids, skip_special=True) == full
    assert tok.decode(ids[:3]).startswith("<s>")


def test_spm_specials_and_bytes(gguf_dir, shared):
    """BOS/EOS/parse_special as llama_tokenize; byte fallback for characters outside the vocabulary."""
    tok = Tokenizer.from_gguf(GGUFFile(gguf_dir / "llama-tiny-f32.gguf"))
    sp = spm.SentencePieceProcessor(model_file=str(shared / "models" / "llama-tiny-hf" / "tokenizer.model"))
    assert tok.encode("", add_special=True) == [1] and tok.encode("", add_special=False) == []
    # without parse_special the control text is plain text; with it, each text fragment gets the dummy space
    assert tok.encode("<s>hi</s>", add_special=False) == sp.encode("<s>hi</s>")
    assert tok.encode("<s>hi</s>", parse_special=True) == [1, 1, *sp.encode("hi"), 2]
    text = "naïve café 🦙 日本語 \t tabs\n\nnewlines  two  spaces"
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert any(tok.token_types[i] == gguf.TokenType.BYTE for i in tok.encode(text))
    assert tok.decode(tok.encode(text), skip_special=True) == text
    assert tok.is_eog(2) and not tok.is_eog(1)
    assert tok.token_to_piece(sp.piece_to_id("\u2581the")) == " the"


SMOLLM_TEXTS = [
    "Hello world", " Hello World!", "The year 2024 had 366 days; 3.14159 and 1,000,000.",
    "I'm sure you've seen it, they'll say it's what we'd do.", "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\nmany", "def f(x):\n    return x**2  # square\n", "naïve café résumé Ünïcödé",
    "日本語のテキスト、中文文本。", "emoji 🦙🔥👍🏽 and symbols ©®™ ≤≥ ∑∫", "مرحبا بالعالم", "Привет, мир! 123abc",
    "x=1;y=22;z=333;w=4444", "email me at someone@example.com or http://x.y/z?a=1&b=2", "\u00a0non-breaking\u2009thin",
    "'s 't 're 've 'm 'll 'd", "A" * 300, "   \n   \t  ", "1 22 333 4444 55555 666666",
]


def test_smollm2_against_hf_pretokenizer(smollm2, wikitext):
    """SmolLM2's tokenizer.json pipeline (Digits(individual) then ByteLevel's own regex) built with HF's
    native pre-tokenizers over the GGUF's vocab and merges, against ours (llama.cpp's 'smollm' regexes)."""
    f = GGUFFile(smollm2)
    tok = Tokenizer.from_gguf(f)
    meta = f.metadata
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    ref = HFTokenizer(models.BPE(vocab, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    specials = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]) if k == 3]
    ref.add_special_tokens(specials)
    assert tok.pre == "smollm" and not tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    for text in SMOLLM_TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
    full = wikitext.read_text(encoding="utf-8")  # long texts are cut into chunks: same ids as uncut
    assert tok.encode(full) == ref.encode(full, add_special_tokens=False).ids
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat, parse_special=True) == ref.encode(chat, add_special_tokens=False).ids
    assert tok.is_eog(tok.token_to_id["<|im_end|>"]) and not tok.is_eog(tok.token_to_id["<|im_start|>"])


def write_bert_vocab_gguf(model_dir: Path, path: Path) -> None:
    """A vocab-only GGUF laid out as llama.cpp's converter (BertModel.set_vocab) writes one: control
    tokens as is, '##x' stored as 'x', every other token with the phantom space '\u2581' before it."""
    hf = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = hf.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    control = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    types = [gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens]
    phantom = [t if t in control else t[2:] if t.startswith("##") else "\u2581" + t for t in tokens]
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(phantom)
    w.add_token_types(types)
    w.add_unk_token_id(vocab[cfg["unk_token"]])
    w.add_sep_token_id(vocab[cfg["sep_token"]])
    w.add_pad_token_id(vocab[cfg["pad_token"]])
    w.add_mask_token_id(vocab[cfg["mask_token"]])
    w.add_uint32("tokenizer.ggml.cls_token_id", vocab[cfg["cls_token"]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def minilm_sentences(wikitext: Path) -> list[str]:
    lines = [ln.strip() for ln in wikitext.read_text(encoding="utf-8").splitlines()[:4000] if len(ln.strip()) > 20]
    texts = [ln[:400] for ln in lines[::5][:260]]
    return texts + [
        "Héllo WÖRLD, naïve façade — déjà vu!", "Straße ÆØÅ æøå Ça ça", "北京是中国的首都。東京タワー",
        "ひらがな カタカナ 한국어 텍스트", "emoji 🦙 🔥 in text", "tabs\tnew\nlines\r\nand  spaces",
        "punctuation!!! ??? ... ,,, ;;; :: --- ___ ((( ))) [[ ]] {{ }}", "$100 + 50% = <more> & ^ | ~ `code`",
        "don't can't won't it's I'm we're they've", "U.S.A. e.g. i.e. etc.", "3.14159 1,000,000 1e-10 0x1F",
        "unaffable unbelievably antidisestablishmentarianism", "ZERO\u200bWIDTH and soft\u00adhyphen",
        "Ελληνικά Русский العربية עברית हिन्दी", "MiXeD CaSe WoRdS", "a", "", "   ",
    ]


def test_bert_wordpiece_against_hf(minilm, wikitext, tmp_path):
    """WordPiece from a llama.cpp-layout GGUF of all-MiniLM-L6-v2 against its HF tokenizer ([CLS] .. [SEP])."""
    path = tmp_path / "minilm-vocab.gguf"
    write_bert_vocab_gguf(minilm, path)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    ref = HFTokenizer.from_file(str(minilm / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    assert (tok.model, tok.cls_id, tok.sep_id, tok.unk_id, tok.pad_id) == ("bert", 101, 102, 100, 0)
    texts = minilm_sentences(wikitext)
    assert len(texts) > 250
    for text in texts:
        assert tok.encode(text) == ref.encode(text).ids, text
    full = wikitext.read_text(encoding="utf-8")[:300_000]  # cut into chunks: same ids as uncut
    assert tok.encode(full) == ref.encode(full).ids
    special = "[UNK] [CLS] text [SEP]"  # HF always matches its special tokens in text: llama.cpp's parse_special
    assert tok.encode(special, parse_special=True) == ref.encode(special).ids
    assert 100 not in tok.encode(special)
    assert tok.decode(tok.encode("Hello, World! It's fine."), skip_special=True) == "hello, world! it's fine."


def test_unsupported_and_malformed():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    cases = [
        (UnsupportedError, "no tokenizer", {"general.architecture": "llama"}),
        (UnsupportedError, "'rwkv' is not supported", {**base, "tokenizer.ggml.model": "rwkv"}),
        (UnsupportedError, "pre-tokenizer 'nonesuch'",
         {**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nonesuch"}),
        (GGUFRuntimeError, "duplicate", {**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "a"]}),
        (GGUFRuntimeError, "merges", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}),
        (GGUFRuntimeError, "token_type", {**base, "tokenizer.ggml.model": "llama", "tokenizer.ggml.token_type": [1]}),
    ]
    for err, msg, meta in cases:
        with pytest.raises(err, match=msg) as e:
            Tokenizer(meta, name="x.gguf")
        assert "\n" not in str(e.value) and str(e.value).startswith("x.gguf: ")
