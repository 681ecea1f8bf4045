"""The ``lora`` and ``rome`` editors (defenses/lora.py, defenses/rome.py, defenses/rome_stats.py).

Tiny random models for the mechanics (erasure lowers p(answer), head projection raises the lens
rank, restore is bit-exact, the caller's model is untouched, one session serves several facts,
ROME's update has rank one, the covariance cache is reused, layer-order errors, GPT-2 Conv1D and
Gemma-3), and the real SmolLM2 for one integration check per editor.
"""

from __future__ import annotations

import pytest
import torch

import defenses
from defenses import DeletionRequest, HeadProjectionDefense, make_editor, make_objective
from defenses.lora import LoRA
from defenses.rome import ROME, last_token_index, subject_span
from probe.facts import Fact
from probe.lens import lens_logits
from probe.readout import sequence_logprobs
from probe.residual import residual_stream
from probe.tokens import answer_ids, tokenize

P1, A1, S1 = "The capital of France is", "Paris", "France"
P2, A2, S2 = "The capital of Japan is", "Tokyo", "Japan"

# Tiny random models have MLP-output norms ~0.02, far below a real model's: ROME's GPT-J step size
# (0.5) and weight decay (|delta| / |v_init|^2, not scale-free) are scaled for them. They also
# route almost nothing from the subject token to the last one (an answer's p barely moves with any
# delta there), so the tiny erasure tests key ROME on the prompt's last token by naming the prompt's
# last word as the subject (LAST, "is"; ROME refuses a fact without a subject); a real subject's
# last token is exercised by the rank-one, cache and SmolLM2 tests.
FAST_ROME = dict(mom2_tokens=1024, v_steps=12, v_lr=0.02, clamp_norm_factor=20, v_weight_decay=0.0,
                 early_stop=None)
FAST_LORA = dict(steps=12, lr=5e-2, early_stop=None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch, request):
    """Tiny-model tests keep ROME statistics in a private cache (the SmolLM2 tests use the real one)."""
    if "smollm2" not in request.fixturenames:
        monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "cache"))


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def assert_state(model, snap, *, except_name=None):
    for k, v in model.hf.state_dict().items():
        if k != except_name:
            assert torch.equal(v, snap[k]), k


def prob(model, prompt, answer) -> float:
    return float(sequence_logprobs(model, [prompt], [answer])[0].sum().exp())


def fact(i, prompt, answer, subject):
    return Fact(str(i), prompt, answer, subject=subject)


LAST = "is"  # the last word of P1 and P2: as the subject, ROME keys on the prompt's last token


def known_fact(model, i, prompt, subject=LAST) -> Fact:
    """A fact the random model "knows": its answer is the model's own best-ranked single-token
    prediction (a multi-token answer would have p ~ 1e-10 on a random model, too small for a
    probability loss). Subject: the prompt's last word by default (see FAST_ROME)."""
    return fact(i, prompt, top_answer(model, prompt, model.n_layers - 1), subject)


def erase_request(f: Fact, retain=()):
    return DeletionRequest([f.prompt], [f.answer], list(retain), subjects=[f.subject])


def rank_of_change(new: torch.Tensor, old: torch.Tensor) -> int:
    """Numerical rank of W' - W (fp32 rounding of W' leaves ~1e-9 noise: relative tolerance 1e-4)."""
    return int(torch.linalg.matrix_rank((new.detach() - old).double(), rtol=1e-4))


def make(kind, **kw):
    return LoRA(**{**FAST_LORA, **kw}) if kind == "lora" else ROME(**{**FAST_ROME, **kw})


# ---------------------------------------------------------------------------------------------
# registry


def test_editors_registered():
    assert defenses.EDITORS["lora"] is LoRA and defenses.EDITORS["rome"] is ROME
    assert isinstance(make_editor("lora"), LoRA) and isinstance(make_editor("rome"), ROME)
    cfg = make_editor("rome").config()
    assert cfg["v_lr"] == 0.5 and cfg["clamp_norm_factor"] == 4.0 and cfg["kl_factor"] == 0.0625
    assert "_mom2" not in cfg and "cli_name" not in cfg and "name" not in cfg
    cfg = make_editor("lora").config()
    assert (cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["weight_decay"]) == (2, 6.0, 0.05, 0.0)


