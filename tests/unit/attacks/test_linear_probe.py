"""The fair ``linear-probe`` attack (issue 11 item 5): per-relation probes, the skip rule, the
relation-prior control, and the per-relation cross-validation against that prior.

The attack is tested on synthetic residual streams (``probe.probes.probe_dataset`` replaced by a
table keyed by fact id, with a planted linear signal), and end to end once on a tiny random model.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from attacks.base import ATTACKS, AttackContext, summarize
from attacks.linear_probe import LinearProbeAttack
from probe.facts import Fact
from probe.probes import (ANY_RELATION, ANY_RELATION_NOTE, fact_relations, prior_order, probe_cv_report,
                          relation_cv)

N_LAYERS, D, PLANTED = 4, 16, 2


class _FakeModel:
    n_layers = N_LAYERS


def _facts(spec: dict[str, dict[str, int]]) -> list[Fact]:
    """``{relation: {answer: count}}`` -> facts ``"{relation}/{answer}/{j}"`` in relation order."""
    return [Fact(id=f"{rel}/{a}/{j}", prompt=f"q {rel} {a} {j}", answer=a, relation=rel)
            for rel, answers in spec.items() for a, n in answers.items() for j in range(n)]


@pytest.fixture
def synthetic(monkeypatch):
    """Replace the residual-stream reader by a table: every answer has a mean direction planted at
    layer ``PLANTED`` (strength 4, unit noise elsewhere); records every read and every training set."""
    rng = np.random.default_rng(0)
    means: dict[str, np.ndarray] = {}
    table: dict[str, np.ndarray] = {}
    reads: list[list[str]] = []
    trained: list[list[str]] = []

    def resid(f):
        if f.id not in table:
            x = rng.normal(size=(N_LAYERS, D)).astype(np.float32)
            x[PLANTED] += 4.0 * means.setdefault(f.answer, rng.normal(size=D))
            table[f.id] = x
        return table[f.id]

    def fake_dataset(model, fs, layers=None, **kw):
        reads.append([f.id for f in fs])
        layers = list(range(N_LAYERS)) if layers is None else list(layers)
        return np.stack([resid(f)[layers] for f in fs]), [f.answer for f in fs]

    import probe.probes as pp
    real_train = pp.train_probes

    def spy_train(X, labels, layers=None, **kw):
        rows = [next(fid for fid, x in table.items() if np.array_equal(x[layers], row)) for row in X]
        trained.append(rows)
        return real_train(X, labels, layers, **kw)

    monkeypatch.setattr("probe.probes.probe_dataset", fake_dataset)
    monkeypatch.setattr("attacks.linear_probe.train_probes", spy_train)
    return {"reads": reads, "trained": trained}


def test_registered_name_readout_control_kind():
    a = LinearProbeAttack()
    assert ATTACKS["linear-probe"] is LinearProbeAttack and a.readout == "probe" and a.kind == "whitebox"
    assert a.control_kind == "relation prior" and a.max_train == 200 and "control_kind" not in a.config()
    assert a.budget(30) == 20 and a.attack_layers(30) == [10, 15, 20, 24, 29]


def test_per_relation_training_candidates_and_cache(synthetic):
    facts = _facts({"capital": {"Paris": 6, "Tokyo": 6, "Rome": 6, "Lisbon": 1},
                    "language": {"French": 6, "Japanese": 6, "Italian": 6}})
    attacked = [f for f in facts if f.id.endswith("/0")]  # one per answer, Lisbon's only fact included
    deleted = frozenset(f.id for f in attacked) | {"capital/Paris/1"}  # a deleted, non-attacked fact
    ctx = AttackContext(facts=facts, deleted=deleted)
    attack = LinearProbeAttack(layers=[0, PLANTED], k=1)
    out = attack.run(_FakeModel(), attacked, ctx)
    by_id = {f.id: o for f, o in zip(attacked, out)}
    # trained twice (one pool per relation), each on exactly the relation's other, non-deleted facts
    expected = {rel: sorted(f.id for f in facts if f.relation == rel and f.id not in deleted)
                for rel in ("capital", "language")}
    assert sorted(sorted(t) for t in synthetic["trained"]) == sorted(expected.values())
    for rows in synthetic["trained"]:
        assert not set(rows) & deleted  # never an attacked or deleted fact
    assert by_id["capital/Lisbon/0"].skipped == "answer has < 2 training examples"
    for f, o in zip(attacked, out):
        if o.skipped:
            continue
        rel_answers = {g.answer for g in facts if g.relation == f.relation}
        assert o.success and o.best_rank == 1 and o.details["ranks_at_L"][1] == 1  # the planted layer
        assert o.details["relation"] == f.relation and o.details["n_classes"] == 3
        assert set(o.details["candidates"]) <= rel_answers  # another relation's answer is never a candidate
        assert o.details["n_train"] == len(expected[f.relation])
        assert len(o.layer_ranks) == N_LAYERS and max(o.layer_ranks) <= 3  # ranks among 3 classes only
    # the prior counts the pool: capital = Rome 5, Tokyo 5, Paris 4 (one Paris deleted) -> ties by name
    cap = by_id["capital/Paris/0"]
    assert cap.control_rank == 3 and cap.details["prior"] == ["Rome", "Tokyo", "Paris"][:len(cap.details["candidates"])]
    s = summarize(attack, N_LAYERS, out)
    assert s.n_skipped == 1 and s.n_facts == 6 and s.control == "relation prior" and s.success_pre == 1.0
    # second call on the same model state: nothing read, nothing trained again
    n_reads, n_trained = len(synthetic["reads"]), len(synthetic["trained"])
    again = attack.run(_FakeModel(), attacked, ctx)
    assert len(synthetic["reads"]) == n_reads and len(synthetic["trained"]) == n_trained
    assert all(o.details["cached_probes"] for o in again if not o.skipped)
    assert [o.best_rank for o in again] == [o.best_rank for o in out]
    json.dumps([o.to_json() for o in out])


def test_skip_rule_counts_training_examples_only(synthetic):
    # "Rome" has 3 facts: attacking one and deleting another leaves 1 training example -> skipped;
    # "Tokyo" has 3: attacking one leaves 2 -> scored
    facts = _facts({"capital": {"Paris": 5, "Tokyo": 3, "Rome": 3}})
    ctx = AttackContext(facts=facts, deleted=frozenset({"capital/Rome/0", "capital/Rome/1", "capital/Tokyo/0"}))
    attacked = [facts[5], facts[8]]  # Tokyo/0, Rome/0
    assert [f.id for f in attacked] == ["capital/Tokyo/0", "capital/Rome/0"]
    tokyo, rome = LinearProbeAttack(layers=[PLANTED]).run(_FakeModel(), attacked, ctx)
    assert tokyo.skipped is None and tokyo.best_rank == 1
    assert rome.skipped == "answer has < 2 training examples" and rome.control is None
    # min_examples is the rule: at 3, Tokyo (2 left) is skipped too, and the reason says so
    (t3,) = LinearProbeAttack(layers=[PLANTED], min_examples=3).run(_FakeModel(), attacked[:1], ctx)
    assert t3.skipped == "answer has < 3 training examples"


def test_prior_order_ties_and_control_on_hand_built_labels(synthetic):
    labels = ["A"] * 5 + ["C"] * 3 + ["B"] * 3 + ["E"] * 2 + ["D"] * 2 + ["F"]
    assert prior_order(labels) == ["A", "B", "C", "D", "E", "F"]  # ties by name, ascending
    shuffled = labels[:]
    random.Random(1).shuffle(shuffled)
    assert prior_order(shuffled) == prior_order(labels)
    assert prior_order(labels, ["F", "E", "B", "Z"]) == ["B", "E", "F"]  # restricted to classes
    # the attack's control: same labels as the training pool, one extra fact per answer attacked;
    # one layer and k=2 -> candidate sets of exactly 2 -> control = answer among the prior's first 2
    spec = {"r": {"A": 6, "C": 4, "B": 4, "E": 3, "D": 3, "F": 2}}
    facts = _facts(spec)
    attacked = [f for f in facts if f.id.endswith("/0")]
    ctx = AttackContext(facts=facts, deleted=frozenset(f.id for f in attacked))
    out = LinearProbeAttack(layers=[0], k=2).run(_FakeModel(), attacked, ctx)
    got = {f.answer: o for f, o in zip(attacked, out)}
    assert got["F"].skipped  # 1 training example
    assert {a: got[a].control_rank for a in "ABCDE"} == {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5}
    assert {a: got[a].control for a in "ABCDE"} == {"A": True, "B": True, "C": False, "D": False, "E": False}
    assert all(got[a].details["prior"] == ["A", "B"] for a in "ABCDE")
    # several layers: the prior gets as many candidates as the probe's (de-duplicated) union
    out2 = LinearProbeAttack(layers=[0, 1, 3], k=2).run(_FakeModel(), attacked, ctx)
    for o in out2:
        if not o.skipped:
            m = len(o.details["candidates"])
            assert 2 <= m <= 6 and o.details["prior"] == list("ABCDE")[:m]
            assert o.control == (o.control_rank <= m)


def test_no_relations_anywhere_is_one_relation_any(synthetic):
    facts = [Fact(id=f"{a}{j}", prompt=f"q {a} {j}", answer=a) for a in ("X", "Y") for j in range(4)]
    assert fact_relations(facts) == ([ANY_RELATION] * 8, ANY_RELATION_NOTE)
    ctx = AttackContext(facts=facts, deleted=frozenset({"X0"}))
    (o,) = LinearProbeAttack(layers=[PLANTED]).run(_FakeModel(), facts[:1], ctx)
    assert o.details["relation"] == "any" and o.details["relation_note"] == ANY_RELATION_NOTE
    assert o.details["n_train"] == 7 and o.best_rank == 1


def test_fact_without_relation_among_related_facts(synthetic):
    facts = _facts({"r": {"X": 4, "Y": 4}})
    stray = [Fact(id=f"stray{j}", prompt=f"q stray {j}", answer="X") for j in range(3)]
    ctx = AttackContext(facts=facts + stray, deleted=frozenset({"stray0", "r/X/0"}))
    assert fact_relations(facts + stray)[1] is None
    out = LinearProbeAttack(layers=[PLANTED]).run(_FakeModel(), [stray[0], facts[0]], ctx)
    assert out[0].skipped == "fact has no relation"
    assert out[1].skipped is None and out[1].details["n_train"] == 7  # the strays are not in r's pool
    assert all(not r.startswith("stray") for rows in synthetic["trained"] for r in rows)


def test_max_train_caps_each_relation_evenly(synthetic):
    facts = _facts({"r": {"X": 30, "Y": 30}})
    ctx = AttackContext(facts=facts, deleted=frozenset({"r/X/0"}))
    attack = LinearProbeAttack(layers=[PLANTED], max_train=10)
    pool = attack.training_pool("r", facts[:1], ctx)
    assert len(pool) == 10 and {f.answer for f in pool} == {"X", "Y"} and facts[0] not in pool
    (o,) = attack.run(_FakeModel(), facts[:1], ctx)
    assert o.details["n_train"] == 10 and synthetic["trained"] == [[f.id for f in pool]]


def test_empty_pool_skips_instead_of_failing(synthetic):
    facts = _facts({"r": {"X": 2, "Y": 2}})
    out = LinearProbeAttack(layers=[0]).run(_FakeModel(), facts, AttackContext(facts=facts,
                                                                                deleted=frozenset(f.id for f in facts)))
    assert [o.skipped for o in out] == ["answer has < 2 training examples"] * 4 and not synthetic["reads"]


# ------------------------------------------------------------------------------------------
# cross-validated accuracy per relation vs the prior


def _planted_relation(answers: dict[str, int], signal: bool, rng) -> tuple[np.ndarray, list[str]]:
    labels = [a for a, n in answers.items() for _ in range(n)]
    X = rng.normal(size=(len(labels), N_LAYERS, D)).astype(np.float32)
    if signal:
        means = {a: rng.normal(size=D) for a in answers}
        for i, a in enumerate(labels):
            X[i, PLANTED] += 4.0 * means[a]
    return X, labels


def test_relation_cv_prior_and_planted_layer():
    rng = np.random.default_rng(0)
    Xa, ya = _planted_relation({"A": 12, "B": 8}, True, rng)  # prior top-1 = A: 12/20
    Xb, yb = _planted_relation({"P": 10, "Q": 10, "R": 10, "S": 1}, False, rng)  # S: never a class
    X = np.concatenate([Xa, Xb, rng.normal(size=(1, N_LAYERS, D)).astype(np.float32)])
    labels = ya + yb + ["lonely"]
    rels = ["a"] * 20 + ["b"] * 31 + ["c"]
    cv = relation_cv(X, labels, rels, folds=4, layers=[10, 11, 12, 13], k=1)
    ra, rb = cv["relations"]["a"], cv["relations"]["b"]
    assert ra["n_scored"] == 20 and ra["stratified"] and ra["prior"] == pytest.approx(0.6)
    assert ra["accuracy"][PLANTED] == 1.0 and max(np.delete(ra["accuracy"], PLANTED)) < 0.9
    # b: no signal, 3 balanced classes; S (one example) is skipped; prior top-1 = the tie-broken
    # most frequent answer of each training part: never far from 1/3
    assert rb["n_scored"] == 30 and rb["n_classes"] == 4 and 0.2 <= rb["prior"] <= 0.45
    assert cv["n"] == 50 and cv["n_skipped"] == 2 and "c" not in cv["relations"]  # S and the lone relation c
    assert cv["layers"] == [10, 11, 12, 13] and cv["k"] == 1
    pooled = (np.array(ra["accuracy"]) * 20 + np.array(rb["accuracy"]) * 30) / 50
    assert np.allclose(cv["accuracy"], pooled) and cv["prior"] == pytest.approx((0.6 * 20 + rb["prior"] * 30) / 50)
    assert cv["accuracy_at_k"] == cv["accuracy"] and cv["prior_at_k"] == cv["prior"]  # k = 1
    assert json.loads(json.dumps(cv)) == cv
    cv2 = relation_cv(X, labels, rels, folds=4, k=2)
    assert cv2["relations"]["a"]["prior_at_k"] == 1.0 and cv2["relations"]["a"]["accuracy_at_k"] == [1.0] * N_LAYERS
    with pytest.raises(ValueError):
        relation_cv(X, labels[:-1], rels)


def test_probe_cv_report_on_tiny_model(tiny_llama):
    countries = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]
    facts = [Fact(id=f"{c}{j}", prompt=f"The capital of {c} is" + "." * j, answer=a, relation="capital")
             for c, a in countries for j in range(4)]
    rep = probe_cv_report(tiny_llama, facts, folds=2, k=1)
    assert rep["layers"] == [0, 1] and rep["n"] == 12 and rep["relation_note"] is None
    assert rep["prior"] == pytest.approx(1 / 3)  # balanced: the alphabetically first answer of each part
    assert len(rep["accuracy"]) == 2 and json.loads(json.dumps(rep)) == rep
    # the attack end to end on the same model: trained on the other 11 facts, 3 classes
    ctx = AttackContext(facts=facts, deleted=frozenset({"France0"}))
    (o,) = LinearProbeAttack().run(tiny_llama, facts[:1], ctx)
    assert o.budget == 8 and len(o.layer_ranks) == 2 and o.details["n_train"] == 11
    assert o.details["n_classes"] == 3 and 1 <= o.best_rank <= 3 and o.control_rank == 3  # Paris: 3 left, fewest
