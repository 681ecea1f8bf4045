"""Issue 12 items 4 and 5 in the deletion unit: the retention on every other known fact and the
generation-based deletion scores, on a tiny Llama taught a few facts, with rigged edits whose
effect is known by hand.

The rigged editor negates one row of the unembedding (the first token of " Paris"): every known
fact whose answer starts with that token loses its top-1 output, every other fact keeps it (its
own logit is untouched, a competitor's only went down). So the retention drop is a count of
Paris facts, and leaving out the deleted facts changes that count.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import defenses.metrics
from probe.facts import Fact
from probe.jobs import RunConfig, build_plan, known_facts, measure_deletion, measure_pre
from probe.jobs.deletion import attack_context, check_generation_lengths
from probe.readout import lens_readout
from probe.results import EditInfo
from probe.tokens import answer_ids

TAUGHT = [
    Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of", "The Eiffel Tower is in"]),
    Fact("eiffel", "The Eiffel Tower is located in the city of", "Paris"),
    Fact("fr3", "The city of the Eiffel Tower is", "Paris"),
    Fact("jp", "The capital of Japan is", "Tokyo", paraphrases=["Tokyo is the capital of"]),
    Fact("water", "Water is made of hydrogen and", "oxygen"),
    Fact("berlin", "Berlin is in", "Germany"),
    Fact("madrid", "Madrid is in", "Spain"),
    Fact("rome", "The Colosseum is in", "Rome"),
]
#: a fact the model is never taught (its answer is not its top-1 output): known only under a loose rule
UNTAUGHT = Fact("wrong", "The capital of Brazil is", "Madrid")
PARIS = {"fr", "eiffel", "fr3"}


@pytest.fixture(scope="module")
def taught(tiny_tokenizer):
    """A random tiny Llama (seed 0) taught :data:`TAUGHT` by 150 Adam steps (one thread)."""
    from conftest import teach_tiny_llama

    model = teach_tiny_llama(tiny_tokenizer, TAUGHT, name="tiny-llama-taught")
    hf = model.hf
    assert not hf.config.tie_word_embeddings  # the rig edits the unembedding only
    return model


class RiggedEditor:
    """Applies a known change instead of an optimised edit: negates the unembedding rows of
    ``tokens`` while applied (``model.rigged`` says whether it is), restored afterwards."""

    def __init__(self, tokens=()):
        self.tokens = list(tokens)

    @contextlib.contextmanager
    def applied(self, model, objective, request):
        w = model.unembed.weight
        saved = w.data.clone()
        w.data[self.tokens] *= -1
        model.rigged = True
        try:
            yield SimpleNamespace(model=model, info=EditInfo(0, [], 0.0, "lm_head.weight"))
        finally:
            w.data.copy_(saved)
            model.rigged = False


def _cfg(**kw):
    base = dict(attacks=[], known_rank=1, random_n=0, acc_tokens=1, gen_tokens=0, progress=False)
    base.update(kw)
    return RunConfig(**base)


def _unit(model, facts, deleted_ids, editor, cfg):
    """Known-fact filter over ``facts``, then one rigged edit deleting ``deleted_ids``."""
    plan = build_plan(model, [], ["fact-erasure"], cfg)
    plan.pool = list(facts)
    plan.defenses["fact-erasure"] = (plan.defenses["fact-erasure"][0], editor)
    ctx = attack_context(plan, [], cfg)
    known, _ = known_facts(model, facts, plan, cfg, ctx)
    by = {f.id: (f, r, o) for f, r, o in known}
    dele = [by[i] for i in deleted_ids]
    pres = [measure_pre(model, f, r, o, plan, ctx, cfg) for f, r, o in dele]
    seen = {}

    def during(edited, fact):  # an independent count: the full lens sweep of the edited model
        others = [g for g in facts if g.id in plan.known and g.id not in deleted_ids]
        seen["post"] = {g.id: r.rank[-1] == 1 for g, r in zip(others, lens_readout(edited, [g.prompt for g in others],
                                                                                  [g.answer for g in others]))}

    res = measure_deletion(model, [f for f, _, _ in dele], pres, "fact-erasure", plan, None, cfg,
                           ctx_for=lambda: attack_context(plan, deleted_ids, cfg), during_edit=during)
    return plan, res, seen


def _paris_token(model):
    return answer_ids(model.tokenizer, TAUGHT[0].prompt, "Paris")[0]


def test_the_taught_model_knows_every_taught_fact(taught):
    reads = lens_readout(taught, [f.prompt for f in TAUGHT + [UNTAUGHT]], [f.answer for f in TAUGHT + [UNTAUGHT]])
    assert [r.rank[-1] for r in reads[:-1]] == [1] * len(TAUGHT) and reads[-1].rank[-1] > 1
    # every Paris fact's answer starts with the rigged token, no other fact's does
    tok = _paris_token(taught)
    assert {f.id for f in TAUGHT if answer_ids(taught.tokenizer, f.prompt, f.answer)[0] == tok} == PARIS


def test_retention_drop_counts_the_broken_known_facts_and_leaves_out_the_deleted_one(taught):
    plan, res, seen = _unit(taught, TAUGHT + [UNTAUGHT], ["fr"], RiggedEditor([_paris_token(taught)]), _cfg())
    assert plan.known == {f.id for f in TAUGHT}  # the untaught fact fails the rank-1 rule
    s = res[0].scores
    # 7 other known facts, of which eiffel and fr3 (Paris) lose their top-1 output; "fr" itself is
    # deleted and left out (counting it would give 3 of 8)
    assert s.retention_n == 7
    assert (s.retention_acc_pre, s.retention_acc_post, s.retention_drop) == (1.0, 5 / 7, pytest.approx(2 / 7))
    assert seen["post"] == {"eiffel": False, "fr3": False, "jp": True, "water": True, "berlin": True,
                            "madrid": True, "rome": True}
    assert res[0].scores.efficacy == 1.0  # the deleted fact's own answer is off the top too


def test_all_at_once_leaves_out_every_deleted_fact(taught):
    _, res, _ = _unit(taught, TAUGHT, ["fr", "eiffel", "jp"], RiggedEditor([_paris_token(taught)]), _cfg())
    for r in res:  # one edit, one sweep: the same numbers on every deleted fact
        assert (r.scores.retention_n, r.scores.retention_acc_post) == (5, 4 / 5)  # fr3 broken of 5 others
        assert r.scores.retention_drop == pytest.approx(1 / 5)


def test_no_change_means_no_drop_and_the_before_comes_from_the_filter(taught):
    # a loose rule keeps the untaught fact as known: the before accuracy is no longer 1 by construction
    plan, res, seen = _unit(taught, TAUGHT + [UNTAUGHT], ["jp"], RiggedEditor([]), _cfg(known_rank=10 ** 6))
    assert UNTAUGHT.id in plan.known and plan.known_top1[UNTAUGHT.id] is False
    s = res[0].scores
    assert s.retention_n == 8 and s.retention_acc_pre == s.retention_acc_post == 7 / 8 and s.retention_drop == 0.0
    assert list(seen["post"].values()).count(True) == 7


# ---------------------------------------------------------------------------------------------
# generation-based deletion scores


def fake_greedy(table):
    """A stand-in for :func:`probe.generate.greedy_texts`: the continuation of each prompt from
    ``table[(rigged?, prompt)]``; records the calls."""
    calls = []

    def greedy(model, prompts, *, max_new_tokens=8, batch_size=16):
        calls.append((bool(getattr(model, "rigged", False)), list(prompts), max_new_tokens))
        return [table[(bool(getattr(model, "rigged", False)), p)] for p in prompts]

    greedy.calls = calls
    return greedy


def test_generation_scores_count_only_what_the_unedited_model_generated(taught, monkeypatch):
    fr = TAUGHT[0]
    p1, p2 = fr.paraphrases
    table = {(False, fr.prompt): " Paris, the city of light", (True, fr.prompt): " London.",
             (False, p1): " Paris is nice", (True, p1): " the Parisian area, Paris",  # still says Paris
             (False, p2): " Rome", (True, p2): " Paris"}  # never generated before: not counted
    greedy = fake_greedy(table)
    monkeypatch.setattr(defenses.metrics, "greedy_texts", greedy)
    _, res, _ = _unit(taught, TAUGHT, ["fr"], RiggedEditor([]), _cfg(gen_tokens=36))
    s = res[0].scores
    assert s.generation_acc_pre == 1.0 and s.generation_efficacy == 1.0
    assert s.generation_paraphrase_acc_pre == 0.5 and s.generation_paraphrase_efficacy == 0.0
    # one batched call per state over prompt + paraphrases, with the configured token count
    assert [(c[0], c[1], c[2]) for c in greedy.calls if fr.prompt in c[1]] == [
        (False, [fr.prompt, p1, p2], 36), (True, [fr.prompt, p1, p2], 36)]


def test_a_fact_never_generated_has_no_generation_efficacy(taught, monkeypatch):
    jp = TAUGHT[3]
    (p1,) = jp.paraphrases
    table = {(False, jp.prompt): " Kyoto", (True, jp.prompt): " Osaka",
             (False, p1): " Japan", (True, p1): " Japan"}
    monkeypatch.setattr(defenses.metrics, "greedy_texts", fake_greedy(table))
    _, res, _ = _unit(taught, TAUGHT, ["jp"], RiggedEditor([]), _cfg(gen_tokens=36))
    s = res[0].scores
    assert s.generation_acc_pre == 0.0 and s.generation_efficacy is None  # not a success: never generated
    assert s.generation_paraphrase_acc_pre == 0.0 and s.generation_paraphrase_efficacy is None


def test_gen_tokens_zero_measures_no_generation(taught, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no generation with gen_tokens=0")

    monkeypatch.setattr(defenses.metrics, "greedy_texts", boom)
    _, res, _ = _unit(taught, TAUGHT, ["water"], RiggedEditor([]), _cfg(gen_tokens=0, random_n=0))
    s = res[0].scores
    assert s.generation_efficacy is None and s.generation_acc_pre is None and s.retention_n == 7


def test_real_generation_on_the_tiny_model_fills_the_pre_record(taught):
    cfg = _cfg(gen_tokens=4)
    _, res, _ = _unit(taught, TAUGHT, ["water"], RiggedEditor([]), cfg)
    # the taught model continues "Water is made of hydrogen and" with " oxygen" and the unedited
    # copy is unchanged by the empty rig: nothing deleted
    assert res[0].scores.generation_acc_pre == 1.0 and res[0].scores.generation_efficacy == 0.0


def test_prompts_without_room_for_the_generated_tokens_are_refused(taught):
    from probe.errors import PromptTooLongError

    limit = taught.context_length
    long = Fact("long", " ".join(["Paris"] * (limit - 10)), "France")
    check_generation_lengths(taught, [long], 0)  # off: nothing to check
    check_generation_lengths(taught, [long], 8)
    with pytest.raises(PromptTooLongError, match="--gen-tokens"):
        check_generation_lengths(taught, [long], 36)
