"""`convert` of the zoo (#14, #15): Qwen2, Qwen3, Phi-3, GPT-2, Mixtral, Qwen3-MoE, Gemma 2, Gemma 3,
each against llama.cpp's own conversion in ../shared/models/gguf (convert_hf_to_gguf.py of the tree
vendored in llama-cpp-python 0.3.36, commit 0c1e570): every metadata key and value (general.*
included), every tensor's name, type, shape, bytes and position. Then the BPE pre-tokenizer choice."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_runtime.convert import bpe_pre, vocab
from gguf_runtime.convert.hf import convert
from gguf_runtime.errors import ConvertError


def read(path: Path) -> tuple[dict, list]:
    """(every metadata key -> (types, value), [(tensor, type, shape, bytes)] in file order)."""
    r = gguf.GGUFReader(path)
    kv = {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = [(t.name, t.tensor_type, tuple(int(x) for x in t.shape), np.asarray(t.data).view(np.uint8).tobytes())
          for t in r.tensors]
    return kv, ts


def assert_same(ours: Path, ref: Path, skip_keys: tuple[str, ...] = ()) -> None:
    (kv, ts), (rkv, rts) = read(ours), read(ref)
    differ = sorted(k for k in kv.keys() | rkv.keys() if kv.get(k) != rkv.get(k) and k not in skip_keys)
    assert not differ, differ
    assert [t[:3] for t in ts] == [t[:3] for t in rts]  # names, types, shapes, in llama.cpp's order
    bad = [t[0] for t, r in zip(ts, rts) if t[3] != r[3]]
    assert not bad, bad


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """``dst`` with every file of ``src`` symlinked, except ``skip`` (to be written by the test)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


