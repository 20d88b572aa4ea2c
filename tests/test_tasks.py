"""HellaSwag, WinoGrande, multiple choice and KL-divergence against llama.cpp and transformers.

Reference figures come from llama.cpp's own ``llama-perplexity`` (llama-cpp-python 0.3.36's vendored
llama.cpp, built CPU-only with GCC 12 / libstdc++; commands in docs/perplexity.md), run on the
fixtures in ../shared; the mt19937 values from g++ 12's ``std::mt19937`` and
``std::uniform_int_distribution<size_t>``.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
import torch

from gguf_runtime.numerics import Numerics, use
from gguf_runtime.tools import tasks
from gguf_runtime.models import load_model
from gguf_runtime.tools.perplexity import perplexity
from gguf_runtime.gguf.reader import GGUFFile
from gguf_runtime.tokenizer import Tokenizer

# llama-perplexity --hellaswag --hellaswag-tasks 400 on llama-tiny-f32: per-task verdicts (from its
# running accuracy lines) and its line for task 100
HS_TINY_BITS = (
    "0100000101010011000001001000000010001100001001000000001000000101000010111000011001001000000000001100"
    "0000101010001000010010000010000110001100011000001000010000001001000100000000010010110011111010110010"
    "0111010011000001000010000000110100100000100000001001101011010000000010010000000100000000000000000000"
    "1010000000010000000110001010000000000001000000100000000010101100001100100000000001101100110011000000")
HS_TINY_LINE_100 = "100\t26.00000000%\t[18.4047%, 35.3710%]"
# llama-perplexity --multiple-choice on the first 30 HellaSwag tasks written in its binary format
MC_TINY_BITS = "001000000000100000100000000000"
MC_TINY_FINAL = ["Final result: 10.0000 +/- 5.5709", "Random chance: 25.0000 +/- 8.0408"]

WINOGRANDE_CSV = """index,sentence,option1,option2,answer
0,The trophy doesn't fit into the brown suitcase because the _ is too large.,trophy,suitcase,1
1,The trophy doesn't fit into the brown suitcase because the _ is too small.,trophy,suitcase,2
2,"Sarah was a much better surgeon than Maria, so _ always got the easier cases.",Sarah,Maria,2
3,"Sarah was a much better surgeon than Maria, so _ always got the harder cases.",Sarah,Maria,1
4,The city councilmen refused the demonstrators a permit because the _ feared violence.,councilmen,demonstrators,1
5,The city councilmen refused the demonstrators a permit because the _ advocated violence.,councilmen,demonstrators,2
6,Joan made sure to thank Susan for all the help _ had received.,Joan,Susan,1
7,Joan made sure to thank Susan for all the help _ had given.,Joan,Susan,2
8,The man couldn't lift his son because the _ was so weak.,man,son,1
9,The man couldn't lift his son because the _ was so heavy.,man,son,2
10,This program is free software; you can redistribute it under the terms of the _ License as published by the Free Software Foundation.,GNU General Public,Apache,1
11,The software is provided as is without warranty of any kind from the _.,authors,copyright holders,2
12,The work is distributed under the _.,GPL,MIT license,1
13,This sentence has no blank at all.,a,b,1
14,You may convey verbatim copies of the Program's source code as you receive it under the _ of this License.,terms,colour,1
"""
# llama-perplexity --winogrande on that file with llama-tiny-f32: (score 1, score 2, result, answer)
WG_TINY = [(-5.993680, -5.858746, 2, 1), (-6.141762, -6.020912, 2, 2), (-5.830687, -5.733347, 2, 2),
           (-5.974786, -5.889065, 2, 1), (-7.141643, -6.984509, 2, 1), (-7.533486, -7.443221, 2, 2),
           (-5.677687, -5.576093, 2, 1), (-7.289396, -7.279125, 2, 2), (-6.907485, -6.540196, 2, 1),
           (-7.583285, -7.218978, 2, 2), (-5.659911, -5.745579, 1, 1), (-2.544395, -2.620953, 1, 2),
           (-4.487390, -2.542530, 2, 1)]
# llama-perplexity -c 128 --chunks 100 --kl-divergence-base on llama-tiny-f32 (the file's first
# 20 + 4 * 12800 bytes: header and tokens), then --kl-divergence with llama-tiny-Q4_K_M
KLD_FILE_HEAD_SHA256 = "b2fe4a171623bd58647c385fe99ba55bf4924d2a12edae46f3a017fce83bcd35"
KLD_FILE_SIZE = 25906420
KLD_Q4KM = {"ppl": 612.179791, "ppl_base": 614.407353, "kld": 0.003415, "same_top": 0.95111, "rms_p_diff": 0.00102}
# llama-perplexity --hellaswag --hellaswag-tasks 400 on SmolLM2-135M-Instruct Q4_1: per-task verdicts
# (its last line: "400\t38.50000000%\t[33.8623%, 43.3565%]")
HS_SMOLLM2_BITS = (
    "0011001000000000011011011000001110010100000100110101000011000010000000110000000101010000000010110000"
    "1000010100110011100010100110001000000101000000001110001000001000111110101110111010110101101000011010"
    "0110011001101001010100101000110000100010010000000101111000000000101011110101001011100011101010010100"
    "0000101000111111010110001111010101000000010000001010101100100000111100000101100100110000010110010011")


@pytest.fixture(scope="module")
def hs_tasks(shared):
    return tasks.load_hellaswag(tasks.read_prompt_file(shared / "data" / "hellaswag_val_full.txt.bz2").decode("utf-8"))


@pytest.fixture(scope="module")
def tiny(gguf_dir):
    f = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    return load_model(f), Tokenizer.from_gguf(f)


def _hf_scores(hf, tok, chosen) -> list[list[float]]:
    """Each ending's mean log-prob after the shared prefix, every sequence run whole by transformers."""
    out = []
    for t in chosen:
        seqs = [tok.encode(t.context + " " + e) for e in t.endings]
        cp = tasks.common_prefix(seqs)
        ref = []
        for s in seqs:
            with torch.inference_mode():
                lp = torch.log_softmax(hf(torch.tensor([s])).logits[0].double(), -1)
            ref.append(float(lp[cp - 1:len(s) - 1].gather(-1, torch.tensor(s[cp:])[:, None]).mean()))
        out.append(ref)
    return out


