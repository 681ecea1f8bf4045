"""The six deletion objectives on tiny random models: each moves its target quantity the right way,
hidden-state losses come from the same single forward pass, restore is exact."""

from __future__ import annotations

import math

import pytest
import torch

import defenses
import probe.model
from defenses.forward import objective_forward, prepare
from defenses.objectives import head_projection_loss, neg_mean_entropy, other_answer
from probe.facts import Fact
from probe.lens import logit_lens
from probe.readout import sequence_logprobs
from probe.rephrase import ATTACK_PREFIXES, DEFENSE_PREFIXES, insert_prefix
from probe.residual import residual_stream

FACT = Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of"],
            alt_answer="Tokyo", subject="France")
OTHER = Fact("jp", "The capital of Japan is", "Tokyo")


def _editor(**kw):
    cfg = dict(layer=0, lr=5e-2, norm_bound=1.0, steps=12, retain_weight=0.0, early_stop=None)
    cfg.update(kw)
    return defenses.make_editor("constrained-ft", **cfg)


def _p(model, prompt, answer):
    return float(sequence_logprobs(model, [prompt], [answer])[0].sum().exp())


def _edit(model, name, **obj_kw):
    obj = defenses.make_objective(name, **obj_kw)
    ed = _editor()
    sess = ed.session(model)
    info = ed.edit(sess, obj, obj.request(FACT, [FACT, OTHER], []))
    return obj, sess, info


def test_every_cli_name_is_registered():
    assert list(defenses.OBJECTIVES) == ["fact-erasure", "empty-response", "error-injection", "head-projection",
                                         "max-entropy", "input-rephrasing"]
    with pytest.raises(ValueError, match="valid defenses: fact-erasure, empty-response"):
        defenses.make_objective("nope")


def test_fact_erasure_lowers_answer_probability(tiny_llama):
    before = _p(tiny_llama, FACT.prompt, FACT.answer)
    _, sess, _ = _edit(tiny_llama, "fact-erasure")
    after = _p(sess.model, FACT.prompt, FACT.answer)
    assert after < 0.5 * before
    assert _p(tiny_llama, FACT.prompt, FACT.answer) == before  # caller's model untouched


@pytest.mark.parametrize("name,target", [("empty-response", "I don't know"), ("error-injection", "Tokyo")])
def test_target_objectives_raise_target_probability(tiny_llama, name, target):
    before = _p(tiny_llama, FACT.prompt, target)
    obj, sess, info = _edit(tiny_llama, name)
    assert obj.target_for(FACT, [FACT, OTHER]) == target
    assert _p(sess.model, FACT.prompt, target) > 2 * before
    assert info.losses[-1] < info.losses[0]


def test_error_injection_falls_back_to_another_answer():
    f = Fact("x", "The capital of Italy is", "Rome")
    pool = [f, Fact("y", "p", "Rome"), Fact("z", "q", "Madrid"), Fact("w", "r", "Oslo")]
    got = other_answer(f, pool, seed=0)
    assert got in {"Madrid", "Oslo"}
    assert other_answer(f, pool, seed=0) == got  # deterministic
    with pytest.raises(ValueError, match="no alt_answer"):
        other_answer(f, [f, Fact("y", "p", "rome")])


def _lens_rank(model, prompt, answer_id, layers):
    resid = residual_stream(model, [prompt], layers)  # [1, L, d]
    lp = logit_lens(model, resid)[0]  # [L, V]
    return [(lp[i] > lp[i, answer_id]).sum().item() + 1 for i in range(len(layers))]


def test_head_projection_defense_lowers_lens_rank_at_defense_layers(tiny_llama):
    obj = defenses.make_objective("head-projection", margin=1.0, bottom=False)  # margin 1: top hinge always active
    layers = obj.layers(tiny_llama.n_layers)
    assert layers == [1]  # last 30% of 2 layers, rounded: the output layer
    a_id = prepare(tiny_llama, obj, obj.request(FACT, [FACT], [])).answer_first[0].item()
    before = _lens_rank(tiny_llama, FACT.prompt, a_id, layers)
    ed = _editor()
    sess = ed.session(tiny_llama)
    ed.edit(sess, obj, obj.request(FACT, [FACT], []))
    after = _lens_rank(sess.model, FACT.prompt, a_id, layers)
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_head_projection_loss_values():
    # probabilities [0.5, 0.3, 0.15, 0.05]; D_(k) is taken over the *other* tokens
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    # answer 0 (top-1), k=2: others' 2nd largest = 0.15 -> top hinge 0.35; others' 2nd smallest 0.15 -> 0
    assert head_projection_loss(logits, torch.tensor([0]), k=2).item() == pytest.approx(0.35, abs=1e-6)
    # answer 3 (0.05) is out of the top-2; others' 2nd smallest = 0.3 -> bottom hinge 0.25
    assert head_projection_loss(logits, torch.tensor([3]), k=2).item() == pytest.approx(0.25, abs=1e-6)
    assert head_projection_loss(logits, torch.tensor([3]), k=2, bottom=False).item() == 0.0
    # answer 1 sits exactly at rank k=2: the attack (top-2) finds it, so the loss must not be zero
    assert head_projection_loss(logits, torch.tensor([1]), k=2, bottom=False).item() == pytest.approx(0.15, abs=1e-6)
    # k=1: answer 1 (0.3) is out of the top-1 (others' max 0.5) and out of the bottom-1 (0.05)
    assert head_projection_loss(logits, torch.tensor([1]), k=1).item() == 0.0
    # a margin keeps pushing: 0.3 - 0.5 + 0.25 = 0.05 (top); 0.05 - 0.3 + 0.25 = 0 (bottom)
    assert head_projection_loss(logits, torch.tensor([1]), k=1, margin=0.25).item() == pytest.approx(0.05, abs=1e-6)