# family -> what it exercises beyond the plain names (all of it checked by the byte comparison)
FAMILIES = {
    "qwen2": "QKV biases, tied output, BPE with the Qwen2 regex (pre qwen2)",
    "qwen3": "q/k norms, head_dim keys, untied output",
    "phi3": "fused qkv / gate_up kept fused, Phi-3's own sentencepiece reading, sliding_window 0",
    "gpt2": "Conv1D weights transposed, learned positions in F32, BPE with GPT-2's byte-level regex",
    "mixtral": "llama arch, Q/K permuted, 4 experts x w1/w2/w3 stacked to 3-D, ffn_gate_inp F32",
    "qwen3moe": "experts down/gate/up stacked, expert_feed_forward_length, q/k norms",
    "gemma2": "norms + 1, lm_head dropped, soft-caps, window, add_space_prefix false",
    "gemma3": "norms + 1 (q/k norms too), freq_base_swa, window, embedding cut to the vocabulary",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identical_to_llamacpp(shared, gguf_dir, tmp_path, family):
    # the Phi-3 reference was converted with --model-name "Tiny P3 Zoo" (../shared/README.md)
    name = "Tiny P3 Zoo" if family == "phi3" else None
    out = convert(shared / "models" / f"{family}-tiny-hf", tmp_path / "out.gguf", "f32", progress=False,
                  model_name=name)
    assert_same(out, gguf_dir / f"{family}-tiny-f32.gguf")


def test_model_name_is_general_name(shared, gguf_dir, tmp_path):
    """Without --model-name the name comes from the folder, as llama.cpp's; it is the only difference."""
    out = convert(shared / "models" / "phi3-tiny-hf", tmp_path / "p.gguf", "f32", progress=False)
    assert read(out)[0]["general.name"][1] == "Phi3 Tiny Hf"
    assert_same(out, gguf_dir / "phi3-tiny-f32.gguf", skip_keys=("general.name",))


def test_phi3_long_rope(shared, gguf_dir, tmp_path):
    """A long-RoPE Phi-3 config: the factors as rope_factors_long/short (F32) and transformers' own
    longrope attention factor; the rest of the file as llama.cpp's (during development this whole
    file was also byte-identical to the vendored convert_hf_to_gguf.py's, at f16)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = shared / "models" / "phi3-tiny-hf"
    d = linked_copy(src, tmp_path / "lr", skip=("config.json",))
    cfg = json.loads((src / "config.json").read_text())
    long, short = [1.0 + i / 8 for i in range(16)], [1.0 + i / 32 for i in range(16)]
    cfg["max_position_embeddings"] = 8192
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "long_factor": long, "short_factor": short, "original_max_position_embeddings": 2048}
    (d / "config.json").write_text(json.dumps(cfg))
    out = convert(d, tmp_path / "lr.gguf", "f32", progress=False, model_name="Tiny P3 Zoo")
    (kv, ts), (rkv, rts) = read(out), read(gguf_dir / "phi3-tiny-f32.gguf")
    _, attn = ROPE_INIT_FUNCTIONS["longrope"](AutoConfig.from_pretrained(d), "cpu")
    assert kv.pop("phi3.rope.scaling.attn_factor")[1] == pytest.approx(attn, rel=1e-7)
    assert kv.pop("phi3.context_length")[1] == 8192
    rkv.pop("phi3.context_length")
    assert kv == rkv
    extra = {t[0]: t for t in ts[:2]}
    assert [t[0] for t in ts[:2]] == ["rope_factors_long.weight", "rope_factors_short.weight"]
    for name, want in (("rope_factors_long.weight", long), ("rope_factors_short.weight", short)):
        assert extra[name][1:3] == (gguf.GGMLQuantizationType.F32, (16,))
        assert extra[name][3] == np.array(want, np.float32).tobytes()
    assert ts[2:] == rts


def test_qwen3moe_fused_expert_layout(shared, gguf_dir, tmp_path):
    """transformers' fused layout (``mlp.experts.gate_up_proj`` (n_expert, 2 n_ff, n_embd), gate rows
    first, and ``mlp.experts.down_proj``), as llama.cpp reads it: the same file."""
    src = shared / "models" / "qwen3moe-tiny-hf"
    d = linked_copy(src, tmp_path / "fused", skip=("model.safetensors",))
    w = load_file(src / "model.safetensors")
    n = json.loads((src / "config.json").read_text())["num_local_experts"]
    fused = {k: v for k, v in w.items() if ".experts." not in k}
    for layer in sorted({int(k.split(".")[2]) for k in w if ".experts." in k}):
        p = f"model.layers.{layer}.mlp.experts"
        stack = {kind: torch.stack([w[f"{p}.{x}.{kind}.weight"] for x in range(n)]) for kind in ("gate_proj", "up_proj", "down_proj")}
        fused[f"{p}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        fused[f"{p}.down_proj"] = stack["down_proj"]
    save_file(fused, d / "model.safetensors")
    out = convert(d, tmp_path / "f.gguf", "f32", progress=False)
    (kv, ts), (rkv, rts) = read(out), read(gguf_dir / "qwen3moe-tiny-f32.gguf")
    assert {k: v for k, v in kv.items() if k != "general.name"} == {k: v for k, v in rkv.items() if k != "general.name"}
    assert sorted(ts) == sorted(rts)  # same tensors and bytes; only their order follows the checkpoint


def test_missing_expert_is_one_line(shared, tmp_path):
    src = shared / "models" / "mixtral-tiny-hf"
    d = linked_copy(src, tmp_path / "m", skip=("model.safetensors",))
    save_file({k: v for k, v in load_file(src / "model.safetensors").items()
               if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}, d / "model.safetensors")
    with pytest.raises(ConvertError, match=r"layer 1: expected 4 experts x w1/w2/w3 .*missing 2\.w3") as e:
        convert(d, tmp_path / "m.gguf", "f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------- the BPE pre-tokenizer


def _tokenizer(d: Path):
    return vocab._tokenizer(d)


@pytest.mark.parametrize("family,name", [("qwen2", "qwen2"), ("qwen3", "qwen2"), ("qwen3moe", "qwen2"), ("gpt2", "gpt-2")])
def test_new_vocabulary_named_by_its_declared_regex(shared, family, name):
    """The fixtures' vocabularies are new: their probe hash is not in llama.cpp's table, so the name
    comes from tokenizer.json's declared pre-tokenizer (llama.cpp's reference files say the same)."""
    tok, spec = _tokenizer(shared / "models" / f"{family}-tiny-hf")
    assert bpe_pre.probe_hash(tok) not in bpe_pre.CHKHSH
    assert bpe_pre.DECLARED[bpe_pre.declared(spec)] == name
    assert bpe_pre.choose(tok, spec) == name


def test_known_hash_wins(smollm2):
    """SmolLM2's vocabulary, rebuilt from its GGUF (tokens, merges; SmolLM's Digits + ByteLevel
    pre-tokenizer): its probe hash is in llama.cpp's table as "smollm", the name that GGUF carries.
    Its declared pre-tokenizer alone would not name it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    f = gguf.GGUFReader(smollm2).fields
    tokens, merges = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.merges"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    spec = json.loads(tok.to_str())
    assert bpe_pre.declared(spec) not in bpe_pre.DECLARED
    assert bpe_pre.choose(tok, spec) == "smollm" == f["tokenizer.ggml.pre"].contents()
    assert bpe_pre.choose(tok, spec, override="llama-bpe") == "llama-bpe"  # the override still wins