def _bits(r: tasks.ChoiceResult) -> str:
    return "".join("1" if c else "0" for c in r.correct)


# -- task choice ---------------------------------------------------------------------------------
def test_mt19937_matches_cpp():
    r = tasks.MT19937()
    for _ in range(9999):
        r()
    assert r() == 4123659995  # the C++ standard's required 10000th output of a default mt19937
    r = tasks.MT19937(1)
    assert [r() for _ in range(5)] == [1791095845, 4282876139, 3093770124, 4005303368, 491263]


def test_task_choice_matches_libstdcxx(hs_tasks):
    assert len(hs_tasks) == 10042
    draws = [4187, 10012, 7232, 9361, 1, 1285, 3034, 10025, 1472, 2368, 926, 3978]  # uniform_int_distribution<size_t>
    r, n = tasks.MT19937(1), 10042
    got = []
    for _ in draws:
        got.append(r.uniform_int(n))
        n -= 1
    assert got == draws
    left = list(range(10042))
    expected = [hs_tasks[left.pop(d)] for d in draws]
    assert tasks.select_hellaswag(hs_tasks, 12) == expected
    assert tasks.select_hellaswag(hs_tasks, 20000) == hs_tasks
    assert tasks.pick_swap_remove(1267, 12) == [528, 1262, 911, 1178, 0, 161, 381, 1258, 184, 296, 116, 498]


# -- HellaSwag ------------------------------------------------------------------------------------
def test_hellaswag_matches_llama_cpp(tiny, hs_tasks):
    model, tok = tiny
    lines: list[str] = []
    r = tasks.hellaswag(tasks.make_task_context(model), tok, tasks.select_hellaswag(hs_tasks, 100), emit=lines.append)
    assert _bits(r) == HS_TINY_BITS[:100]
    assert lines[0] == "\ntask\tacc_norm\t95% confidence interval" and lines[100] == HS_TINY_LINE_100