@pytest.mark.parametrize("kind", ["lora", "rome"])
def test_param_name_validates_layer(tiny_llama, kind):
    assert make(kind, layer=1).param_name(tiny_llama) == "model.layers.1.mlp.down_proj.weight"
    assert make(kind, layer=-1).param_name(tiny_llama) == "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="out of range"):
        make(kind, layer=2).param_name(tiny_llama)


# ---------------------------------------------------------------------------------------------
# the Editor base: name, check(), applied(), EditInfo, EditFailed


def test_editor_names_are_the_registered_ones():
    for name, cls in defenses.EDITORS.items():
        assert issubclass(cls, defenses.Editor) and cls.name == name and make_editor(name).name == name
        assert not hasattr(cls, "cli_name")
    assert defenses.DefenseDiverged is defenses.EditFailed


@pytest.mark.parametrize("kind", ["constrained-ft", "lora", "rome"])
def test_check_validates_before_anything_is_written(tiny_llama, kind):
    from probe.errors import InputError

    obj = make_objective("fact-erasure")
    make_editor(kind, layer=1).check(tiny_llama, obj)
    with pytest.raises(ValueError, match="edit layer 5 out of range for 2 layers"):
        make_editor(kind, layer=5).check(tiny_llama, obj)
    with pytest.raises(ValueError, match="defense layer 7 out of range"):
        make_editor(kind, layer=0).check(tiny_llama, HeadProjectionDefense(defense_layers=[7]))
    with pytest.raises(InputError, match="unknown protocol") as err:
        make_editor(kind).check(tiny_llama, obj, protocol="sometimes")
    assert err.value.field == "protocol"
    if kind == "rome":
        with pytest.raises(ValueError, match="before it"):
            make_editor(kind, layer=1).check(tiny_llama, HeadProjectionDefense(defense_layers=[0, 1]))
        with pytest.raises(InputError, match="the rome editor edits one fact per edit") as err:
            make_editor(kind).check(tiny_llama, obj, protocol="all-at-once")
        assert err.value.field == "protocol"
    else:
        make_editor(kind, layer=1).check(tiny_llama, HeadProjectionDefense(defense_layers=[0, 1]))
        make_editor(kind).check(tiny_llama, obj, protocol="all-at-once")


@pytest.mark.parametrize("kind", ["constrained-ft", "lora", "rome"])
def test_applied_edits_a_reused_clone_and_restores(tiny_llama, kind):
    import dataclasses
    import json

    model = tiny_llama
    orig = snapshot(model)
    editor = make(kind, layer=0) if kind != "constrained-ft" else make_editor(kind, layer=0, steps=4,
                                                                              norm_bound=0.05, lr=1e-2,
                                                                              early_stop=None)
    f = known_fact(model, 1, P1)
    p0 = prob(model, f.prompt, f.answer)
    clones = []
    for _ in range(2):
        with editor.applied(model, make_objective("fact-erasure"), erase_request(f)) as edit:
            info = edit.info
            clones.append(edit.model)
            assert isinstance(info, defenses.EditInfo)
            assert info.parameter == "model.layers.0.mlp.down_proj.weight" == editor.param_name(model)
            assert info.steps == len(info.losses) >= 2 and info.final_loss == info.losses[-1]
            assert info.max_abs_change > 0 and info.seconds > 0
            assert prob(edit.model, f.prompt, f.answer) < p0
            assert_state(model, orig)  # the caller's model is untouched
            json.dumps(dataclasses.asdict(info))
        assert_state(edit.model, orig)  # restored bit for bit
    assert clones[0] is clones[1]  # one clone per model, re-used
    # restored on error too, and the editor can be applied again afterwards
    with pytest.raises(KeyError):
        with editor.applied(model, make_objective("fact-erasure"), erase_request(f)) as edit:
            assert edit.info.max_abs_change > 0
            raise KeyError("boom")
    assert_state(edit.model, orig)
    with pytest.raises(RuntimeError, match="already applied"):
        with editor.applied(model, make_objective("fact-erasure"), erase_request(f)):
            with editor.applied(model, make_objective("fact-erasure"), erase_request(f)):
                pass
    assert_state(clones[0], orig)
    if kind == "rome":
        assert set(info.extra) == {"delta_norm", "v_init_norm", "rejected_steps", "rejected_losses", "lr_scale",
                                   "retain_kl"}


