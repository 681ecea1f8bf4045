"""Tuned lens (Belrose et al. 2023, section 3) and the ``tuned-lens`` attack, on tiny random models.

One optional integration test trains briefly on the real SmolLM2 (< 60 s).
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import re
import string
import textwrap

import pytest
import torch

import probe
from probe import corpus
from probe import lens_training as lt
from probe import tuned_lens as tl
from probe.cli import main as cli_main
from probe.facts import BUILTIN_FACTS, Fact, load_facts
from probe.lens import LogitLens
from probe.readout import lens_readout

PROMPTS = ["The capital of France is", "Water is made of hydrogen and", "The Eiffel Tower is located in the city of",
           "Paris is the capital of"]
ANSWERS = ["Paris", "oxygen", "Paris", "France"]

# a little offline training text (module docstrings of the standard library)
TEXTS = [m.__doc__ for m in (json, re, argparse, collections, textwrap, string, itertools, functools) if m.__doc__]


@pytest.fixture
def deep_tiny(tiny_tokenizer):
    """``deep_tiny(n)``: a random tiny Llama (d=64) with ``n`` decoder layers (the conftest
    ``make_tiny`` fixes 2), seed 0."""
    import transformers as tf

    def make(n_layers: int):
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=128)
        return probe.wrap_model(tf.LlamaForCausalLM(cfg).eval(), tiny_tokenizer, name=f"tiny-llama-{n_layers}")

    return make


def _randomise(lens: tl.TunedLens, scale: float = 0.3, seed: int = 1) -> tl.TunedLens:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=g) * scale / lens.d_model ** 0.5)
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=g) * scale)
    return lens


def _train(model, **over):
    kw = dict(texts=TEXTS, minutes=None, steps=25, seq_len=32, batch=32, train_tokens=1024, heldout_tokens=256,
              lr=3e-3, init="identity", seed=0)
    kw.update(over)
    return lt.train_tuned_lens(model, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_identity_lens_is_the_logit_lens(make_tiny, kind):
    model = make_tiny(kind)
    lens = tl.TunedLens.from_model(model)
    resid = probe.residual_stream(model, PROMPTS, positions=[0, -1])  # [B, L, P, d]
    resid = resid.transpose(1, 2)  # [B, P, L, d]: all layers at once
    ref = LogitLens.from_model(model)(resid)
    with torch.no_grad():
        assert torch.equal(lens(resid), ref)
        for layer in range(model.n_layers):
            assert torch.equal(lens.logits(resid[..., layer, :], layer), ref[..., layer, :])
            assert torch.equal(lens.logits(resid[..., layer, :], layer - model.n_layers), ref[..., layer, :])
    # the model's parameters are not the lens's
    assert {n for n, _ in lens.named_parameters()} == {"weight", "bias"}
    assert set(lens.state_dict()) == {"weight", "bias"}


def test_identity_readout_equals_logit_lens_readout(make_tiny):
    model = make_tiny("llama")
    ours = lens_readout(model, PROMPTS, ANSWERS, lens=tl.TunedLens.from_model(model), batch_size=3)
    ref = lens_readout(model, PROMPTS, ANSWERS, batch_size=3)
    for a, b in zip(ours, ref):
        assert a.rank == b.rank
        assert a.prob == pytest.approx(b.prob, abs=0)
        assert a.answer_logprob == b.answer_logprob


def test_kl_shortcut_matches_direct_kl(make_tiny):
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    h_last, h = torch.randn(2, 5, model.d_model, generator=g) * 3
    base = LogitLens.from_model(model)
    for softcap in (None, 5.0):
        unembed = lt._frozen(LogitLens(base.norm, base.weight, base.bias, softcap))
        direct = torch.nn.functional.kl_div(torch.log_softmax(unembed(h), -1), torch.log_softmax(unembed(h_last), -1),
                                            log_target=True, reduction="none").sum(-1)
        ours = lt._Target(unembed, h_last).kl(h)
        assert torch.allclose(ours, direct, atol=1e-5, rtol=1e-5)
    assert not base.weight.detach().equal(torch.zeros(()))  # sanity
    assert lt._frozen(base).weight.requires_grad is False


def test_training_lowers_kl_at_every_layer(make_tiny, deep_tiny):
    model = deep_tiny(4)
    grads_before = [p.grad for p in model.hf.parameters()]
    lens, rep = _train(model)
    L = model.n_layers
    assert len(rep.kl_logit) == len(rep.kl_tuned) == L
    for layer in range(L - 1):
        assert rep.kl_tuned[layer] < rep.kl_logit[layer], (layer, rep.table())
    assert rep.kl_logit[-1] == pytest.approx(0, abs=1e-5) and rep.kl_tuned[-1] == pytest.approx(0, abs=1e-5)
    assert rep.steps == 25 and rep.init == ["identity"] * L
    # the last translator stays the identity; training never touches the model
    assert torch.count_nonzero(lens.weight[-1]) == 0 and torch.count_nonzero(lens.bias[-1]) == 0
    assert [p.grad for p in model.hf.parameters()] == grads_before
    # the report's numbers are what layer_kl measures (identity = logit lens)
    assert "tuned-lens KL" in rep.table() and json.loads(json.dumps(rep.to_json()))["kl_tuned"] == rep.kl_tuned


def test_least_squares_warm_start_lowers_kl(make_tiny, deep_tiny):
    model = deep_tiny(3)
    _, rep = _train(model, steps=0, init="auto")
    assert rep.steps == 0
    assert set(rep.init[:-1]) <= {"lstsq", "identity"} and rep.init[-1] == "identity"
    for layer in range(model.n_layers - 1):
        assert rep.kl_tuned[layer] <= rep.kl_logit[layer] + 1e-6


def test_training_needs_a_budget_and_text(make_tiny):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="minutes or steps"):
        lt.train_tuned_lens(model, texts=TEXTS, minutes=None, steps=None)
    with pytest.raises(ValueError, match="too little text"):
        lt.train_tuned_lens(model, texts=["tiny"], steps=1, minutes=None, seq_len=32)


def test_save_load_roundtrip(make_tiny, deep_tiny, tmp_path):
    model = deep_tiny(3)
    lens, rep = _train(model, steps=3)
    _randomise(lens)  # make sure non-trivial weights round-trip
    path = lens.save(tmp_path / "sub" / "lens.pt")
    assert [p.name for p in path.parent.iterdir()] == ["lens.pt"]  # no temporary file left
    back = tl.TunedLens.load(path, model)
    resid = probe.residual_stream(model, PROMPTS)  # [B, L, d]
    with torch.no_grad():
        assert torch.equal(back(resid), lens(resid))
    assert back.fingerprint == model.fingerprint and back.report.kl_tuned == rep.kl_tuned


def test_load_for_another_model_raises(make_tiny, deep_tiny, tmp_path):
    model = make_tiny("llama")
    path = tl.TunedLens.from_model(model).save(tmp_path / "lens.pt")
    other = make_tiny("llama")  # same architecture, different fingerprint
    assert other.fingerprint != model.fingerprint
    with pytest.raises(tl.TunedLensMismatchError) as err:
        tl.TunedLens.load(path, other)
    assert model.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    assert isinstance(err.value, ValueError)
    deeper = deep_tiny(3)
    deeper.fingerprint = model.fingerprint  # same fingerprint, wrong shape
    with pytest.raises(tl.TunedLensMismatchError, match="n_layers 2 != 3"):
        tl.TunedLens.load(path, deeper)
    (tmp_path / "junk.pt").write_bytes(b"not a lens")
    with pytest.raises(tl.TunedLensMismatchError, match="not a probe-attack tuned-lens file"):
        tl.TunedLens.load(tmp_path / "junk.pt", model)


def test_get_tuned_lens_trains_once_then_loads(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "_LOADED", {})
    model = make_tiny("llama")
    calls = []
    real = lt.train_tuned_lens

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lt, "train_tuned_lens", counting)
    kw = dict(texts=TEXTS, minutes=None, steps=2, seq_len=32, train_tokens=256, heldout_tokens=64)
    lens = lt.get_tuned_lens(model, **kw)
    path = tmp_path / "tuned-lens" / f"{model.fingerprint}.pt"
    assert path.is_file() and calls == [1]
    assert lt.get_tuned_lens(model, **kw) is lens  # in memory
    monkeypatch.setattr(lt, "_LOADED", {})
    again = lt.get_tuned_lens(model, **kw)  # from disk
    assert calls == [1] and again is not lens
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias)
    with pytest.raises(FileNotFoundError, match="probe-attack tuned-lens"):
        lt.get_tuned_lens(make_tiny("llama"), train_if_missing=False)


def _facts():
    return [Fact(id=str(i), prompt=p, answer=a) for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))]


def test_attack_success_matches_brute_force(make_tiny, deep_tiny):
    from attacks.base import ATTACKS, AttackContext
    from attacks.tuned_lens import TunedLensAttack
    from probe.layers import spread_layers

    assert ATTACKS["tuned-lens"] is TunedLensAttack and TunedLensAttack.kind == "whitebox"
    model = deep_tiny(7)
    lens = _randomise(tl.TunedLens.from_model(model), scale=1.0)
    attack = TunedLensAttack()
    layers = attack.resolve_layers(model.n_layers)
    assert layers == spread_layers(7, 5, span_frac=0.5) and len(layers) == 5 and layers[-1] == 6
    assert attack.budget(model.n_layers) == 20
    ctx = AttackContext(cache={"tuned-lens": lens}, batch_size=3)
    outcomes = attack.run(model, _facts(), ctx)
    # brute force: one unbatched trace per fact, top-k sets per layer, union
    for fact, out in zip(_facts(), outcomes):
        resid = probe.residual_stream(model, fact.prompt)[0]  # [L, d]
        first = probe.answer_ids(model.tokenizer, fact.prompt, fact.answer)[0]
        with torch.no_grad():
            per_layer = [lens.logits(resid[layer], layer) for layer in range(model.n_layers)]
        ranks = [int((lg > lg[first]).sum()) + 1 for lg in per_layer]
        assert out.layer_ranks == ranks
        for k in (1, 2, 4, 10):
            union = set()
            for layer in layers:
                union |= set(per_layer[layer].topk(k).indices.tolist())
            assert (out.best_rank <= k) == (first in union), (k, out.best_rank)
        assert out.success == (first in set().union(*[set(per_layer[layer].topk(4).indices.tolist())
                                                       for layer in layers]))
        assert out.budget == 20 and out.best_rank == min(ranks[layer] for layer in layers)


def test_attack_layers_and_defaults():
    from attacks.tuned_lens import TunedLensAttack
    from probe.layers import spread_layers

    assert spread_layers(30, 5, span_frac=0.5) == [15, 18, 22, 26, 29]
    assert spread_layers(2, 5, span_frac=0.5) == [0, 1]
    assert TunedLensAttack().budget(30) == 20 and TunedLensAttack().budget(2) == 8
    assert TunedLensAttack(layers=[-1, 3, 3]).resolve_layers(30) == [3, 29]
    with pytest.raises(ValueError, match="out of range"):
        TunedLensAttack(layers=[30]).resolve_layers(30)


def test_attack_loads_cached_lens_by_fingerprint(make_tiny, tmp_path, monkeypatch):
    """The attacker on an edited clone uses the lens of the unedited model (same fingerprint)."""
    import attacks.tuned_lens as atl
    from attacks.base import AttackContext
    from probe.model import clone_model

    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "_LOADED", {})
    monkeypatch.setattr(atl, "_LENSES", {})
    model = make_tiny("llama")
    lens = _randomise(tl.TunedLens.from_model(model))
    lens.save(lt.lens_path(model))
    clone = clone_model(model, ["model.norm.weight"])
    with torch.no_grad():
        clone.hf.model.norm.weight.mul_(2.0)  # the edit
    attack = atl.TunedLensAttack(train_if_missing=False)
    pre = attack.run(model, _facts(), AttackContext())
    post = attack.run(clone, _facts(), AttackContext())
    assert set(atl._LENSES) == {model.fingerprint}
    assert len(pre) == len(post) == len(PROMPTS)
    # post-edit ranks decode the clone's residuals with the same translators and the clone's own norm
    used = atl._LENSES[model.fingerprint]
    assert torch.equal(used.weight, lens.weight)
    ref = lens_readout(clone, PROMPTS, ANSWERS, lens=tl.TunedLens.load(lt.lens_path(model), clone))
    assert [o.layer_ranks for o in post] == [r.rank for r in ref]


def test_cli_prints_the_table(make_tiny, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lt, "_LOADED", {})
    excluded = []
    monkeypatch.setattr(corpus, "default_texts", lambda exclude=(): excluded.append(list(exclude)) or list(TEXTS))
    monkeypatch.setattr(corpus, "default_text_source", lambda exclude=(): "test texts")
    model = make_tiny("llama")
    model.hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(lt, "train_tuned_lens", functools.partial(
        lt.train_tuned_lens, seq_len=32, train_tokens=256, heldout_tokens=64))
    out = tmp_path / "report.json"
    assert cli_main(["tuned-lens", "--model", str(tmp_path / "m"), "--steps", "2", "--out", str(out), "--quiet",
                     "--exclude-facts", str(BUILTIN_FACTS)]) == 0
    assert [len(e) for e in excluded] == [len(load_facts(None))]  # --exclude-facts reaches the text filter
    text = capsys.readouterr().out
    assert "logit-lens KL" in text and "tuned-lens KL" in text
    rep = json.loads(out.read_text())
    assert len(rep["kl_tuned"]) == 2 and rep["steps"] == 2 and rep["text_source"] == "test texts"
    assert cli_main(["tuned-lens", "--model", str(tmp_path / "m"), "--steps", "2", "--quiet"]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert cli_main(["tuned-lens", "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "probe-attack: error:" in capsys.readouterr().err
    assert cli_main(["tuned-lens", "--model", str(tmp_path / "m"), "--minutes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "probe-attack: error: --minutes must be > 0"


def test_smollm2_short_training_beats_logit_lens(smollm2):
    """20-odd seconds of training on a little text already beats the logit lens at every layer."""
    lens, rep = lt.train_tuned_lens(smollm2, texts=TEXTS, minutes=None, steps=1, seq_len=64, batch=16,
                                    train_tokens=1024, heldout_tokens=128, init="auto")
    for layer in range(smollm2.n_layers - 1):
        assert rep.kl_tuned[layer] < rep.kl_logit[layer], rep.table()
    assert rep.kl_logit[0] > 5 and rep.kl_tuned[0] < rep.kl_logit[0] / 2


def test_training_text_filter(counterfact_path):
    hit = corpus.phrase_filter(["Paris", "Rio de Janeiro", "Danielle Darrieux"])
    assert hit("The city of Paris.") and hit("from Rio de Janeiro,") and hit("Danielle Darrieux was")
    assert not hit("Parisian cafes") and not hit("Rio is nice") and not hit("paris")
    excluded = corpus.excluded_phrases(load_facts(counterfact_path))
    assert {"Paris", "Danielle Darrieux", "French"} <= excluded  # built-in + CounterFact answers and subjects
    assert corpus.excluded_phrases() < excluded  # the library reads no CounterFact of its own
    assert "Zanzibar" in corpus.excluded_phrases(["Zanzibar"]) - corpus.excluded_phrases()


def test_tuned_lens_is_a_subcommand_of_the_one_parser(capsys):
    from probe.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tuned-lens", "--help"])
    assert exc.value.code == 0 and "--exclude-facts FILE" in capsys.readouterr().out
    args = build_parser().parse_args(["tuned-lens"])
    assert (args.model, args.minutes, args.steps, args.out, args.retrain, args.seed, args.device, args.quiet,
            args.exclude_facts) == (None, 8.0, None, None, False, 0, "cpu", False, None)


def test_both_lenses_implement_the_lens_interface(make_tiny):
    model = make_tiny("llama")
    resid = probe.residual_stream(model, PROMPTS[:2])  # [B, L, d]
    logit, tuned = LogitLens.from_model(model), tl.TunedLens.from_model(model)
    assert isinstance(logit, probe.Lens) and isinstance(tuned, probe.Lens)
    ref = probe.logit_lens(model, resid)
    assert torch.equal(logit.log_probs(resid), ref) and torch.equal(logit.logits(resid[:, 1], 1), logit(resid[:, 1]))
    assert torch.equal(tuned.log_probs(resid), ref)  # identity translators: the logit lens exactly
    assert torch.equal(tuned.log_probs(resid[:, 1], 1), logit.log_probs(resid[:, 1]))
