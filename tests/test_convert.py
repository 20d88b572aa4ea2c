"""`convert`: checkpoints -> GGUF, checked against llama.cpp's own conversions in ../shared, the
checkpoints' weights, and the tokenizer files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_runtime import GGUFFile
from gguf_runtime.convert import hf
from gguf_runtime.convert.checkpoint import Checkpoint
from gguf_runtime.convert.hf import convert
from gguf_runtime.errors import ConvertError

T = gguf.GGMLQuantizationType


def read(path: Path) -> tuple[dict, dict]:
    """(metadata without general.*, {tensor: (type, shape, bytes)}) through gguf-py's reader."""
    r = gguf.GGUFReader(path)
    kv = {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith(("GGUF.", "general."))}
    ts = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), np.asarray(t.data).view(np.uint8).tobytes())
          for t in r.tensors}
    return kv, ts


def ulp_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(np.frombuffer(a, np.int32).astype(np.int64) - np.frombuffer(b, np.int32)).max())


# A = -exp(A_log) is computed by torch's float32 exp, whose last bit depends on the torch build and
# CPU (the reference files were made elsewhere): those tensors are compared to within 1 ulp.
EXP_TENSORS = ("ssm_a",)


def assert_same_tensors(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for name, (qt, shape, data) in ref.items():
        assert ours[name][:2] == (qt, shape), name
        if name.endswith(EXP_TENSORS) and qt == T.F32 and ours[name][2] != data:
            assert ulp_diff(ours[name][2], data) <= 1, name
        else:
            assert ours[name][2] == data, name


@pytest.mark.parametrize("model,outtype,ref", [
    ("llama-tiny-hf", "f32", "llama-tiny-f32"),
    ("llama-tiny-hf", "f16", "llama-tiny-f16"),
    ("llama-tiny-hf", "q8_0", "llama-tiny-Q8_0"),
    ("mamba-tiny-hf", "f32", "mamba-tiny-f32"),
    ("mamba-tiny-hf", "q8_0", "mamba-tiny-q8_0"),  # ssm_dt rows of 16: Q8_0 falls back to F16
    ("mamba2-tiny-hf", "f32", "mamba2-tiny-f32"),
])
def test_identical_to_llamacpp(shared, gguf_dir, tmp_path, model, outtype, ref):
    out = convert(shared / "models" / model, tmp_path / "out.gguf", outtype, progress=False)
    (kv, ts), (rkv, rts) = read(out), read(gguf_dir / f"{ref}.gguf")
    assert kv == rkv  # every key llama.cpp writes, types included, except general.* provenance
    assert_same_tensors(ts, rts)
    assert GGUFFile(out).metadata["general.file_type"] == GGUFFile(gguf_dir / f"{ref}.gguf").metadata["general.file_type"]


def test_state_spaces_layout(shared, gguf_dir, tmp_path):
    src = shared / "models" / "mamba-tiny-ss"
    cfg = json.loads((src / "config.json").read_text())
    assert "architectures" not in cfg and "d_state" not in cfg  # what stops llama.cpp b4748 (#8690)
    assert "lm_head.weight" in torch.load(src / "pytorch_model.bin", weights_only=True, mmap=True)
    out = convert(src, tmp_path / "ss.gguf", "f32", progress=False)
    (kv, ts), (rkv, rts) = read(out), read(gguf_dir / "mamba-tiny-f32.gguf")
    assert_same_tensors(ts, rts)  # tied lm_head dropped, A = -exp(A_log), conv1d squeezed
    assert {k: v for k, v in kv.items() if k.startswith("mamba.")} == {k: v for k, v in rkv.items() if k.startswith("mamba.")}
    # the config carries no special-token ids: those are the only keys that may differ
    differ = {k for k in kv.keys() | rkv.keys() if kv.get(k) != rkv.get(k)}
    assert differ <= {"tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"}


def test_sharded_safetensors_and_errors(shared, gguf_dir, tmp_path):
    src = shared / "models" / "llama-tiny-hf"
    d = tmp_path / "sharded"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, d / f.name)
    weights = load_file(src / "model.safetensors")
    names = sorted(weights)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in parts.items():
        save_file({k: weights[k] for k in keys}, d / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    out = convert(d, tmp_path / "sharded.gguf", "f32", progress=False)
    assert_same_tensors(read(out)[1], read(gguf_dir / "llama-tiny-f32.gguf")[1])

    (d / "model-00002-of-00002.safetensors").unlink()  # inconsistent folder: one line, no output
    with pytest.raises(ConvertError, match="missing weight files.*00002") as e:
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "bad.gguf").exists()

    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ConvertError, match="unsupported architecture FooForCausalLM"):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    with pytest.raises(ConvertError, match="no config.json"):
        convert(tmp_path, tmp_path / "bad.gguf", "f32", progress=False)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint folder ``src`` (files linked) with some config.json values changed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **changes}))
    return dst