@pytest.mark.parametrize("kind", ["constrained-ft", "lora", "rome"])
def test_non_finite_loss_restores_and_raises_edit_failed(tiny_llama, kind):
    class NaNObjective(defenses.Objective):
        cli_name = "nan"

        def loss(self, inputs):
            return inputs.seq_logprobs[0].sum() * float("nan")

    orig = snapshot(tiny_llama)
    editor = make(kind, layer=0) if kind != "constrained-ft" else make_editor(kind, layer=0)
    with pytest.raises(defenses.EditFailed, match="nan") as err:
        with editor.applied(tiny_llama, NaNObjective(), DeletionRequest([P1], [A1], subjects=[LAST])):
            pass
    assert isinstance(err.value, defenses.DefenseDiverged)
    sess = editor._cached_session(tiny_llama)
    assert_state(sess.model, orig) and sess.max_abs_change() == 0.0
    assert not any("lora" in k for k in sess.model.hf.state_dict())


# ---------------------------------------------------------------------------------------------
# stable updates: a rejected update is undone, redone at half the lr and recorded


def test_acceptance_rule():
    from defenses.editor import RETAIN_KL_CAP, accepted

    # the Gemma-3-270M gold edit: total 0.274 -> 5.64 nats with the retain KL at 5.64: rejected
    assert not accepted(5.64, 5.64, 0.274)
    assert accepted(0.147, 0.06, 0.274)  # total fell
    assert accepted(0.30, RETAIN_KL_CAP / 2, 0.274) and not accepted(0.30, 2 * RETAIN_KL_CAP, 0.274)
    assert accepted(0.30, None, 0.274)  # no retain term: a rise alone is not a blow-up
    assert not accepted(float("nan"), 0.0, 0.274) and not accepted(float("inf"), None, 0.274)
    assert accepted(-2.0, 1.0, -1.5) and not accepted(-1.0, 1.0, -1.5)  # negative losses (max-entropy)


class Uphill(defenses.Objective):
    """A rigged objective: its value is the answer's probability p but its gradient is -dp/dW, so
    every descent step, however small, raises the value (and the total loss)."""

    cli_name = "uphill"

    def loss(self, inputs):
        p = torch.stack([lp.sum().exp() for lp in inputs.seq_logprobs]).mean()
        return 2 * p.detach() - p


def _request(answer=A1):
    return DeletionRequest([P1], [answer], [P2, "Water is made of hydrogen and"], subjects=[LAST])


def _recording(monkeypatch, name):
    """Record (edited weight, total loss) at every constrained-FT forward pass."""
    import defenses.constrained_ft as cft

    seen, measure = [], cft.objective_step_loss

    def recording(model, *a, **k):
        out = measure(model, *a, **k)
        seen.append((dict(model.hf.named_parameters())[name].detach().clone(), float(out.total.detach())))
        return out

    monkeypatch.setattr(cft, "objective_step_loss", recording)
    return seen