def test_hellaswag_matches_transformers(tiny, hs_tasks, shared):
    """transformers' Llama scoring the same token ids the same way gives the same ending scores."""
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    chosen = tasks.select_hellaswag(hs_tasks, 6)
    r = tasks.hellaswag(tasks.make_task_context(model), tok, chosen)
    hf = transformers.LlamaForCausalLM.from_pretrained(shared / "models" / "llama-tiny-hf", torch_dtype=torch.float32).eval()
    for scores, ref in zip(r.scores, _hf_scores(hf, tok, chosen)):
        assert scores == pytest.approx(ref, abs=2e-5)


def test_packing_does_not_change_scores(tiny, hs_tasks):
    """Tasks packed many per decode score exactly as one task per context (batch invariance)."""
    model, tok = tiny
    chosen = tasks.select_hellaswag(hs_tasks, 12)
    packed = tasks.hellaswag(tasks.make_task_context(model), tok, chosen)
    single = tasks.hellaswag(tasks.make_task_context(model, max_seqs=4), tok, chosen)
    assert packed.scores == single.scores


def test_hellaswag_mamba_matches_transformers(gguf_dir, shared, hs_tasks):
    """The shared context's recurrent state copied to four sequences gives transformers' Mamba scores
    (llama.cpp itself refuses this batch for Mamba: 'sequential split is not supported')."""
    transformers = pytest.importorskip("transformers")
    f = GGUFFile(gguf_dir / "mamba-tiny-f32.gguf")
    model, tok = load_model(f), Tokenizer.from_gguf(f)
    chosen = tasks.select_hellaswag(hs_tasks, 8)
    r = tasks.hellaswag(tasks.make_task_context(model), tok, chosen)
    single = tasks.hellaswag(tasks.make_task_context(model, max_seqs=4), tok, chosen)
    assert r.scores == single.scores
    hf = transformers.MambaForCausalLM.from_pretrained(shared / "models" / "mamba-tiny-hf", torch_dtype=torch.float32).eval()
    for scores, ref in zip(r.scores, _hf_scores(hf, tok, chosen)):
        assert scores == pytest.approx(ref, abs=5e-5)


def _smollm2_hellaswag(smollm2, hs_tasks, n: int) -> tuple[tasks.ChoiceResult, list[str]]:
    f = GGUFFile(smollm2)
    lines: list[str] = []
    ctx = tasks.make_task_context(load_model(f))
    return tasks.hellaswag(ctx, Tokenizer.from_gguf(f), tasks.select_hellaswag(hs_tasks, n), emit=lines.append), lines


def test_hellaswag_smollm2_first_tasks_match_llama_cpp(smollm2, hs_tasks):
    r, _ = _smollm2_hellaswag(smollm2, hs_tasks, 12)
    assert _bits(r) == HS_SMOLLM2_BITS[:12]


def test_hellaswag_smollm2_task_295_is_transformers(smollm2, hs_tasks):
    """The one task of the 400 where llama.cpp's verdict differs: our ending scores are transformers'
    (the same GGUF dequantized to f32); llama.cpp's Q8_1-quantized activations move them by ~0.02,
    enough to flip a 0.036 gap between endings 1 and 2."""
    transformers = pytest.importorskip("transformers")
    f = GGUFFile(smollm2)
    tok = Tokenizer.from_gguf(f)
    task = tasks.select_hellaswag(hs_tasks, 295)[294]
    r = tasks.hellaswag(tasks.make_task_context(load_model(f)), tok, [task])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32).eval()
    assert r.scores[0] == pytest.approx(_hf_scores(hf, tok, [task])[0], abs=1e-4)
    assert r.correct == [True] and HS_SMOLLM2_BITS[294] == "0"