def test_neg_mean_entropy_values():
    # the reference's scale: minus the mean entropy in nats, not divided by log V
    uniform = torch.zeros(2, 3, 8)
    assert neg_mean_entropy(uniform).item() == pytest.approx(-math.log(8), abs=1e-6)
    peaked = torch.tensor([[[100.0] + [0.0] * 7]])
    assert neg_mean_entropy(peaked).item() == pytest.approx(0.0, abs=1e-4)
    # two equally likely tokens of four at one layer, uniform at the other: -(log 2 + log 4) / 2
    two = torch.tensor([[[0.0, 0.0, -1e4, -1e4], [0.0, 0.0, 0.0, 0.0]]])
    assert neg_mean_entropy(two).item() == pytest.approx(-(math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_max_entropy_raises_lens_entropy(tiny_llama):
    obj = defenses.make_objective("max-entropy")
    layers = obj.layers(tiny_llama.n_layers)

    def entropy(model):
        with torch.no_grad():
            lp = logit_lens(model, residual_stream(model, [FACT.prompt], layers))[0]
        return float(-(lp.exp() * lp).sum(-1).mean())

    before = entropy(tiny_llama)
    ed = _editor()
    sess = ed.session(tiny_llama)
    info = ed.edit(sess, obj, obj.request(FACT, [FACT], []))
    log_v = math.log(tiny_llama.vocab_size)
    after = entropy(sess.model)
    # the first step's loss is minus the unedited mean lens entropy (nats; no retain, no decay)
    assert info.losses[0] == pytest.approx(-before, abs=1e-4)
    assert info.losses[-1] < info.losses[0] < 0
    # a random model is already near-uniform: the gap to the maximum entropy log V must halve
    assert log_v - after < 0.5 * (log_v - before), (before, after, log_v)
    assert after <= log_v + 1e-4


def test_input_rephrasing_trains_on_disjoint_prefixes_and_erases_them(tiny_llama):
    assert not set(ATTACK_PREFIXES) & set(DEFENSE_PREFIXES)
    obj = defenses.make_objective("input-rephrasing")
    req = obj.request(FACT, [FACT], [])
    assert req.prompts[0] == FACT.prompt and len(req.prompts) == 1 + len(DEFENSE_PREFIXES)
    assert all(not p.startswith(ATTACK_PREFIXES) for p in req.prompts)
    ed = _editor()
    sess = ed.session(tiny_llama)
    ed.edit(sess, obj, req)
    for p in req.prompts:
        assert _p(sess.model, p, FACT.answer) < 0.5 * _p(tiny_llama, p, FACT.answer)


def test_insert_prefix_goes_before_the_question():
    assert insert_prefix("The capital of France is", "I'm trying out. ") == "I'm trying out. The capital of France is"
    q = "Answer the question in one word:\n Question: What is the capital? Answer:"
    assert insert_prefix(q, "A man who was. ") == ("Answer the question in one word:\n Question: A man who was. "
                                                   "What is the capital? Answer:")


def test_hidden_state_loss_uses_one_forward_pass_with_gradients(tiny_llama):
    obj = defenses.make_objective("head-projection", margin=1.0)
    ed = _editor()
    sess = ed.session(tiny_llama)
    calls = []
    h = sess.model.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        prep = prepare(sess.model, obj, obj.request(FACT, [FACT], ["The sky is"]))
        param = sess.param
        with probe.model.only_trainable(sess.model, [param]), torch.enable_grad():
            inputs, retain_lp = objective_forward(sess.model, prep)
            loss = obj.loss(inputs)
            loss.backward()
    finally:
        h.remove()
    assert len(calls) == 1
    assert inputs.lens_logits.shape == (1, 1, tiny_llama.vocab_size)
    assert retain_lp.shape == (1, tiny_llama.vocab_size)
    assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(defenses.OBJECTIVES))
def test_restore_is_exact_after_every_objective(tiny_llama, name):
    snapshot = {k: v.detach().clone() for k, v in tiny_llama.hf.state_dict().items()}
    obj, sess, info = _edit(tiny_llama, name)
    sess.restore()
    for k, v in sess.model.hf.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    for k, v in tiny_llama.hf.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_diverging_objective_raises_and_restores(tiny_llama):
    class NaNObjective(defenses.Objective):
        cli_name = "nan"

        def loss(self, inputs):
            return inputs.seq_logprobs[0].sum() * float("nan")

    ed = _editor()
    sess = ed.session(tiny_llama)
    with pytest.raises(defenses.DefenseDiverged, match="nan"):
        ed.edit(sess, NaNObjective(), defenses.DeletionRequest([FACT.prompt], [FACT.answer]))
    assert sess.max_abs_change() == 0.0


def test_defense_layers_out_of_range_is_an_error(tiny_llama):
    obj = defenses.make_objective("max-entropy", defense_layers=[5])
    with pytest.raises(ValueError, match="defense layer 5 out of range"):
        obj.layers(tiny_llama.n_layers)