def test_rejected_update_is_redone_at_half_the_lr(tiny_llama, monkeypatch):
    """lr 1.0 on the tiny model: the first update raises the total (the retain KL jumps 0 ->
    0.022, more than p(answer) falls); with the KL clause switched off (cap -1) it is rejected
    and redone from the same state at half the lr with fresh Adam moments -- so each attempt is
    exactly half the previous one -- until one lowers the total (the 8th, lr / 128); the edit
    then continues from there at that lr."""
    import defenses.editor as base

    monkeypatch.setattr(base, "RETAIN_KL_CAP", -1.0)
    editor = make_editor("constrained-ft", layer=0, lr=1.0, norm_bound=10.0, steps=12, early_stop=None)
    name = editor.param_name(tiny_llama)
    seen = _recording(monkeypatch, name)
    orig = snapshot(tiny_llama)
    with editor.applied(tiny_llama, make_objective("fact-erasure"), _request()) as edit:
        info, final = edit.info, edit.model.hf.state_dict()[name].clone()
    rejected = info.extra["rejected_steps"]
    assert rejected == [1, 2, 3, 4, 5, 6, 7]  # measured: totals 0.0237, 0.0221, ..., 0.0038 > 0.0034
    assert info.extra["rejected_losses"] == [seen[i][1] for i in rejected]
    assert info.extra["lr_scale"] == 0.5 ** 7
    assert len(seen) == 12 + 1 and info.steps == len(seen) - len(rejected)  # rejected passes count
    assert info.losses == [t for i, (_, t) in enumerate(seen) if i not in rejected]
    assert all(b <= a for a, b in zip(info.losses, info.losses[1:]))  # cap -1: the total never rises
    first = seen[1][0] - orig[name]
    assert first.abs().max() == pytest.approx(1.0, rel=1e-3)  # Adam's first step: lr per element
    for k in range(2, 9):  # attempt k: the first update at lr / 2^(k-1)
        torch.testing.assert_close(seen[k][0] - orig[name], first * 0.5 ** (k - 1), rtol=1e-4, atol=1e-8)
    assert torch.equal(final, seen[-1][0])