@pytest.mark.slow
def test_hellaswag_smollm2_400_matches_llama_cpp(smollm2, hs_tasks):
    """399 of 400 verdicts equal llama.cpp's; the other is task 295 (see above): 155 vs 154 correct."""
    r, lines = _smollm2_hellaswag(smollm2, hs_tasks, 400)
    ours = _bits(r)
    assert [i + 1 for i in range(400) if ours[i] != HS_SMOLLM2_BITS[i]] == [295]
    assert r.n_correct == HS_SMOLLM2_BITS.count("1") + 1 == 155
    assert lines[400] == "400\t38.75000000%\t[34.1043%, 43.6097%]"


# -- WinoGrande and multiple choice ------------------------------------------------------------------
def test_winogrande_matches_llama_cpp(tiny):
    model, tok = tiny
    warnings: list[str] = []
    text = WINOGRANDE_CSV[:-1]  # -f drops the final newline, so llama.cpp never reads the last line
    data = tasks.load_winogrande(text, warn=warnings.append)
    assert len(data) == 13 and len(warnings) == 2 and "no _" in warnings[1]
    assert data[2].first == "Sarah was a much better surgeon than Maria, so " and data[2].choices == ("Sarah", "Maria")
    lines: list[str] = []
    r = tasks.winogrande(tasks.make_task_context(model), tok, data, emit=lines.append)
    for (s1, s2, res, ans), scores, line in zip(WG_TINY, r.scores, lines):
        assert scores == pytest.approx([s1, s2], abs=5e-4)
        assert line.split()[-2:] == [str(res), str(ans)]
    assert r.n_correct == sum(res == ans for _, _, res, ans in WG_TINY)


def test_multiple_choice_matches_llama_cpp(tiny, hs_tasks, tmp_path):
    model, tok = tiny
    mc = [tasks.MCTask(t.context, t.endings, [int(i == t.gold) for i in range(4)]) for t in hs_tasks[:30]]
    path = tmp_path / "hs30.mc"
    tasks.write_multiple_choice(path, mc)
    assert tasks.load_multiple_choice(tasks.read_prompt_file(path)) == mc
    lines: list[str] = []
    r = tasks.multiple_choice(tasks.make_task_context(model), tok, mc, emit=lines.append)
    assert _bits(r) == MC_TINY_BITS and lines[-2:] == MC_TINY_FINAL
    hs = tasks.hellaswag(tasks.make_task_context(model), tok, hs_tasks[:30])
    assert hs.scores == r.scores  # the same scoring rule
    sub = tasks.load_multiple_choice(tasks.read_prompt_file(path), 5)
    assert sub == [mc[i] for i in tasks.pick_swap_remove(30, 5)]


# -- KL-divergence ----------------------------------------------------------------------------------
def test_kl_divergence_matches_llama_cpp(gguf_dir, wikitext, tmp_path):
    f32 = GGUFFile(gguf_dir / "llama-tiny-f32.gguf")
    tok = Tokenizer.from_gguf(f32)
    ids = torch.tensor(tok.encode(wikitext.read_bytes()[:200_000].decode("utf-8")))
    path = tmp_path / "base.kld"
    w = tasks.LogitsWriter(path, 128, tok.n_vocab, 100, ids)
    perplexity(load_model(f32), ids, 128, n_chunks=100, bos=tok.bos_id, on_logits=w)
    w.close()
    raw = path.read_bytes()
    assert len(raw) == KLD_FILE_SIZE
    assert hashlib.sha256(raw[:20 + 4 * 128 * 100]).hexdigest() == KLD_FILE_HEAD_SHA256
    base = tasks.LogitsFile.read(path)
    lines: list[str] = []
    s = tasks.kl_divergence(load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf"), base, bos=tok.bos_id, emit=lines.append).summary()
    assert s["ppl_base"] == pytest.approx(KLD_Q4KM["ppl_base"], rel=1e-5)
    assert s["ppl"] == pytest.approx(KLD_Q4KM["ppl"], rel=5e-4)
    assert s["kld"] == pytest.approx(KLD_Q4KM["kld"], rel=0.15)  # llama.cpp also quantizes activations
    assert s["same_top"] == pytest.approx(KLD_Q4KM["same_top"], abs=0.01)
    assert s["rms_p_diff"] == pytest.approx(KLD_Q4KM["rms_p_diff"], rel=0.1)
    assert lines[1].startswith("chunk             PPL") and lines[-1].startswith("Same top p:")
    assert len([x for x in lines if x[:4].strip().isdigit()]) == 100
    # --ggml-numerics (Q8_K activations for the K-quant weights, f16 KV, ggml's RMS norm and RoPE
    # angles): llama.cpp's own figures, 17x closer in KLD (0.003432 against 0.003415)
    with use(Numerics(ggml=True)):
        g = tasks.kl_divergence(load_model(gguf_dir / "llama-tiny-Q4_K_M.gguf"), base, bos=tok.bos_id).summary()
    assert g["kld"] == pytest.approx(KLD_Q4KM["kld"], rel=0.02)
    assert abs(g["kld"] - KLD_Q4KM["kld"]) < abs(s["kld"] - KLD_Q4KM["kld"]) / 5
    assert g["ppl"] == pytest.approx(KLD_Q4KM["ppl"], rel=1e-4)
    assert g["same_top"] == pytest.approx(KLD_Q4KM["same_top"], abs=0.002)


def test_quantized_log_probs_decode():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1001, generator=g) * 4
    q = tasks.quantize_log_probs(logits)
    assert q.shape == (5, 2 * 501 + 4)
    head = q[:, :4].copy().view("<f4")
    decoded = torch.from_numpy(head[:, :1] * q[:, 4:1005].astype("f4") + head[:, 1:2])
    ref = torch.log_softmax(logits.double(), -1).float()
    keep = logits > logits.amax(-1, keepdim=True) - 16
    assert (decoded - ref)[keep].abs().max() <= float(head[:, 0].max()) / 2 + 1e-5


