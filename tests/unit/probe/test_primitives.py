"""Shared primitives: layer rules (probe.layers), per-fact seeds (probe.seeds), the MLP-out weight
(probe.arch), generation (probe.generate)."""

from __future__ import annotations

import random

import pytest

from probe.layers import last_layers, layer_at_depth, resolve_layer, resolve_layers, spread_layers
from probe.seeds import ERROR_TARGET, RANDOM_ACC, RETAIN, fact_rng, fact_seed


def test_resolve_layers():
    assert resolve_layers([-1, 0, 3, 3], 10) == [0, 3, 9]
    assert resolve_layers(None, 3) == [0, 1, 2] and resolve_layers(-2, 3) == [1]
    assert resolve_layer(-1, 4) == 3
    with pytest.raises(ValueError, match="defense layer 5 out of range for 2 layers"):
        resolve_layers([5], 2, "defense layer")
    with pytest.raises(IndexError, match="layer -3 out of range for 2 layers"):
        resolve_layers([-3], 2, error=IndexError)


def test_spread_layers_rules():
    # the attacks' rule (span from the end) and the probes' rule (start fraction) differ
    assert spread_layers(30, 5, span_frac=0.25) == [22, 24, 26, 27, 29]
    assert spread_layers(30, 5, start_frac=1 / 3) == [10, 15, 20, 24, 29]
    assert spread_layers(30, 5, span_frac=0.5) == [15, 18, 22, 26, 29]
    assert spread_layers(4, 5, span_frac=0.5) == [0, 1, 2, 3]
    for n in range(1, 49):
        for c in range(2, 8):
            for kw in ({"span_frac": 0.25}, {"start_frac": 1 / 3}):
                ls = spread_layers(n, c, **kw)
                assert ls == sorted(set(ls)) and len(ls) == min(n, c) and ls[-1] == n - 1
    with pytest.raises(TypeError):
        spread_layers(10, 3)


def test_depth_rules():
    assert last_layers(30, 0.3) == list(range(21, 30)) and last_layers(2, 0.1) == [1]
    assert layer_at_depth(30, 0.3) == 9 and layer_at_depth(30, 0.22) == 6 and layer_at_depth(1, 0.5) == 0


def test_fact_seeds_keep_their_streams():
    # the recipes the results were produced with (unchanged by the move to probe.seeds)
    assert fact_rng(0, RETAIN, "f1").random() == random.Random("0:f1").random()
    assert fact_rng(3, RANDOM_ACC, "f1").random() == random.Random("random-acc:3:f1").random()
    assert fact_seed(0, "question-rephrase", "f1") == fact_seed(0, "question-rephrase", "f1") < 2 ** 63
    # every purpose its own stream
    draws = {p: fact_rng(0, p, "f1").random() for p in (RETAIN, RANDOM_ACC, ERROR_TARGET)}
    assert len(set(draws.values())) == 3
    assert fact_seed(0, "jailbreak", "f1") != fact_seed(0, "question-rephrase", "f1")


def test_mlp_out_weight(make_tiny):
    from probe.arch import mlp_out_module, mlp_out_weight_name

    llama, gpt2 = make_tiny("llama"), make_tiny("gpt2")
    assert mlp_out_weight_name(llama, 1) == "model.layers.1.mlp.down_proj.weight"
    assert mlp_out_weight_name(gpt2, 0) == "transformer.h.0.mlp.c_proj.weight"
    assert mlp_out_module(llama, 1) is llama.hf.model.layers[1].mlp.down_proj


def test_generate_batching_and_seeds(make_tiny):
    from probe.generate import Decoding, generate, greedy_texts

    m = make_tiny("gpt2")
    ps = ["The capital of France is", "Paris is the capital of", "The Eiffel Tower is in"]
    a = generate(m, ps, Decoding(max_new_tokens=4, samples=2, do_sample=True, seed=3))
    assert a == generate(m, ps, Decoding(max_new_tokens=4, samples=2, do_sample=True, seed=3))
    assert len(a) == 3 and all(len(r) == 2 for r in a)
    g = greedy_texts(m, ps, max_new_tokens=4, batch_size=2)
    assert g == [greedy_texts(m, [p], max_new_tokens=4)[0] for p in ps]
    with pytest.raises(ValueError):
        generate(m, ps, Decoding(samples=0))


def test_lens_readout_without_teacher_forcing_reads_the_same_lens(make_tiny):
    """``teacher_force=False`` (the lens-sweep benchmark's same-work mode) runs only the prompt: the
    per-layer readout and the attack scores are those of the teacher-forced sweep (the last prompt
    token does not see the answer), and the model's log-probs cover the first answer token alone."""
    from attacks import attack_readout, make_attack

    model = make_tiny("llama")
    prompts = ["The capital of France is", "Water is made of hydrogen and"]
    answers = ["Paris and more", "oxygen gas"]
    attacks = [make_attack(n, layers=[0, 1]) for n in ("head-projection", "probability-delta")]
    tf = attack_readout(model, prompts, answers, attacks)
    plain = attack_readout(model, prompts, answers, attacks, teacher_force=False)
    for a, b in zip(tf, plain):
        assert len(a.token_logprobs) > 1 and len(b.token_logprobs) == 1
        assert b.rank == a.rank and b.attack_ranks == a.attack_ranks and b.top_token == a.top_token
        assert b.token_logprobs[0] == pytest.approx(a.token_logprobs[0], abs=1e-5)
        assert b.prob == pytest.approx(a.prob, rel=1e-5)
