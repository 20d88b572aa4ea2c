"""Embeddings: BERT (all-MiniLM-L6-v2 via our converter) against sentence-transformers, causal
Llama/Mamba embeddings against transformers, batch invariance, llama.cpp's normalisation and
llama-embedding's output formats, the CLI."""
from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch

from gguf_runtime.cli.main import main
from gguf_runtime.convert.hf import convert
from gguf_runtime.tools.embedding import Embedder, format_embeddings, normalize, pool
from gguf_runtime.errors import BatchError
from gguf_runtime.models import load_model
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer

EXTRA = ["", "a", "Hello, world!", "UPPER CASE AND lower case", "Ünïcödé àccents, naïve café résumé",
         "日本語のテキストと中文", "emoji 🙂 and symbols ©®™ §", "tabs\tand\nnewlines", "3.14159 2,718 1e-10 #42 $5",
         "don't won't it's o'clock", "https://example.com/path?q=1&b=2", "[CLS] literal special [SEP] tokens",
         "word " * 60, "supercalifragilisticexpialidocious antidisestablishmentarianism"]


def sentences(wikitext, n: int, seed: int = 0) -> list[str]:
    """``n`` varied texts: hand-picked edge cases, then WikiText sentences cut to random lengths."""
    rnd = random.Random(seed)
    lines = [ln.strip() for ln in wikitext.read_text(encoding="utf-8").splitlines()[:3000] if len(ln.strip()) > 40]
    out = list(EXTRA)
    while len(out) < n:
        s = rnd.choice(lines)
        a = rnd.randrange(0, len(s) // 2)
        out.append(s[a:a + rnd.randint(5, 240)].strip())
    return out[:n]


@pytest.fixture(scope="module")
def minilm_gguf(minilm, tmp_path_factory):
    return convert(minilm, tmp_path_factory.mktemp("embed") / "minilm-f32.gguf", "f32", progress=False)


@pytest.fixture(scope="module")
def bert(minilm_gguf):
    f = GGUFFile(minilm_gguf)
    return load_model(f, device="cpu"), Tokenizer.from_gguf(f)


def test_minilm_matches_sentence_transformers(bert, minilm, wikitext):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model, tok = bert
    texts = sentences(wikitext, 200)
    ids = [tok.encode(t, add_special=True, parse_special=True) for t in texts]  # as llama-embedding
    assert ids == AutoTokenizer.from_pretrained(minilm)(texts)["input_ids"]  # WordPiece from GGUF metadata
    emb = Embedder(model, n_ubatch=512)
    assert emb.pooling == "mean"  # bert.pooling_type written by the converter from 1_Pooling
    ours = torch.stack(emb.embed_tokens(ids, 2))
    ref = SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_tensor=True, batch_size=64).float()
    cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=-1)
    print(f"MiniLM vs sentence-transformers on {len(texts)} texts: min cosine {cos.min().item():.9f}")
    assert cos.min().item() >= 0.99999, f"worst cosine {cos.min().item():.7f} for {texts[int(cos.argmin())]!r}"
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-6)


def _check_invariant(model, seqs, pooling, ubatches, n_alone=4) -> list[torch.Tensor]:
    """Each of the first texts embedded alone equals itself among all ``seqs`` at every ubatch size."""
    alone = [Embedder(model, pooling, n_batch=512, n_seq_max=1).embed_tokens([s])[0] for s in seqs[:n_alone]]
    for ub in ubatches:
        packed = Embedder(model, pooling, n_batch=4096, n_ubatch=ub, n_seq_max=len(seqs)).embed_tokens(seqs)
        for k, (a, b) in enumerate(zip(alone, packed)):
            assert torch.equal(a, b), f"{pooling} ub={ub} text {k}: max diff {(a - b).abs().max().item():.3g}"
    return packed


def test_bert_batch_invariance(bert, wikitext):
    model, tok = bert
    texts = sentences(wikitext, 64, seed=1)
    random.Random(2).shuffle(texts)
    seqs = [tok.encode(t) for t in texts]
    assert len({len(s) for s in seqs}) > 20
    for pooling in ("mean", "cls"):
        _check_invariant(model, seqs, pooling, (max(map(len, seqs)), 4096))


def test_bert_sequence_longer_than_ubatch(bert):
    model, tok = bert
    with pytest.raises(BatchError, match="sequence 1 has 12 tokens but n_ubatch = 8"):
        Embedder(model, n_ubatch=8).embed_tokens([[101, 102], list(range(1000, 1012))])
    with pytest.raises(BatchError, match="beyond the model's 512 position embeddings"):
        Embedder(model, n_batch=1024, n_ubatch=1024).embed_tokens([[101] * 600])


