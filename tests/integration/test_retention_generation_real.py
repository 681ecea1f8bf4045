"""Retention on every other known fact and generation-based deletion success on the real SmolLM2
(issue 12 items 4 and 5): one fact-erasure edit (constrained FT, the defaults) of "The capital of
France is -> Paris", among 21 built-in facts (capitals, city-country, landmark-city)."""

from __future__ import annotations

import pytest

from probe.facts import load_facts
from probe.jobs import RunConfig, build_plan, known_facts, measure_deletion, measure_pre
from probe.jobs.deletion import attack_context
from probe.readout import lens_readout

pytestmark = pytest.mark.real

RELATIONS = ("capital", "city-country", "landmark-city")


@pytest.fixture(scope="module")
def erased(smollm2):
    from defenses.retain import retain_prompts

    facts = [f for f in load_facts() if f.relation in RELATIONS]
    cfg = RunConfig(attacks=[], random_n=0, progress=False)  # gen_tokens: the default 36
    plan = build_plan(smollm2, [], ["fact-erasure"], cfg)
    plan.pool = facts
    ctx = attack_context(plan, [], cfg)
    known, n_known = known_facts(smollm2, facts, plan, cfg, ctx)
    fact, read, lens_out = next(k for k in known if k[0].id == "bf-capital-france")
    pre = measure_pre(smollm2, fact, read, lens_out, plan, ctx, cfg)
    objective, _ = plan.defenses["fact-erasure"]
    retain = retain_prompts(fact, facts, cfg.retain_size, sim_frac=cfg.retain_similar, seed=cfg.seed)
    seen = {}

    def during(edited, f):  # an independent count: the full all-layer lens sweep of the edited model
        others = [g for g in facts if g.id in plan.known and g.id != f.id]
        reads = lens_readout(edited, [g.prompt for g in others], [g.answer for g in others])
        seen["top1"] = {g.id: r.rank[-1] == 1 for g, r in zip(others, reads)}

    res = measure_deletion(smollm2, [fact], [pre], "fact-erasure", plan, objective.request(fact, facts, retain), cfg,
                           ctx_for=lambda: attack_context(plan, [fact.id], cfg), during_edit=during)[0]
    return n_known, pre, res, seen


def test_retention_is_measured_on_every_other_known_fact(erased):
    n_known, _, res, seen = erased
    s = res.scores
    assert n_known == 21 and s.retention_n == 20 and s.retention_acc_pre == 1.0
    lost = [k for k, ok in seen["top1"].items() if not ok]
    assert s.retention_drop == pytest.approx(len(lost) / 20)
    # measured: 1 of 20 (Italy's capital Rome leaves the top-1 when France's capital is erased)
    assert s.retention_drop <= 0.15


def test_generation_efficacy_after_fact_erasure(erased):
    _, pre, res, _ = erased
    s = res.scores
    # the unedited model generates Paris from the prompt and from 2 of its 3 paraphrases (not from
    # "The seat of government of France is in")
    assert pre.generation == [True, True, True, False]
    assert s.generation_acc_pre == 1.0 and s.generation_paraphrase_acc_pre == pytest.approx(2 / 3)
    # measured: no continuation of the edited model names Paris any more (prompt and both paraphrases)
    assert s.generation_efficacy == 1.0 and s.generation_paraphrase_efficacy >= 0.5
    assert s.rewrite_score > 0.9  # the teacher-forced score next to it (measured 0.95)