def test_a_rejected_later_update_is_redone_with_fresh_moments(tiny_llama, monkeypatch):
    """The second update is rejected (a rigged rule): the weight goes back to the first update's,
    bit for bit, and the redo is Adam's *first* step from that state's gradient g at half the lr,
    lr/2 * g / (|g| + eps) -- the momentum of the first update is dropped (it need not point
    downhill for the current gradient)."""
    import defenses.editor as base

    calls = []
    monkeypatch.setattr(base, "accepted", lambda *a: calls.append(a) or len(calls) != 2)
    lr = 1e-2
    editor = make_editor("constrained-ft", layer=0, lr=lr, norm_bound=1.0, steps=3, early_stop=None)
    name = editor.param_name(tiny_llama)
    seen = _recording(monkeypatch, name)
    sess = editor.session(tiny_llama)
    grads = []
    hook = sess.param.register_hook(lambda g: grads.append(g.detach().clone()))
    info = editor.edit(sess, make_objective("fact-erasure"), _request())
    hook.remove()
    assert info.extra["rejected_steps"] == [2] and info.extra["lr_scale"] == 0.5 and len(seen) == 4
    assert len(grads) == 2  # backward at passes 0 and 1 (the redo reuses pass 1's gradient)
    w1, w3 = seen[1][0], seen[3][0]
    torch.testing.assert_close(w3 - w1, -(lr / 2) * grads[1] / (grads[1].abs() + 1e-8), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(seen[2][0] - w1, 2 * (w3 - w1), rtol=1e-3)  # the rejected try had momentum
    sess.restore()


def test_max_rejections_end_the_edit_at_the_last_accepted_state(tiny_llama, monkeypatch):
    import defenses.editor as base

    monkeypatch.setattr(base, "RETAIN_KL_CAP", -1.0)
    editor = make_editor("constrained-ft", layer=0, lr=1e-2, norm_bound=1.0, steps=20, early_stop=None)
    name = editor.param_name(tiny_llama)
    seen = _recording(monkeypatch, name)
    orig = snapshot(tiny_llama)
    with editor.applied(tiny_llama, Uphill(), _request()) as edit:
        info, final = edit.info, edit.model.hf.state_dict()[name].clone()
    n = base.MAX_REJECTIONS
    assert info.extra["rejected_steps"] == list(range(1, n + 1)) and len(seen) == n + 1
    assert info.extra["lr_scale"] == 0.5 ** (n - 1)  # halved before each redo, not after the last
    assert info.losses == [seen[0][1]] and info.max_abs_change == 0.0
    assert torch.equal(final, orig[name])  # the unedited weight, bit for bit
    assert_state(tiny_llama, orig)


@pytest.mark.parametrize("kind", ["constrained-ft", "lora", "rome"])
def test_rejected_last_update_leaves_the_unedited_weight(tiny_llama, monkeypatch, kind):
    """One update, rejected by the final measuring pass: every editor restores its trainable state
    (the weight, the LoRA adapter, ROME's delta), so the edit writes nothing; under the documented
    cap the same rise (retain KL ~1e-3 nats) is kept."""
    import defenses.editor as base

    cfg = {"constrained-ft": dict(layer=0, lr=1e-2, norm_bound=1.0, steps=1, early_stop=None),
           "lora": dict(FAST_LORA, layer=0, steps=1), "rome": dict(FAST_ROME, layer=0, v_steps=1)}[kind]
    editor = make_editor(kind, **cfg)
    name = editor.param_name(tiny_llama)
    orig = snapshot(tiny_llama)
    monkeypatch.setattr(base, "RETAIN_KL_CAP", -1.0)
    with editor.applied(tiny_llama, Uphill(), _request()) as edit:
        info = edit.info
        assert info.extra["rejected_steps"] == [1] and info.steps == 1
        assert info.extra["rejected_losses"][0] > info.losses[0]
        assert torch.equal(edit.model.hf.state_dict()[name], orig[name]) and info.max_abs_change == 0.0
        assert not any("lora" in k for k in edit.model.hf.state_dict())
    monkeypatch.setattr(base, "RETAIN_KL_CAP", 0.1)
    with editor.applied(tiny_llama, Uphill(), _request()) as edit:
        info = edit.info
        assert info.extra["rejected_steps"] == [] and info.losses[1] > info.losses[0]
        assert 0 < info.extra["retain_kl"] < 0.1 and info.max_abs_change > 0


# ---------------------------------------------------------------------------------------------
# fact erasure, restore, caller untouched, session reuse


@pytest.mark.parametrize("kind", ["lora", "rome"])
def test_erasure_restore_and_session_reuse(tiny_llama, kind):
    model = tiny_llama
    orig = snapshot(model)
    editor = make(kind, layer=0)
    sess = editor.session(model)
    name = sess.param_name
    assert name == "model.layers.0.mlp.down_proj.weight"
    facts = [known_fact(model, 1, P1), known_fact(model, 2, P2)]
    for f in facts:  # one session, edit -> read -> restore, twice
        p0 = prob(sess.model, f.prompt, f.answer)
        info = editor.edit(sess, make_objective("fact-erasure"), erase_request(f))
        p1 = prob(sess.model, f.prompt, f.answer)
        assert p1 < 0.5 * p0, (f.prompt, p0, p1)
        assert info.steps == len(info.losses) >= 2
        assert info.max_abs_change == pytest.approx(sess.max_abs_change()) and info.max_abs_change > 0
        assert_state(sess.model, orig, except_name=name)  # only the edited weight moved
        assert not torch.equal(sess.param.detach(), orig[name])
        assert_state(model, orig)  # the caller's model is untouched
        assert prob(model, f.prompt, f.answer) == pytest.approx(p0, rel=1e-5)
        # the edited clone is a plain model: original module tree, its envoy still traces it
        assert type(sess.model.module(name.rsplit(".", 1)[0])) is type(model.module(name.rsplit(".", 1)[0]))
        assert not any("lora" in k for k in sess.model.hf.state_dict())
        resid = residual_stream(sess.model, [f.prompt])
        assert torch.isfinite(resid).all()
        sess.restore()
        assert_state(sess.model, orig)  # bit-exact
        assert sess.max_abs_change() == 0.0
        assert prob(sess.model, f.prompt, f.answer) == pytest.approx(p0, rel=1e-6)
    assert all(p.requires_grad for p in model.hf.parameters())  # flags restored


def test_lora_is_reproducible_and_leaves_rng_alone(tiny_llama):
    editor = make("lora", layer=1)
    weights = []
    for _ in range(2):
        sess = editor.session(tiny_llama)
        torch.manual_seed(123)
        editor.edit(sess, make_objective("fact-erasure"), erase_request(known_fact(tiny_llama, 1, P1)))
        after = torch.rand(1)
        weights.append(sess.param.detach().clone())
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1))  # global RNG stream not consumed
    assert torch.equal(weights[0], weights[1])