def _random_seqs(n_vocab: int, n: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 40, (n,), generator=g).tolist()
    return [torch.randint(3, n_vocab, (k,), generator=g).tolist() for k in lens]


@pytest.mark.parametrize("name,hf_cls", [("llama-tiny", "LlamaModel"), ("mamba-tiny", "MambaModel")])
def test_causal_embeddings(shared, gguf_dir, name, hf_cls):
    """Pooled final hidden states (after the output norm, as llama.cpp's t_embd) against transformers,
    and the same vector alone or among 64 texts (2-39 tokens) at ubatch sizes that cut sequences."""
    import transformers

    model = load_model(gguf_dir / f"{name}-f32.gguf", device="cpu")
    seqs = _random_seqs(model.args.n_vocab)
    emb = {p: _check_invariant(model, seqs, p, (512, 29)) for p in ("mean", "last")}
    hf = getattr(transformers, hf_cls).from_pretrained(shared / "models" / f"{name}-hf").eval()
    with torch.no_grad():
        for k, s in enumerate(seqs[:6]):
            h = hf(torch.tensor([s])).last_hidden_state[0]
            torch.testing.assert_close(emb["mean"][k], h.mean(0), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(emb["last"][k], h[-1], atol=2e-5, rtol=1e-4)


@pytest.mark.registry
def test_smollm2_last_pooling_cli(smollm2, monkeypatch, capsys):
    """A real Llama GGUF (SmolLM2 Q4_1) through the CLI: a text's vector is the same printed alone or
    among 8 texts decoded in ubatches of 16 tokens."""
    texts = [f"text {k}: " + "lorem ipsum dolor " * (k % 5) for k in range(8)]
    args = ("embed", "-m", smollm2, "--pooling", "last", "-ub", 16, "--embd-output-format", "array")
    code, out, err = _cli(monkeypatch, capsys, *args, "-p", "\n".join(texts))
    assert code == 0, err
    packed = json.loads(out)
    assert len(packed) == 8 and len(packed[0]) == 576
    for k in (4,):
        code, out, err = _cli(monkeypatch, capsys, *args, "-p", texts[k])
        assert json.loads(out)[0] == packed[k]


def test_rank_pooling_classifier_head(minilm, tmp_path, monkeypatch, capsys):
    """BertForSequenceClassification through our converter: rank pooling = classifier on the [CLS]
    hidden state (llama.cpp's converter drops the pooler, so its head is the direct projection)."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    labels = {0: "negative", 1: "neutral", 2: "positive"}
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    hf = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        hf.classifier.weight.mul_(50)  # scores of order 1
    hf.save_pretrained(tmp_path / "hf")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, tmp_path / "hf" / name)
    path = convert(tmp_path / "hf", tmp_path / "cls.gguf", "f32", progress=False)
    f = GGUFFile(path)
    model, tok = load_model(f, device="cpu"), Tokenizer.from_gguf(f)
    assert model.n_cls_out == 3 and model.args.cls_labels == list(labels.values())
    texts = ["good movie", "the plot was dull and far too long", "okay"]
    ids = [tok.encode(t, True, True) for t in texts]
    scores = torch.stack(Embedder(model, "rank").embed_tokens(ids, -1))
    with torch.no_grad():
        ref = torch.stack([hf.classifier(hf.bert(torch.tensor([s])).last_hidden_state[0, 0]) for s in ids])
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    code, out, err = _cli(monkeypatch, capsys, "embed", "-m", path, "-p", "\n".join(texts), "--pooling", "rank",
                          "--embd-normalize", -1)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "rerank score 0: %8.3f [negative]" % ref[0, 0] and len(lines) == 9


def test_pooling_cls_last_mean_multi_sequence_tokens():
    """Tokens may belong to several sequences; cls/last pick the lowest/highest position, mean averages."""
    h = torch.arange(12, dtype=torch.float32).reshape(6, 2) ** 1.5
    seq_ids = [(0,), (0, 2), (1,), (0, 2), (1,), (2,)]
    pos = torch.tensor([5, 6, 0, 7, 1, 8])
    hn = h.numpy()
    members = {0: [0, 1, 3], 1: [2, 4], 2: [1, 3, 5]}
    sids, mean = pool(h, seq_ids, pos, "mean")
    assert sids == [0, 1, 2]
    np.testing.assert_allclose(mean.numpy(), [hn[m].mean(0) for m in members.values()], rtol=1e-6)
    _, cls = pool(h, seq_ids, pos, "cls")
    _, last = pool(h, seq_ids, pos, "last")
    np.testing.assert_array_equal(cls.numpy(), hn[[0, 2, 1]])
    np.testing.assert_array_equal(last.numpy(), hn[[3, 4, 5]])


def test_normalize_as_common_embd_normalize():
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(0))
    x[3] = 0
    xn = x.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = {2: xn / np.linalg.norm(xn, axis=1, keepdims=True),
               1: xn / np.abs(xn).sum(1, keepdims=True),
               3: xn / (np.abs(xn) ** 3).sum(1, keepdims=True) ** (1 / 3),
               0: xn * 32760.0 / np.abs(xn).max(1, keepdims=True)}
    for mode, r in ref.items():
        r[3] = 0  # an all-zero vector stays zero (llama.cpp: norm = 0)
        np.testing.assert_allclose(normalize(x, mode).numpy(), r, rtol=1e-6, atol=1e-7)
    assert torch.equal(normalize(x, -1), x)
    assert normalize(x, 0).abs().amax(1)[0].item() == pytest.approx(32760.0)


def test_output_formats_as_llama_embedding():
    """Strings written from embedding.cpp's printf calls for two 2-d embeddings, cosine 0.6."""
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    p = ["first prompt", "b"]
    assert format_embeddings(e, "array", 2, p, "mean") == "[[1.0000000,0.0000000],[0.6000000,0.8000000]]\n\n"
    assert format_embeddings(e, "raw", 2, p, "mean") == "1.0000000 0.0000000\n0.6000000 0.8000000\n\n"
    assert format_embeddings(e * 32760, "raw", 0, p, "mean") == "32760 0\n19656 26208\n\n"
    assert format_embeddings(e, "json+", 2, p, "mean") == (
        '{\n  "object": "list",\n  "data": [\n'
        '    {\n      "object": "embedding",\n      "index": 0,\n      "embedding": [1.0000000,0.0000000]\n    },\n'
        '    {\n      "object": "embedding",\n      "index": 1,\n      "embedding": [0.6000000,0.8000000]\n    }'
        '\n  ],\n  "cosineSimilarity": [\n    [  1.00,   0.60 ],\n    [  0.60,   1.00 ]\n  ]\n}\n\n')
    assert format_embeddings(e, "", 2, p, "mean") == (
        "\nembedding 0:  1.000000  0.000000 \nembedding 1:  0.600000  0.800000 \n\n"
        "cosine similarity matrix:\n\nfirst       b \n  1.00   0.60 first prom\n  0.60   1.00 b\n\n")
    assert format_embeddings(e[:, :1], "", -1, p, "rank") == "\nrerank score 0:    1.000\nrerank score 1:    0.600\n\n"


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``gguf-runtime ARGS`` in-process through the real entry point (errors -> exit code 2)."""
    monkeypatch.setattr(sys, "argv", ["gguf-runtime", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_embed_json_and_errors(minilm_gguf, tmp_path, monkeypatch, capsys):
    texts = ["The cat sat on the mat.", "A feline rested on the rug.", "Quarterly revenue rose 4%."]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    code, out, err = _cli(monkeypatch, capsys, "embed", "-m", minilm_gguf, "-f", tmp_path / "p.txt", "-ub", 64,
                          "--embd-output-format", "json+")
    assert code == 0, err
    doc = json.loads(out)
    vecs = torch.tensor([d["embedding"] for d in doc["data"]])
    assert vecs.shape == (3, 384) and [d["index"] for d in doc["data"]] == [0, 1, 2]
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
    sim = torch.tensor(doc["cosineSimilarity"])
    assert sim[0, 1] > sim[0, 2] + 0.2  # the paraphrase is closer than the unrelated text
    code, out, err = _cli(monkeypatch, capsys, "embed", "-m", minilm_gguf, "-p", "one<#>two", "--embd-separator", "<#>",
                          "--pooling", "none", "--embd-output-format", "array", "--embd-normalize", -1)
    assert code == 0, err
    assert len(json.loads(out)) == 6  # per-token rows: [CLS] one [SEP] [CLS] two [SEP]
    for args, msg in [((), "exactly one of -p TEXT or -f FILE"),
                      (("-p", "x", "--pooling", "max"), "invalid --pooling 'max'"),
                      (("-p", "x", "--embd-output-format", "xml"), "invalid --embd-output-format 'xml'"),
                      (("-p", "x", "--embd-normalize", -2), "invalid --embd-normalize -2"),
                      (("-p", "x", "--pooling", "rank"), "rank pooling needs a classifier head"),
                      (("-p", "word " * 40, "-ub", 16), "has 42 tokens but n_ubatch = 16")]:
        code, out, err = _cli(monkeypatch, capsys, "embed", "-m", minilm_gguf, *args)
        assert code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err
    code, out, err = _cli(monkeypatch, capsys, "embed", "-m", tmp_path / "missing.gguf", "-p", "x")
    assert code == 2 and "no such file" in err and err.count("\n") == 1, err
