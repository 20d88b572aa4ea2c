"""``gguf-runtime inspect``: its JSON against gguf-py's GGUFReader, the readable tables on the
issue's two registry models, and the installed console script end to end."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from gguf import GGUFReader

from gguf_runtime.cli.main import main


def _run(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["gguf-runtime", "inspect", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_json_matches_gguf_py(gguf_dir, monkeypatch, capsys):
    path = gguf_dir / "llama-tiny-Q4_K_M.gguf"
    rep = json.loads(_run(monkeypatch, capsys, path, "--json"))
    ref = GGUFReader(str(path))
    assert rep["architecture"] == ref.fields["general.architecture"].contents() == "llama"
    assert rep["gguf_version"] == ref.fields["GGUF.version"].contents()
    assert [(t["name"], t["type"], t["shape"], t["n_bytes"]) for t in rep["tensors"]] == [
        (t.name, t.tensor_type.name, list(reversed(t.shape.tolist())), int(t.n_bytes)) for t in ref.tensors]
    meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(rep["metadata"]) == list(meta)
    tokens = rep["metadata"]["tokenizer.ggml.tokens"]  # the vocabulary is summarised by its length
    assert tokens["length"] == len(meta["tokenizer.ggml.tokens"]) == 2048
    assert tokens["type"] == "array[string]" and tokens["head"] == meta["tokenizer.ggml.tokens"][:3]
    assert rep["metadata"]["llama.block_count"] == meta["llama.block_count"]
    assert rep["totals"]["n_bytes"] == sum(int(t.n_bytes) for t in ref.tensors)
    assert rep["totals"]["by_type"]["Q4_K"]["tensors"] == sum(t.tensor_type.name == "Q4_K" for t in ref.tensors)


@pytest.mark.parametrize("model, arch, n_vocab, types", [  # published vocabulary sizes
    ("smollm2", "llama", 49152, {"Q4_1", "Q8_0", "F32"}),
    ("gemma3", "gemma3", 262144, {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}),
])
def test_tables_on_registry_models(model, arch, n_vocab, types, request, monkeypatch, capsys):
    path = request.getfixturevalue(model)
    out = _run(monkeypatch, capsys, path)
    assert f"architecture: {arch}" in out
    for needle in ("metadata", "tensors (shape outermost first)", "totals by type", "token_embd.weight",
                   "blk.0.attn_q.weight", "tokenizer.ggml.tokens", *types):
        assert needle in out, needle
    assert f"{n_vocab} items: " in out  # long arrays are shown by their length and first items
    rep = json.loads(_run(monkeypatch, capsys, path, "--json"))
    assert set(rep["totals"]["by_type"]) == types and rep["architecture"] == arch
    assert f"{rep['totals']['n_elements']:,}" in out


def test_console_script(gguf_dir, tmp_path):
    exe = shutil.which("gguf-runtime")
    if exe is None:
        pytest.fail("console script gguf-runtime is not installed (pip install -e .)")
    ok = subprocess.run([exe, "inspect", str(gguf_dir / "mamba-tiny-q8_0.gguf"), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["architecture"] == "mamba"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x07\x00\x00\x00" + bytes(16))
    res = subprocess.run([exe, "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"error: {bad}: unsupported GGUF version 7 (supported: 2, 3)"]
