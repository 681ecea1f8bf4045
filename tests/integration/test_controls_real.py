"""Attack numbers a reviewer can trust, on the real SmolLM2 (issue 11): controls next to every
success, hidden-only success of the lens attacks, the text paper's known-fact rule."""

from __future__ import annotations

import pytest

from probe.facts import Fact, load_facts
from probe.jobs import RunConfig, run_main
from probe.jobs.deletion import is_known
from probe.readout import lens_readout

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def erased(smollm2, tmp_path_factory):
    """Fact erasure (constrained FT, the defaults) of 6 built-in facts, evenly spaced, attacked by
    the logit-lens attacks and by the tuned-lens attack (a small tuned lens trained here: least-
    squares warm start on 4k tokens + 60 Adam steps, cached in a temporary cache)."""
    import os

    from probe.lens_training import get_tuned_lens

    old = os.environ.get("PROBE_ATTACK_CACHE")
    os.environ["PROBE_ATTACK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        get_tuned_lens(smollm2, retrain=True, minutes=None, steps=60, train_tokens=4096, heldout_tokens=256,
                       adam_tokens=2048, seq_len=64, batch=64)
        cfg = RunConfig(attacks=["head-projection", "probability-delta", "pd2", "tuned-lens"], max_facts=6,
                        progress=False)
        return run_main(smollm2, load_facts(), tmp_path_factory.mktemp("fe") / "out", cfg)
    finally:
        if old is None:
            os.environ.pop("PROBE_ATTACK_CACHE", None)
        else:
            os.environ["PROBE_ATTACK_CACHE"] = old


def test_fact_erasure_lowers_head_projection_and_reports_its_excess_over_the_control(erased):
    hp = erased.attacks["head-projection"]
    assert hp.n_facts == 6 and hp.n_control == 6 and hp.control == "relation"
    assert hp.success_pre == 1.0 and hp.success_post <= 0.5
    # the control (another answer of the relation, not given by the model) is a candidate far less
    # often than the answer before the edit (measured: 2 of 6 -- other capitals are in the top 4
    # of late layers), and no more often after it
    assert hp.success_control_pre <= 2 / 6 and hp.success_pre - hp.success_control_pre >= 0.5
    assert hp.success_control <= 2 / 6
    assert hp.excess == pytest.approx(hp.success_post - hp.success_control)
    for r in erased.facts:
        assert r.control_source == "relation" and r.control != r.answer and r.relation
        o = r.outcomes["head-projection"]["post"]
        assert o.control == (o.control_rank <= 4)


def test_hidden_only_success_is_reported_and_the_output_layer_is_most_of_it(erased):
    for name in ("head-projection", "probability-delta", "pd2"):
        a = erased.attacks[name]
        assert a.budget_hidden == a.budget - a.k * (2 if name != "head-projection" else 1)
        assert a.success_hidden_post is not None and a.success_hidden_post <= a.success_post
    hp = erased.attacks["head-projection"]
    # before the edit the answer is the output's top-1 (known filter), so the output alone succeeds
    assert hp.success_output_pre == 1.0
    assert hp.success_hidden_post <= hp.success_output_post + 1 / 6


def test_tuned_lens_attack_after_fact_erasure_is_at_least_the_logit_lens(erased):
    tuned, logit = erased.attacks["tuned-lens"], erased.attacks["head-projection"]
    assert tuned.budget == logit.budget == 20 and tuned.readout == "tuned lens"
    assert tuned.success_post >= logit.success_post
    assert tuned.n_control == 6 and tuned.excess == pytest.approx(tuned.success_post - tuned.success_control)


def test_known_reference_rule(smollm2):
    """The text paper's filter: p(answer) > 0.02 and the answer in the greedy 36-token continuation."""
    facts = [Fact("a", "The capital of France is", "Paris"), Fact("b", "The capital of France is", "Berlin"),
             Fact("c", "The chemical symbol for gold is", "Au")]
    reads = lens_readout(smollm2, [f.prompt for f in facts], [f.answer for f in facts])
    cfg = RunConfig(known="reference")
    assert is_known(smollm2, facts, reads, cfg) == [True, False, True]
