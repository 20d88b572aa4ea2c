"""perplexity: llama.cpp's published figures, transformers scoring the same chunks, split invariance,
the CLI's lines and errors."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from gguf_runtime.errors import BatchError
from gguf_runtime.gguf import native
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity, token_nll

# llama-perplexity (b4748, CPU) -c 128 over the first 200,000 bytes of wikitext-2-test.txt (../shared/README.md)
LLAMA_TINY_PPL, LLAMA_TINY_ERR = 587.9062, 5.57153
MAMBA_TINY_PPL, MAMBA_TINY_ERR = 503.3301, 5.02208


from helpers import wiki_tokens as _wiki_tokens


@pytest.fixture(scope="module")
def tiny(gguf_dir, wikitext):
    path = gguf_dir / "llama-tiny-f32.gguf"
    toks, tok = _wiki_tokens(path, wikitext)
    return load_model(path), toks, tok


def test_llama_tiny_matches_llama_cpp(tiny):
    model, toks, tok = tiny
    assert tok.add_bos
    r = perplexity(model, toks, n_ctx=128, bos=tok.bos_id)
    assert r.n_chunks == 683 and r.n_scored == 683 * 63
    assert abs(r.ppl - LLAMA_TINY_PPL) / LLAMA_TINY_PPL < 1e-4
    assert abs(r.ppl_err - LLAMA_TINY_ERR) / LLAMA_TINY_ERR < 1e-3
    assert len(r.chunk_ppl) == 683 and r.chunk_ppl[-1] == r.ppl


def test_same_chunks_as_transformers(tiny, shared):
    """transformers' Llama scoring the same chunks (BOS first, second half) gives the same NLLs."""
    transformers = pytest.importorskip("transformers")
    model, toks, tok = tiny
    hf = transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", torch_dtype=torch.float32).eval()
    n_ctx, n = 128, 6
    r = perplexity(model, toks, n_ctx=n_ctx, n_chunks=n, bos=tok.bos_id)
    chunks = toks[:n * n_ctx].view(n, n_ctx).clone()
    chunks[:, 0] = tok.bos_id
    with torch.inference_mode():
        logits = hf(chunks).logits
    ref = [float(token_nll(logits[i, 64:127], chunks[i, 65:]).mean()) for i in range(n)]
    assert r.chunk_nll == pytest.approx(ref, rel=2e-6)
    nll = torch.tensor(ref, dtype=torch.float64).mean().item()
    assert r.ppl == pytest.approx(math.exp(nll), rel=2e-6)


@pytest.mark.parametrize("n_batch,n_ubatch,n_chunks", [(128, 1, 2), (64, 64, 24), (512, 37, 24), (1024, 512, 24)])
def test_split_invariance(tiny, n_batch, n_ubatch, n_chunks):
    """Every -b / -ub gives the same running PPL to the last bit (hence to every printed digit)."""
    model, toks, tok = tiny
    ref = perplexity(model, toks, n_ctx=128, n_batch=2048, n_ubatch=512, n_chunks=n_chunks, bos=tok.bos_id)
    r = perplexity(model, toks, n_ctx=128, n_batch=n_batch, n_ubatch=n_ubatch, n_chunks=n_chunks, bos=tok.bos_id)
    assert r.chunk_ppl == ref.chunk_ppl and r.ppl_err == ref.ppl_err
    assert [f"{p:.4f}" for p in r.chunk_ppl] == [f"{p:.4f}" for p in ref.chunk_ppl]


def test_bad_parameters(tiny):
    model, toks, tok = tiny
    with pytest.raises(BatchError, match="multiple"):
        perplexity(model, toks, n_ctx=128, n_batch=300)
    with pytest.raises(BatchError, match="at least 256"):
        perplexity(model, toks[:200], n_ctx=128)


def test_mamba_matches_llama_cpp(gguf_dir, wikitext):
    path = gguf_dir / "mamba-tiny-f32.gguf"
    model = load_model(path)
    toks, tok = _wiki_tokens(path, wikitext)
    r = perplexity(model, toks, n_ctx=128, bos=tok.bos_id if tok.add_bos else None)
    assert r.n_chunks == 683
    assert abs(r.ppl - MAMBA_TINY_PPL) / MAMBA_TINY_PPL < 1e-4
    assert abs(r.ppl_err - MAMBA_TINY_ERR) / MAMBA_TINY_ERR < 1e-3


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gguf_runtime.cli.main", "perplexity", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_lines(gguf_dir, wikitext, tmp_path, tiny):
    text = tmp_path / "wiki.txt"
    text.write_bytes(wikitext.read_bytes()[:200_000])
    p = _cli("-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(text), "-c", "128", "--chunks", "20")
    assert p.returncode == 0, p.stderr
    model, toks, tok = tiny
    ref = perplexity(model, toks, n_ctx=128, n_chunks=20, bos=tok.bos_id)
    lines = p.stdout.splitlines()
    assert lines[0] == "".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(ref.chunk_ppl))
    assert lines[-1] == f"Final estimate: PPL = {ref.ppl:.4f} +/- {ref.ppl_err:.5f}"