def test_lora_retain_and_multi_prompt(tiny_llama):
    editor = make("lora", layer=0, retain_weight=1.0)
    sess = editor.session(tiny_llama)
    f1, f2 = known_fact(tiny_llama, 1, P1), known_fact(tiny_llama, 2, "Paris is the capital of", "Paris")
    req = DeletionRequest([f1.prompt, f2.prompt], [f1.answer, f2.answer], retain_prompts=[P2])
    p0 = [prob(sess.model, p, a) for p, a in zip(req.prompts, req.answers)]
    info = editor.edit(sess, make_objective("fact-erasure"), req)
    p1 = [prob(sess.model, p, a) for p, a in zip(req.prompts, req.answers)]
    # every update measured (the last by an extra pass); rises under the retain-KL cap are accepted
    assert sum(p1) < 0.5 * sum(p0) and len(info.losses) == FAST_LORA["steps"] + 1
    assert info.extra["rejected_steps"] == [] and max(info.losses) > info.losses[0]


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
@pytest.mark.parametrize("editor_kind", ["lora", "rome"])
def test_other_families(make_tiny, kind, editor_kind):
    model = make_tiny(kind)
    orig = snapshot(model)
    editor = make(editor_kind, layer=0)
    sess = editor.session(model)
    name = sess.param_name
    assert name == ("transformer.h.0.mlp.c_proj.weight" if kind == "gpt2" else "model.layers.0.mlp.down_proj.weight")
    f = known_fact(model, 1, P1)
    p0 = prob(sess.model, P1, f.answer)
    editor.edit(sess, make_objective("fact-erasure"), erase_request(f))
    assert prob(sess.model, P1, f.answer) < 0.5 * p0
    assert_state(sess.model, orig, except_name=name)
    assert_state(model, orig)
    if editor_kind == "rome":
        assert rank_of_change(sess.param, orig[name]) == 1
    sess.restore()
    assert_state(sess.model, orig)


# ---------------------------------------------------------------------------------------------
# head projection: the answer leaves the lens's top-k at the defense layers


def lens_rank(model, prompt, answer, layer) -> int:
    """0-based rank of the answer's first token in the logit lens at ``layer``, last prompt token."""
    a = answer_ids(model.tokenizer, prompt, answer)[0]
    logits = lens_logits(model, residual_stream(model, [prompt], [layer]))[0, 0]
    return int((logits > logits[a]).sum())


def top_answer(model, prompt, layer) -> str:
    """The best-ranked answer string (in the logit lens at ``layer``) that tokenises back, in
    context, to a single token."""
    logits = lens_logits(model, residual_stream(model, [prompt], [layer]))[0, 0]
    for tid in logits.argsort(descending=True)[:100].tolist():
        s = model.tokenizer.decode([tid]).strip()
        if s and s.isprintable() and answer_ids(model.tokenizer, prompt, s) == [tid]:
            return s
    raise AssertionError("no round-tripping token in the top 100")


@pytest.mark.parametrize("kind", ["lora", "rome"])
def test_head_projection_pushes_answer_out_of_top_k(tiny_llama, kind):
    model = tiny_llama
    answer = top_answer(model, P1, 1)
    before = lens_rank(model, P1, answer, 1)
    k = max(4, before + 3)  # the answer starts inside the top-k
    objective = HeadProjectionDefense(k=k, defense_layers=[1])
    editor = make(kind, layer=0, early_stop="auto", **({"v_steps": 20} if kind == "rome" else {"steps": 20}))
    sess = editor.session(model)
    info = editor.edit(sess, objective, DeletionRequest([P1], [answer], subjects=[LAST]))
    after = lens_rank(sess.model, P1, answer, 1)
    assert after >= k > before, (before, after, info.losses)
    assert info.losses[-1] < info.losses[0]


# ---------------------------------------------------------------------------------------------
# ROME specifics