# -- errors -----------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(tasks.TaskError, match="multiple of 6"):
        tasks.load_hellaswag("a\n0\nb\nc\nd")
    with pytest.raises(tasks.TaskError, match="not an integer"):
        tasks.load_hellaswag("a\nx\nb\nc\nd\ne")
    with pytest.raises(tasks.TaskError, match="truncated"):
        tasks.load_multiple_choice(b"\x02\x00\x00\x00\x0c\x00\x00\x00")
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"not a logits file at all")
    with pytest.raises(tasks.TaskError, match="does not look like"):
        tasks.LogitsFile.read(bad)
    short = tmp_path / "short.kld"
    short.write_bytes(b"_logits_" + (128).to_bytes(4, "little") + (2048).to_bytes(4, "little") + (3).to_bytes(4, "little"))
    with pytest.raises(tasks.TaskError, match="truncated"):
        tasks.LogitsFile.read(short)
    with pytest.raises(tasks.TaskError, match="does not fit"):
        tasks.hellaswag(tasks.make_task_context(model, n_ctx=8, n_parallel=1), tok,
                        [tasks.HellaSwagTask("a long context " * 20, 0, ["x", "y", "z", "w"])])


def test_cli_kl_divergence_roundtrip(gguf_dir, wikitext, tmp_path):
    text = tmp_path / "w.txt"
    text.write_bytes(wikitext.read_bytes()[:40_000])
    base = tmp_path / "b.kld"
    run = lambda *a: subprocess.run([sys.executable, "-m", "gguf_runtime.cli.main", "perplexity", "--no-progress", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    p = run("-m", str(gguf_dir / "llama-tiny-f32.gguf"), "-f", str(text), "-c", "128", "--chunks", "3",
            "--kl-divergence-base", str(base))
    assert p.returncode == 0, p.stderr
    assert base.exists() and not list(tmp_path.glob("*.part"))
    p = run("-m", str(gguf_dir / "llama-tiny-f32.gguf"), "--kl-divergence-base", str(base), "--kl-divergence")
    assert p.returncode == 0, p.stderr
    kld = float(re.search(r"Mean    KLD: +(-?[\d.]+)", p.stdout).group(1))
    assert abs(kld) < 1e-5 and "Same top p: 100.000 ± 0.000 %" in p.stdout
    p = run("-m", str(gguf_dir / "mamba-tiny-f32.gguf"), "--kl-divergence-base", str(text), "--kl-divergence")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ")
