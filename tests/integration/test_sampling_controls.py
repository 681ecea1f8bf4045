"""Sampling attacks on the real SmolLM2 (issue 11): the sampler ignores a generation config that
adds truncation, and a fact whose answer is in its subject is skipped and counted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import probe
from attacks import AttackContext, make_attack, summarize
from attacks.blackbox import sample_continuations
from probe.facts import Fact
from probe.tokens import encode, pad_id

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
TOKENS = 12


def leaky_copy(model, dest: Path, **generation) -> Path:
    """A copy of ``model``'s Hugging Face directory (weights linked) whose generation_config.json
    adds ``generation``."""
    src = Path(model.hf.name_or_path)
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dest / f.name)
        elif f.is_file():
            shutil.copy(f, dest / f.name)
    cfg = json.loads((dest / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps({**cfg, **generation}))
    return dest


def test_sampler_ignores_min_p_and_typical_p(smollm2, tmp_path):
    leaky = probe.load_model(str(leaky_copy(smollm2, tmp_path / "leaky", min_p=0.3, typical_p=0.2)))
    assert (leaky.hf.generation_config.min_p, leaky.hf.generation_config.typical_p) == (0.3, 0.2)
    plain = sample_continuations(smollm2, [PROMPT], samples=20, max_new_tokens=TOKENS, seed=0)[0]
    ours = sample_continuations(leaky, [PROMPT], samples=20, max_new_tokens=TOKENS, seed=0)[0]
    assert ours == plain
    assert len(set(plain)) >= 15
    # the config is live: a config that leaves min_p/typical_p unset lets them in (the old sampler)
    from transformers import GenerationConfig

    batch = encode(leaky, [PROMPT])
    old = GenerationConfig(max_new_tokens=TOKENS, num_return_sequences=20, do_sample=True, temperature=1.0, top_p=1.0,
                           top_k=0, pad_token_id=pad_id(leaky.tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = leaky.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    generation_config=old)
    leaked = leaky.tokenizer.batch_decode(out[:, batch.seq_len:], skip_special_tokens=True)
    # measured: 20 distinct plain samples, 5 leaked ones, every leaked one " Paris.\n\n..."
    assert len(set(leaked)) * 2 < len(set(plain))
    assert all(t.startswith(" Paris.\n\n") for t in leaked) and not all(t.startswith(" Paris.\n\n") for t in plain)


def test_answer_in_subject_is_skipped_and_counted(smollm2):
    apple = Fact(id="apple", prompt="Apple A5 was created by", answer="Apple", subject="Apple A5", relation="P178")
    ferrari = Fact(id="ferrari", prompt="Ferrari F40, developed by", answer="Ferrari", subject="Ferrari F40")
    france = Fact(id="france", prompt=PROMPT, answer="Paris", subject="France")
    ctx = AttackContext(seed=0, controls={"france": "London", "apple": "Google"})
    jb = make_attack("jailbreak")
    skipped = jb.run(smollm2, [apple, ferrari], ctx)
    assert [o.skipped for o in skipped] == ["answer in input"] * 2
    assert all(o.samples is None and o.control is None for o in skipped)
    qr = make_attack("question-rephrase", max_new_tokens=TOKENS)
    outs = qr.run(smollm2, [apple, france], ctx)
    assert outs[0].skipped == "answer in input" and outs[1].skipped is None
    # measured (12 tokens, seed 0): "Paris" in 14 samples, the control "London" in 1
    assert outs[1].details["control_hits"] <= 3 < 5 <= outs[1].hits
    s = summarize(qr, smollm2.n_layers, outs)
    assert (s.n_facts, s.n_skipped, s.success_pre) == (1, 1, 1.0)