@pytest.mark.parametrize("model,changes,message", [
    ("llama-tiny-hf", {"num_attention_heads": 3}, r"q_proj.weight \(256, 256\) does not fit config.json"),
    ("mamba-tiny-hf", {"intermediate_size": 768}, "d_inner 768 != 2 \\* d_model 256"),
    ("mamba2-tiny-hf", {"head_dim": 48}, "inconsistent Mamba2 sizes"),
    ("llama-tiny-hf", {"num_hidden_layers": None}, "none of n_layers, num_hidden_layers"),
])
def test_inconsistent_config(shared, tmp_path, model, changes, message):
    d = _with_config(shared / "models" / model, tmp_path / "m", **changes)
    with pytest.raises(ConvertError, match=message) as e:
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "bad.gguf").exists()


def test_bf16_and_auto(shared, tmp_path, monkeypatch):
    src = shared / "models" / "llama-tiny-hf"
    w = load_file(src / "model.safetensors")
    f = GGUFFile(convert(src, tmp_path / "b.gguf", "bf16", progress=False))
    assert f.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)
    emb, norm = f.tensor_infos["token_embd.weight"], f.tensor_infos["output_norm.weight"]
    assert (emb.qtype, norm.qtype) == (T.BF16, T.F32)
    assert torch.equal(f.tensor("token_embd.weight"), w["model.embed_tokens.weight"].bfloat16().float())
    out = tmp_path / "auto"
    out.mkdir()
    monkeypatch.chdir(out)  # default --outfile: ./<folder>-<type>.gguf; f32 weights give llama.cpp's auto f16
    assert convert(src, progress=False) == out / "llama-tiny-hf-f16.gguf" and (out / "llama-tiny-hf-f16.gguf").is_file()


