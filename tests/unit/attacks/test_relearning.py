"""The relearning attack (attacks/relearning.py): LoRA (peft) on every layer's MLP, uncontaminated
data, scoring of the answer, the control and the never-known facts on the relearned weights."""

from __future__ import annotations

import random

import pytest
import torch

import attacks.lens as lens_mod
import attacks.relearning as rl
from attacks.base import ATTACKS, AttackContext
from attacks.lens import HeadProjection
from probe.arch import mlp_linear_paths
from probe.facts import Fact


def _fact(i, prompt, answer, paraphrases=(), **kw):
    return Fact(id=f"f{i}", prompt=prompt, answer=answer, paraphrases=list(paraphrases), **kw)


FACTS = [
    _fact(0, "The capital of France is", "Paris", ["The capital city of France is"]),
    _fact(1, "The capital of Japan is", "Tokyo"),
    _fact(2, "Water is made of", "hydrogen"),
    _fact(3, "The Eiffel Tower is located in the city of", "Paris"),  # same answer
    _fact(4, "The Colosseum is in", "Rome"),                          # the control's answer
    _fact(5, "Berlin is in", "Germany"),
    _fact(6, "Madrid is in", "Spain"),
    _fact(7, "Paris is the capital of", "France"),                    # the answer in the prompt
    _fact(8, "the capital city of France is", "Lyon"),                # a paraphrase (normalised)
    _fact(9, "The Rome airport is in", "Italy"),                      # the control in the prompt
    _fact(10, "The Louvre is in", "Paris, France"),                   # the answer inside the answer
    _fact(11, "Tokyo is the capital of", "Japan"),
    _fact(12, "Rio is in", "Brazil"),
]
UNKNOWN = [_fact(20, "Ça va ? 東京は", "日本"), _fact(21, "Berlin is the capital of", "Germany"),
           _fact(22, "The Eiffel Tower is in", "Paris"), _fact(23, "Madrid is the capital of", "Spain")]
KNOWN = frozenset(f.id for f in FACTS) - {"f12"}  # f12: the unedited model does not know it
CTX = dict(facts=FACTS + UNKNOWN, deleted=frozenset({"f0", "f1"}), seed=0, controls={"f0": "Rome"},
           known=KNOWN, unknown=UNKNOWN)
CLEAN = {"Water is made of", "Berlin is in", "Madrid is in", "Tokyo is the capital of"}


def test_registered_defaults_from_method_md():
    a = rl.Relearning()
    assert ATTACKS["relearning"] is rl.Relearning and a.kind == "relearning"
    # method.md 3.1 (fae: lr 9e-6, 10 epochs) and 4.2 (LoRA r 2, alpha 6, dropout 0.05, AdamW wd 0, batch 16)
    assert (a.lr, a.epochs, a.rank, a.alpha, a.dropout, a.weight_decay, a.train_batch) == (9e-6, 10, 2, 6.0, 0.05,
                                                                                          0.0, 16)
    assert a.budget(30) == 20 and a.budget(2) == 8 and a.attack_layers(30) == [22, 24, 26, 27, 29]
    for bad in (dict(data="web"), dict(rank=0), dict(lr=0.0), dict(epochs=-1), dict(dropout=1.0), dict(n_unknown=-1)):
        with pytest.raises(ValueError):
            rl.Relearning(**bad)


@pytest.mark.parametrize("prompt,answer,reason", [
    ("The capital of France is", "Lyon", "fact prompt"),
    ("  the CAPITAL city of France is ", "Lyon", "fact prompt"),   # a paraphrase, normalised
    ("Paris is the capital of", "France", "answer in prompt"),
    ("The Louvre is in", "paris", "answer"),
    ("The Louvre is in", "Paris, France", "answer"),
    ("The Rome airport is in", "Italy", "control in prompt"),
    ("The Colosseum is in", "Rome", "control"),
    ("", "Rome", "blank"), ("Berlin is in", " ", "blank"),
    ("Berlin is in", "Germany", None),
    ("Parisians live in", "France", None),  # whole words only: "Parisians" is not "Paris"
])
def test_contamination_reasons(prompt, answer, reason):
    assert rl.contamination(FACTS[0], "Rome", prompt, answer) == reason


def test_unrelated_data_is_known_uncontaminated_and_seeded():
    ctx = AttackContext(**CTX)
    a = rl.Relearning(n_examples=50)
    d = a.relearn_data(FACTS[0], ctx, 0)
    # deleted (f0, f1), not known (f12), never-known (f20-23), contaminated (f3, f4, f7, f8, f9, f10) are out
    assert {p for p, _ in d.pairs} == CLEAN and d.pool == "known" and d.excluded == 6
    for p, ans in d.pairs:
        assert rl.contamination(FACTS[0], "Rome", p, ans) is None
    few = rl.Relearning(n_examples=2)
    picks = {tuple(few.relearn_data(FACTS[0], ctx, s).pairs) for s in range(20)}
    assert len(picks) > 1 and all(len(p) == 2 and set(x for x, _ in p) <= CLEAN for p in picks)
    assert few.relearn_data(FACTS[0], ctx, 5) == few.relearn_data(FACTS[0], ctx, 5)
    # without ctx.known: every fact of the context (still minus deleted, never-known and contaminated)
    d_all = a.relearn_data(FACTS[0], AttackContext(**{**CTX, "known": frozenset()}), 0)
    assert {p for p, _ in d_all.pairs} == CLEAN | {"Rio is in"} and d_all.pool == "all facts (ctx.known empty)"
    # without a control, the control's facts are fine
    d_nc = a.relearn_data(FACTS[0], AttackContext(**{**CTX, "controls": {}}), 0)
    assert {p for p, _ in d_nc.pairs} == CLEAN | {"The Colosseum is in", "The Rome airport is in"}