@pytest.mark.parametrize("args,msg", [
    (["-f", "/nonexistent/text.txt"], "file not found"),
    (["-c", "128", "-b", "300"], "must be below -c 128 or a multiple"),
    (["--kl-divergence"], "needs --kl-divergence-base"),
    (["--hellaswag"], "needs -f"),
    (["-c", "128", "--chunks", "2", "--kl-divergence-base", "/nonexistent/dir/base.kld"], "cannot write logits file"),
    (["-ctk", "q4_0"], "unknown -ctk 'q4_0'"),
])
def test_cli_errors(gguf_dir, args, msg):
    p = _cli("-m", str(gguf_dir / "llama-tiny-f32.gguf"), *args, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and msg in last and "Traceback" not in p.stderr


def test_cli_default_runs_smollm2_on_bundled_text(smollm2):
    """`gguf-runtime perplexity` with no -m / -f: SmolLM2 on the bundled sample (kept short here)."""
    p = _cli("-c", "128", "--chunks", "2")
    assert p.returncode == 0, p.stderr
    assert "bundled sample" in p.stderr and smollm2.name in p.stderr
    first, last = p.stdout.splitlines()[0], p.stdout.splitlines()[-1]
    m = re.fullmatch(r"\[1\][\d.]+,\[2\]([\d.]+),", first)
    assert m and last.startswith(f"Final estimate: PPL = {m.group(1)} +/- ")


def test_cli_ggml_numerics_and_cache_types(gguf_dir, wikitext, tmp_path):
    """--ggml-numerics rounds as llama.cpp does (changes a quantized model's PPL a little); an f16 KV
    cache alone moves it less; both report what they do."""
    text = tmp_path / "wiki.txt"
    text.write_bytes(wikitext.read_bytes()[:40_000])
    args = ("-m", str(gguf_dir / "llama-tiny-Q4_K_M.gguf"), "-f", str(text), "-c", "128", "--chunks", "4", "--no-progress")
    runs = {k: _cli(*args, *extra) for k, extra in {"plain": (), "f16kv": ("-ctk", "f16", "-ctv", "f16"),
                                                    "ggml": ("--ggml-numerics",)}.items()}
    assert all(p.returncode == 0 for p in runs.values()), [p.stderr for p in runs.values()]
    ppl = {k: float(re.search(r"PPL = ([\d.]+)", p.stdout).group(1)) for k, p in runs.items()}
    assert "ggml numerics: activations rounded" in runs["ggml"].stderr
    assert ppl["ggml"] != ppl["plain"] and ppl["ggml"] == pytest.approx(ppl["plain"], rel=2e-3)
    assert ppl["f16kv"] == pytest.approx(ppl["plain"], rel=2e-4)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_token_nll_does_not_depend_on_the_other_rows(path, monkeypatch):
    """A row's -log p is the same scored alone, among others, or picked with ``rows=`` (the tasks
    score each decode's rows together, whoever their neighbours are); and it is llama.cpp's formula,
    checked against float64 log-softmax. An odd vocabulary (GPT-2's 50,257) puts elements in
    exp's scalar tail and single rows on both threads unless the pieces are shaped alike. Both the
    native kernel (CPU float32) and the torch path (other devices) are held to it."""
    if path == "native" and native.nll() is None:
        pytest.skip("no native library (no C compiler or GGUF_RUNTIME_NATIVE=0)")
    if path == "torch":
        monkeypatch.setattr(native, "nll", lambda: None)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(70, 50257, generator=g) * 4
    targets = torch.randint(0, 50257, (70,), generator=g)
    all_rows = token_nll(logits, targets)  # a piece of 64 rows, then one of 6
    for i in (0, 33, 64, 69):  # (unpadded pieces gave row 69 other bits alone than among the 6)
        assert torch.equal(token_nll(logits[i:i + 1], targets[i:i + 1]), all_rows[i:i + 1])
    pick = torch.tensor([69, 5, 5, 64, 0])
    assert torch.equal(token_nll(logits, targets[pick], rows=pick), all_rows[pick])
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, targets.view(-1, 1)).squeeze(-1)
    assert (all_rows - ref).abs().max() < 1e-5


def test_token_nll_rejects_a_target_outside_the_vocabulary():
    logits = torch.randn(3, 100)
    with pytest.raises((IndexError, RuntimeError)):  # native check / torch's gather
        token_nll(logits, torch.tensor([1, 100, 2]))