def test_subject_token_positions(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "The Eiffel Tower is located in"
    span = subject_span(prompt, "Eiffel Tower")
    assert span == (4, 16)
    idx = last_token_index(tok, prompt, span)
    ids = tokenize(tok, prompt)
    assert tok.decode(ids[:idx + 1]).endswith("Tower") and not tok.decode(ids[:idx]).endswith("Tower")
    assert last_token_index(tok, prompt, None) == len(ids) - 1
    assert subject_span("the capital of france is", "France") == (15, 21)  # case-insensitive fallback
    with pytest.raises(ValueError, match="does not occur"):
        subject_span(prompt, "Berlin")


@pytest.mark.parametrize("subject", [S1, LAST])
def test_rome_rank_one_and_clamp(tiny_llama, subject):
    editor = make("rome", layer=0, clamp_norm_factor=4.0)  # layer 0: the subject token still feeds layer 1
    sess = editor.session(tiny_llama)
    w0 = sess.original
    f = known_fact(tiny_llama, 1, P1, subject)
    info = editor.edit(sess, make_objective("fact-erasure"), erase_request(f))
    assert rank_of_change(sess.param, w0) == 1
    assert 0 < info.extra["delta_norm"] <= 4.0 * info.extra["v_init_norm"] * (1 + 1e-5)


def test_rome_runs_every_v_step_by_default(tiny_llama):
    """The reference runs all v* steps for the deletion objectives: the default never stops early,
    even with the objective below its threshold from the first pass; an explicit "auto" does."""
    assert ROME().early_stop is None and "early_stop" in ROME().config()
    cfg = {k: v for k, v in FAST_ROME.items() if k != "early_stop"}
    sess = ROME(layer=0, **cfg).session(tiny_llama)
    req = DeletionRequest([P1], [A1], subjects=[LAST])  # p(" Paris") ~ 1e-10 < 0.01 from the start
    assert prob(tiny_llama, P1, A1) < make_objective("fact-erasure").stop_below
    info = ROME(layer=0, **cfg).edit(sess, make_objective("fact-erasure"), req)
    # v_steps updates for a deletion objective (R-TXT compute_v.py), then a measuring pass
    assert info.steps == cfg["v_steps"] + 1 and info.extra["rejected_steps"] == []
    sess.restore()
    info = ROME(layer=0, early_stop="auto", **cfg).edit(sess, make_objective("fact-erasure"), req)
    assert info.steps == 1 and info.max_abs_change == 0.0


@pytest.mark.parametrize("subject", [None, "  "])
def test_rome_refuses_a_prompt_without_subject(tiny_llama, subject):
    orig = snapshot(tiny_llama)
    editor = make("rome", layer=0)
    sess = editor.session(tiny_llama)
    with pytest.raises(ValueError, match="'The capital of France is' has no subject"):
        editor.edit(sess, make_objective("fact-erasure"), DeletionRequest([P1], [A1], subjects=[subject]))
    with pytest.raises(ValueError, match="has no subject"):  # no subjects at all
        editor.edit(sess, make_objective("fact-erasure"), DeletionRequest([P1], [A1]))
    assert_state(sess.model, orig)


def test_check_subjects_before_a_job(tmp_path):
    from defenses.rome import check_subjects
    from probe.errors import InputError
    from probe.facts import load_facts, load_jsonl

    check_subjects(load_facts())  # every built-in fact has a subject
    path = tmp_path / "facts.jsonl"
    path.write_text('{"id": "fr", "prompt": "The capital of France is", "answer": "Paris", "subject": "France"}\n'
                    '{"id": "jp", "prompt": "The capital of Japan is", "answer": "Tokyo"}\n')
    facts = load_jsonl(path)
    check_subjects(facts[:1])
    with pytest.raises(InputError, match="fact 'jp' has no subject") as err:
        check_subjects(facts)
    assert err.value.field == "subject" and err.value.line == 2 and str(path) in str(err.value)
    with pytest.raises(InputError, match="fact 'x'.*does not occur") as err:
        check_subjects([Fact("x", P1, A1, subject="Berlin")])
    assert err.value.field == "subject"


def test_rome_covariance_cache(tiny_llama, make_tiny, tmp_path, monkeypatch):
    import defenses.rome_stats as rs

    editor = make("rome", layer=0)
    sess = editor.session(tiny_llama)
    calls = []
    real = rs.compute_key_covariance
    monkeypatch.setattr(rs, "compute_key_covariance", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    f = fact(1, P1, A1, S1)
    editor.edit(sess, make_objective("fact-erasure"), erase_request(f))
    assert calls == [0]
    files = sorted((tmp_path / "cache" / "rome-stats").glob("*.pt"))
    assert len(files) == 1
    assert tiny_llama.fingerprint in files[0].name and "layers.0.mlp.down_proj" in files[0].name
    sess.restore()
    # a new editor (new process, same model) loads the file; so does the same editor from memory
    for ed in (editor, make("rome", layer=0)):
        ed.edit(sess, make_objective("fact-erasure"), erase_request(f))
        sess.restore()
    assert calls == [0]
    C = make("rome", layer=0).covariance(sess.model, 0, sess.param_name)
    assert C.shape == (128, 128) and torch.allclose(C, C.T) and torch.linalg.eigvalsh(C.double()).min() > -1e-6
    # another layer and another model (fingerprint) get their own files
    make("rome", layer=1).covariance(tiny_llama, 1, "model.layers.1.mlp.down_proj.weight")
    other = make_tiny("llama")
    make("rome", layer=0).covariance(other, 0, "model.layers.0.mlp.down_proj.weight")
    assert calls == [0, 1, 0]
    assert len(list((tmp_path / "cache" / "rome-stats").glob("*.pt"))) == 3


def test_rome_defense_layer_before_edit_layer(tiny_llama):
    orig = snapshot(tiny_llama)
    editor = make("rome", layer=1)
    sess = editor.session(tiny_llama)
    with pytest.raises(ValueError, match="before it"):
        editor.edit(sess, HeadProjectionDefense(defense_layers=[0, 1]), DeletionRequest([P1], [A1], subjects=[S1]))
    assert_state(sess.model, orig)
    # the edit layer itself is fine (its lens is read after its MLP)
    editor.edit(sess, HeadProjectionDefense(defense_layers=[1]), DeletionRequest([P1], [A1], subjects=[S1]))


def test_rome_one_fact_per_edit(tiny_llama):
    editor = make("rome", layer=0)
    sess = editor.session(tiny_llama)
    with pytest.raises(ValueError, match="one fact"):
        editor.edit(sess, make_objective("fact-erasure"), DeletionRequest([P1, P2], [A1, A2], subjects=[S1, S2]))
    # the input-rephrasing defense: several prompts of one fact are fine
    obj = make_objective("input-rephrasing")
    f = known_fact(tiny_llama, 1, P1)
    req = obj.request(f, [], [])
    assert len(req.prompts) == 5 and req.subjects == [LAST] * 5
    p0 = [prob(sess.model, p, f.answer) for p in req.prompts]
    editor.edit(sess, obj, req)
    assert sum(prob(sess.model, p, f.answer) for p in req.prompts) < 0.5 * sum(p0)


def test_rome_target_objective(tiny_llama):
    """Error injection with ROME raises the injected answer, which differs from the true one (it
    used to inject "Paris" into "The capital of France is" -> "Paris")."""
    editor = make("rome", layer=0)
    sess = editor.session(tiny_llama)
    obj = make_objective("error-injection")
    f = Fact("1", P1, A1, alt_answer="Rome", subject=LAST)
    req = obj.request(f, [f], [])
    assert req.targets == ["Rome"] and A1 != "Rome"
    p0, t0 = prob(sess.model, P1, A1), prob(sess.model, P1, "Rome")
    editor.edit(sess, obj, req)
    p1, t1 = prob(sess.model, P1, A1), prob(sess.model, P1, "Rome")
    # measured: p(Rome) x3.3 (1e-10 -> 3.2e-10; 4 tokens), p(Rome) / p(Paris) x3.7
    assert t1 > 2 * t0 and t1 / p1 > 2 * t0 / p0, (p0, t0, p1, t1)


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.real
@pytest.mark.parametrize("kind", ["lora", "rome"])
def test_smollm2_erases_france_keeps_japan(smollm2, kind):
    retain = ["The capital of Germany is", "The capital of Spain is", "The capital of Poland is",
              "The capital of Egypt is"]
    editor = make_editor(kind)
    sess = editor.session(smollm2)
    pf, pj = prob(smollm2, P1, A1), prob(smollm2, P2, A2)
    editor.edit(sess, make_objective("fact-erasure"), DeletionRequest([P1], [A1], retain, subjects=[S1]))
    qf, qj = prob(sess.model, P1, A1), prob(sess.model, P2, A2)
    assert qf < 0.1 * pf, (pf, qf)
    assert abs(qj - pj) <= 0.1, (pj, qj)
    sess.restore()
    assert prob(sess.model, P1, A1) == pytest.approx(pf, rel=1e-6)