def test_neighborhood_data_filtered():
    nb = _fact(30, "The capital of Italy is", "Rome", ["Italy's capital is"], neighborhood=[
        {"prompt": "The capital of Spain is", "answer": "Madrid"},
        {"prompt": "Italy's capital is", "answer": "Milan"},      # a paraphrase of the fact
        {"prompt": "Vatican City is inside", "answer": "Rome"},   # the deleted answer
        {"prompt": "The capital of Peru is", "answer": "Lima"},   # the control
        {"prompt": "The capital of Kenya is", "answer": "Nairobi"}])
    ctx = AttackContext(**{**CTX, "controls": {"f30": "Lima"}})
    d = rl.Relearning(data="neighborhood").relearn_data(nb, ctx, 0)
    assert d.pairs == [("The capital of Spain is", "Madrid"), ("The capital of Kenya is", "Nairobi")]
    assert d.pool == "neighborhood" and d.excluded == 3
    assert rl.Relearning(data="neighborhood", n_examples=1).relearn_data(nb, ctx, 0).pairs == d.pairs[:1]


def test_fact_without_clean_data_is_skipped_not_trained(tiny_llama):
    ctx = AttackContext(**{**CTX, "deleted": frozenset(f.id for f in FACTS)})
    out = rl.Relearning().run(tiny_llama, [FACTS[0]], ctx)[0]
    assert out.skipped.startswith("no relearning data") and not out.success and out.budget == 8
    nb = rl.Relearning(data="neighborhood").run(tiny_llama, [FACTS[1]], AttackContext(**CTX))[0]
    assert "neighbourhood" in nb.skipped