class _Payload:
    """Unpickling this creates a file: what an arbitrary pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_is_never_executed(shared, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(shared / "models" / "mamba-tiny-ss" / "config.json", d / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"backbone.embedding.weight": torch.zeros(2, 2), "x": _Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="cannot read weights"):
        convert(d, tmp_path / "evil.gguf", "f32", progress=False)
    assert not marker.exists()


def test_streams_one_tensor_at_a_time_and_leaves_nothing_on_failure(shared, tmp_path, monkeypatch, capsys):
    live, peak = set(), [0]
    load = Checkpoint.load

    def tracked(self, name):
        t = load(self, name)
        live.add(id(t))
        weakref.finalize(t, live.discard, id(t))
        peak[0] = max(peak[0], len(live))
        return t

    monkeypatch.setattr(Checkpoint, "load", tracked)
    out = tmp_path / "m.gguf"
    convert(shared / "models" / "llama-tiny-hf", out, "f16", progress=True)
    assert peak[0] == 1  # never more than one checkpoint tensor in memory
    assert "convert llama-tiny-hf" in capsys.readouterr().err  # the progress bar, on stderr

    out.write_bytes(b"previous")
    encode, calls = hf._encode, [0]

    def failing(t, q):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the tensor data
        return encode(t, q)

    monkeypatch.setattr(hf, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(shared / "models" / "llama-tiny-hf", out, "f16", progress=False)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_bert_minilm(minilm, tmp_path):
    out = convert(minilm, tmp_path / "minilm.gguf", "f16", progress=False)
    f = GGUFFile(out)
    cfg = json.loads((minilm / "config.json").read_text())
    md = f.metadata
    assert f.arch == "bert" and md["bert.block_count"] == cfg["num_hidden_layers"] == 6
    assert (md["bert.embedding_length"], md["bert.feed_forward_length"], md["bert.attention.head_count"],
            md["bert.context_length"]) == (384, 1536, 12, 512)
    assert md["bert.attention.causal"] is False and md["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
    assert json.loads((minilm / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert md["bert.pooling_type"] == int(gguf.PoolingType.MEAN)
    # WordPiece as llama.cpp writes it: "##x" -> "x", other non-control tokens get the phantom space
    vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").splitlines()
    control = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    want = [t if t in control else t[2:] if t.startswith("##") else "\u2581" + t for t in vocab]
    assert md["tokenizer.ggml.model"] == "bert" and md["tokenizer.ggml.tokens"] == want
    assert md["tokenizer.ggml.token_type"] == [3 if t in control else 1 for t in vocab]
    assert md["tokenizer.ggml.pre"] == "jina-v2-en"  # llama.cpp's name for this tokenizer's probe hash
    ids = {k: md[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                   "seperator_token_id", "padding_token_id", "mask_token_id")}
    assert ids == {"bos_token_id": vocab.index("[CLS]"), "eos_token_id": vocab.index("[SEP]"),
                   "unknown_token_id": vocab.index("[UNK]"), "seperator_token_id": vocab.index("[SEP]"),
                   "padding_token_id": vocab.index("[PAD]"), "mask_token_id": vocab.index("[MASK]")}
    assert md["tokenizer.ggml.token_type_count"] == 2 and md["tokenizer.ggml.normalizer.lowercase"] is True
    # tensors: every HF weight under llama.cpp's BERT name; norms, biases, positions and token types stay F32
    w = load_file(minilm / "model.safetensors")
    names = {"embeddings.word_embeddings.weight": "token_embd.weight",
             "embeddings.position_embeddings.weight": "position_embd.weight",
             "embeddings.token_type_embeddings.weight": "token_types.weight",
             "embeddings.LayerNorm.weight": "token_embd_norm.weight", "embeddings.LayerNorm.bias": "token_embd_norm.bias"}
    per_layer = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
                 "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
                 "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm"}
    for i in range(6):
        for hf_name, g in per_layer.items():
            for s in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf_name}.{s}"] = f"blk.{i}.{g}.{s}"
    assert set(f.tensor_infos) == set(names.values())  # pooler and position_ids dropped
    for hf_name, g in names.items():
        info = f.tensor_infos[g]
        f32 = len(info.shape) == 1 or g in ("position_embd.weight", "token_types.weight")
        assert info.qtype == (T.F32 if f32 else T.F16), g
        want_t = w[hf_name] if f32 else w[hf_name].half()
        assert torch.equal(f.tensor(g, dtype=want_t.dtype), want_t), g


def test_gpt2_tiny(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = _byte_level_bpe(300)
    d = tmp_path / "gpt2"
    transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(d)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}

    f = GGUFFile(convert(d, tmp_path / "gpt2.gguf", "f16", progress=False))
    md = f.metadata
    assert f.arch == "gpt2" and md["gpt2.block_count"] == 2 and md["gpt2.context_length"] == 64
    assert (md["gpt2.embedding_length"], md["gpt2.feed_forward_length"], md["gpt2.attention.head_count"]) == (32, 128, 4)
    assert md["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    vocab = tok.get_vocab()
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(md["tokenizer.ggml.merges"]) == len(json.loads((d / "tokenizer.json").read_text())["model"]["merges"])
    # llama.cpp's GPT-2 names; Conv1D weights (in, out) transposed to (out, in)
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    per_layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(2):
        for hf_name, g in per_layer.items():
            for s in ("weight", "bias"):
                names[f"transformer.h.{i}.{hf_name}.{s}"] = f"blk.{i}.{g}.{s}"
    tied = "lm_head.weight" not in load_file(d / "model.safetensors")
    assert set(f.tensor_infos) == set(names.values()) | (set() if tied else {"output.weight"})
    for hf_name, g in names.items():
        want = sd[hf_name]
        if "c_" in hf_name and hf_name.endswith("weight"):
            want = want.T
        quantized = want.dim() == 2 and g != "position_embd.weight"  # llama.cpp keeps positions in F32
        assert f.tensor_infos[g].qtype == (T.F16 if quantized else T.F32), g
        assert torch.equal(f.tensor(g), want.half().float() if quantized else want), g


def _byte_level_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder, tok.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    text = ["the quick brown fox jumps over the lazy dog", "a GGUF file holds tensors and metadata"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_llama_bpe_tied_and_rope_scaling(tmp_path, rope):
    transformers = pytest.importorskip("transformers")
    tok = _byte_level_bpe(300)
    d = tmp_path / "llama"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, rope_scaling={"rope_theta": 10000.0, **rope})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    f = GGUFFile(convert(d, tmp_path / "l.gguf", "f32", progress=False))
    md, vocab = f.metadata, tok.get_vocab()
    # tokenizer.json BPE: llama.cpp's gpt2 vocabulary, padded to the model's vocab_size with [PADi]
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(len(vocab), 320)]
    assert "output.weight" not in f.tensor_infos  # tied: llama.cpp reuses token_embd
    # Q/K rows permuted from HF's rotate-half order to GGML's interleaved pairs
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    perm = torch.arange(64).reshape(4, 2, 8).transpose(1, 2).reshape(64)
    assert torch.equal(f.tensor("blk.0.attn_q.weight"), q[perm])
    if rope["rope_type"] == "linear":
        assert md["llama.rope.scaling.type"] == "linear" and md["llama.rope.scaling.factor"] == 2.0
    else:  # llama3: per-frequency divisors in rope_freqs, transformers' own llama3 inv_freq as reference
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, torch.device("cpu"))
        base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        assert torch.allclose(f.tensor("rope_freqs.weight"), base / scaled, rtol=1e-6)
        assert f.tensor("rope_freqs.weight").max() == 8.0


def test_cli_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                                      "num_attention_heads": 1}))
    r = subprocess.run([sys.executable, "-m", "gguf_runtime.cli.main", "convert", str(tmp_path), "--outfile",
                        str(tmp_path / "o.gguf")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error:") and "no model weights" in r.stderr
    assert not (tmp_path / "o.gguf").exists()