def _edit_pre(src: Path, dst: Path, edit) -> Path:
    d = linked_copy(src, dst, skip=("tokenizer.json",))
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (d / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return d


def _digits_1_to_2(spec):  # Qwen2's regex with "\p{N}{1,2}": no llama.cpp pre-tokenizer splits so
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}|", r"\p{N}{1,2}|")


def _prefix_space(spec):  # GPT-2's byte-level regex, but adding a prefix space: not llama.cpp's gpt-2
    spec["pre_tokenizer"]["add_prefix_space"] = True


@pytest.mark.parametrize("family,edit", [("qwen2", _digits_1_to_2), ("gpt2", _prefix_space)])
def test_unknown_pre_tokenizer_is_one_line_unless_named(shared, gguf_dir, tmp_path, family, edit):
    d = _edit_pre(shared / "models" / f"{family}-tiny-hf", tmp_path / family, edit)
    with pytest.raises(ConvertError, match=r"tokenizer\.json: BPE pre-tokenizer not recognised \(probe hash [0-9a-f]{64} .*--vocab-pre") as e:
        convert(d, tmp_path / "x.gguf", "f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()
    # named by the user: converts, and the name is what is written
    name = "qwen2" if family == "qwen2" else "gpt-2"
    out = convert(d, tmp_path / "x.gguf", "f32", progress=False, vocab_pre=name)
    assert_same(out, gguf_dir / f"{family}-tiny-f32.gguf", skip_keys=("general.name",))


def test_override_and_bad_names(shared, gguf_dir, tmp_path):
    src = shared / "models" / "qwen2-tiny-hf"
    out = convert(src, tmp_path / "o.gguf", "f32", progress=False, vocab_pre="llama-bpe")
    assert read(out)[0]["tokenizer.ggml.pre"][1] == "llama-bpe"  # the override wins over recognition
    assert_same(out, gguf_dir / "qwen2-tiny-f32.gguf", skip_keys=("tokenizer.ggml.pre",))
    with pytest.raises(ConvertError, match=r"--vocab-pre 'qwen-2' is not a llama.cpp pre-tokenizer name") as e:
        convert(src, tmp_path / "b.gguf", "f32", progress=False, vocab_pre="qwen-2")
    assert "\n" not in str(e.value) and not (tmp_path / "b.gguf").exists()


def test_cli_vocab_pre_and_model_name(shared, tmp_path, capsys):
    """The CLI's flags (in process: the same main() the console script runs)."""
    from gguf_runtime.cli.main import main

    d = _edit_pre(shared / "models" / "qwen2-tiny-hf", tmp_path / "q", _digits_1_to_2)
    argv = ["convert", str(d), "--outtype", "f32", "-q", "--outfile", str(tmp_path / "q.gguf")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.strip().count("\n") == 0 and "--vocab-pre" in err, err
    assert not (tmp_path / "q.gguf").exists()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--vocab-pre", "qwen2", "--model-name", "Tiny Q2"])
    assert e.value.code == 0, capsys.readouterr().err
    kv = read(tmp_path / "q.gguf")[0]
    assert (kv["tokenizer.ggml.pre"][1], kv["general.name"][1]) == ("qwen2", "Tiny Q2")