@pytest.mark.parametrize("kind,modules", [
    ("llama", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),
    ("gemma3", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),
    ("gpt2", ["mlp.c_fc", "mlp.c_proj"]),
    ("gptj", ["mlp.fc_in", "mlp.fc_out"]),
    ("neox", ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h"]),
])
def test_lora_covers_every_layer_mlp_projection(make_tiny, monkeypatch, kind, modules):
    m = make_tiny(kind)
    targets = rl.Relearning.lora_targets(m)
    assert targets == [f"{m.arch.layers}.{i}.{mod}" for i in range(m.n_layers) for mod in modules]
    assert mlp_linear_paths(m, 1) == targets[len(modules):]
    seen = []
    real = lens_mod.attack_readout

    def spy(model, *a, **k):
        from peft.tuners.lora import LoraLayer

        seen.append(sorted(n for n, mod in model.hf.named_modules() if isinstance(mod, LoraLayer)))
        return real(model, *a, **k)

    monkeypatch.setattr(lens_mod, "attack_readout", spy)
    a = rl.Relearning(epochs=1, n_examples=2, n_unknown=0)
    out = a.run(m, [FACTS[0]], AttackContext(**CTX))[0]
    assert seen == [targets]  # the relearned model's readout: every target carries an adapter, nothing else
    shapes = [m.hf.get_submodule(t).weight.shape for t in targets]
    assert out.details["relearn_params"] == sum(2 * (s[0] + s[1]) for s in shapes)  # r (d_in + d_out) each
    assert out.details["relearn_modules"] == modules and out.details["relearn_layers"] == [0, 1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_caller_model_untouched_and_copy_relearned(make_tiny, monkeypatch, kind):
    m = make_tiny(kind)
    before = {k: v.detach().clone() for k, v in m.hf.state_dict().items()}
    flags = [p.requires_grad for p in m.hf.parameters()]
    modules = [n for n, _ in m.hf.named_modules()]
    lora_b = []
    real = lens_mod.attack_readout

    def spy(model, *a, **k):
        if model is not m:
            lora_b.append([p.detach().clone() for n, p in model.hf.named_parameters() if "lora_B" in n])
        return real(model, *a, **k)

    monkeypatch.setattr(lens_mod, "attack_readout", spy)
    a = rl.Relearning(lr=1e-2, epochs=5, n_examples=4, rephrase=kind == "llama")  # tiny GPT-2: 64 positions
    torch.manual_seed(123)
    rng_state = torch.random.get_rng_state()
    out = a.run(m, [FACTS[0], FACTS[5]], AttackContext(**CTX))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # seeded inside fork_rng
    after = m.hf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in m.hf.parameters()] == flags
    assert all(p.grad is None for p in m.hf.parameters()) and [n for n, _ in m.hf.named_modules()] == modules
    # the relearned copies: B started at zero and moved
    assert len(lora_b) == 2 and all(any(b.abs().sum() > 0 for b in bs) for bs in lora_b)
    for o in out:
        d = o.details
        assert d["relearn_steps"] == 5 and len(d["relearn_loss"]) == 5 and d["relearn_loss"][-1] < d["relearn_loss"][0]
        assert o.success == d["head-projection"] == (o.best_rank <= 4) and o.budget == 8
        assert isinstance(d["question-rephrase"], bool) == a.rephrase
        assert set(d["relearn_data"]).isdisjoint({FACTS[0].prompt, FACTS[1].prompt})  # f0, f1 are deleted
    assert out[0].control is not None and out[1].control is None and out[1].control_rank is None  # f5: no control
    # per-fact seeds: a fact alone gives the same numbers as in a batch
    alone = a.run(m, [FACTS[5]], AttackContext(**CTX))[0]
    assert alone.details["relearn_loss"] == out[1].details["relearn_loss"] and alone.best_rank == out[1].best_rank


def test_scores_answer_control_and_unknown_on_the_relearned_weights(tiny_llama):
    """With 0 epochs the adapter is the identity (B = 0): every score must equal Head Projection on
    the attacked model itself; the never-known facts come from ctx.unknown, minus the fact's answer."""
    m = tiny_llama
    ctx = AttackContext(**{**CTX, "controls": {"f0": "Rome", "f5": "Spain"}})
    fact = _fact(40, "The Eiffel Tower stands in", "Paris")
    ctx.controls["f40"] = "Madrid"
    out = rl.Relearning(epochs=0, n_unknown=10).run(m, [fact, FACTS[5]], ctx)
    hp = HeadProjection()
    for o, f in zip(out, [fact, FACTS[5]]):
        d = o.details
        ref = hp.run(m, [f, Fact("c", f.prompt, ctx.controls[f.id])], AttackContext())
        assert (o.best_rank, o.control_rank) == (ref[0].best_rank, ref[1].best_rank)
        assert o.control == (o.control_rank <= 4) and d["relearn_steps"] == 0 and d["relearn_loss"] == []
        by_id = {u.id: u for u in UNKNOWN}
        unknown = [by_id[i] for i in d["unknown_ids"]]  # every one from ctx.unknown
        assert len(unknown) == len(d["taught_ranks"])
        ranks = [r.best_rank for r in hp.run(m, unknown, AttackContext())]
        assert d["taught_ranks"] == d["taught_ranks_before"] == ranks
        assert o.taught == d["taught_before"] == sum(r <= 4 for r in ranks) / len(ranks)
    assert sorted(out[0].details["unknown_ids"]) == ["f20", "f21", "f23"]  # f22's answer is Paris
    assert sorted(out[1].details["unknown_ids"]) == ["f20", "f22", "f23"]  # f21's answer is Germany
    few = rl.Relearning(epochs=0, n_unknown=2)
    picks = {tuple(u.id for u in few.unknown_sample(_fact(i, "x", "y"), ctx)) for i in range(50, 70)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)
    none = rl.Relearning(epochs=0).run(m, [FACTS[5]], AttackContext(**{**CTX, "unknown": []}))[0]
    assert none.taught is None and none.details["unknown_ids"] == []


# -- real model ---------------------------------------------------------------------------------

@pytest.mark.real
def test_relearning_smollm2_unedited_france(smollm2):
    """On the unedited SmolLM2, relearning (defaults, 4 unrelated built-in facts, 2 epochs) keeps
    "Paris" at HP rank 1 while the control "Berlin" stays out of the candidate set (HP rank 28,
    as before relearning: at lr 9e-6 two steps barely move the weights); nothing never-known is
    taught."""
    from probe.facts import load_facts

    facts = load_facts()
    fact = next(f for f in facts if f.prompt == "The capital of France is")
    unknown = [_fact(90, "The capital of Burkina Faso is", "Ouagadougou"),
               _fact(91, "The inventor of the Zorbulator was", "Smith")]
    ctx = AttackContext(facts=facts, deleted=frozenset({fact.id}), seed=0, controls={fact.id: "Berlin"},
                        known=frozenset(f.id for f in facts), unknown=unknown)
    out = rl.Relearning(n_examples=4, epochs=2).run(smollm2, [fact], ctx)[0]
    d = out.details
    assert (out.success, out.best_rank, out.budget) == (True, 1, 20)
    assert (out.control, out.control_rank) == (False, 28)
    assert out.taught == d["taught_before"] == 0.0 and d["taught_ranks"] == d["taught_ranks_before"] == [21, 808]
    assert d["relearn_params"] == 30 * 3 * 2 * (576 + 1536)  # 30 layers x 3 maps x r (d_in + d_out)
    assert d["relearn_pool"] == "known" and len(d["relearn_data"]) == 4
    assert not {"Paris", "Berlin"} & set(d["relearn_answers"])
    assert d["relearn_loss"][0] == pytest.approx(0.528, abs=0.005) and d["relearn_loss"][1] < d["relearn_loss"][0]
