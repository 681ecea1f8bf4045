"""Attack controls (probe.controls) and their scoring by the lens attacks, on tiny random models."""

from __future__ import annotations

import pytest

from attacks import AttackContext, evaluate_attacks, make_attack, summarize
from probe.controls import ANY_RELATION, RELATION, check_relations, choose_controls, control_label, Control
from probe.errors import InputError
from probe.facts import Fact
from probe.tokens import answer_ids


def _fact(i, prompt, answer, relation=None, subject=None, line=None):
    return Fact(id=str(i), prompt=prompt, answer=answer, relation=relation, subject=subject,
                source=f"facts.jsonl:{line or i}")


CAPITALS = [_fact(1, "The capital of France is", "Paris", "capital", "France"),
            _fact(2, "The capital of Japan is", "Tokyo", "capital", "Japan"),
            _fact(3, "The capital of Italy is", "Rome", "capital", "Italy"),
            _fact(4, "The capital of Germany is", "Berlin", "capital", "Germany")]
# (answers chosen so that their first tokens differ under the tiny tokenizer)
LANDMARKS = [_fact(5, "The Colosseum is in", "Rome", "landmark", "Colosseum"),
             _fact(6, "The Pyramids are near", "Cairo", "landmark", "Pyramids")]


def test_control_is_another_answer_of_the_same_relation(tiny_tokenizer):
    pool = CAPITALS + LANDMARKS
    ctl = choose_controls(pool, pool, tiny_tokenizer, seed=0)
    for f in pool:
        c = ctl[f.id]
        same = {g.answer for g in pool if g.relation == f.relation} - {f.answer}
        assert c.source == RELATION and c.answer in same
    # the landmark facts have exactly one other answer each
    assert ctl["5"].answer == "Cairo" and ctl["6"].answer == "Rome"
    assert control_label(ctl) == RELATION


def test_control_is_seeded_per_fact_and_independent_of_the_other_attacked_facts(tiny_tokenizer):
    pool = CAPITALS + LANDMARKS
    all_at_once = choose_controls(pool, pool, tiny_tokenizer, seed=3)
    alone = choose_controls([CAPITALS[2]], pool, tiny_tokenizer, seed=3)
    assert alone["3"] == all_at_once["3"]
    draws = {choose_controls([CAPITALS[0]], pool, tiny_tokenizer, seed=s)["1"].answer for s in range(20)}
    assert draws == {"Tokyo", "Rome", "Berlin"}  # every other capital is reachable, none is the answer


def test_control_never_in_prompt_never_the_answer_never_the_models_top_token(tiny_tokenizer):
    f = _fact(7, "Paris is not the capital of Italy; the capital of Italy is", "Rome", "capital", "Italy")
    pool = CAPITALS + [f]
    berlin = answer_ids(tiny_tokenizer, f.prompt, "Berlin")[0]
    got = {choose_controls([f], pool, tiny_tokenizer, seed=s, top_tokens={"7": berlin})["7"].answer for s in range(10)}
    # Rome is the answer, Paris is in the prompt, Berlin starts with the model's top token
    assert got == {"Tokyo"}


def test_fallback_to_any_relation_when_the_relation_has_no_usable_answer(tiny_tokenizer):
    twins = [_fact(8, "The capital of Vatican City is", "Rome", "enclave", "Vatican City"),
             _fact(9, "San Marino is surrounded by the capital", "Rome", "enclave", "San Marino")]
    pool = CAPITALS + twins
    c = choose_controls([twins[0]], pool, tiny_tokenizer, seed=0)["8"]
    assert c.source == ANY_RELATION and c.answer in {"Paris", "Tokyo", "Berlin"}
    assert control_label({"8": c, "1": Control("Tokyo", RELATION)}) == "relation (1 any-relation)"


def test_facts_without_relation_get_any_relation_controls(tiny_tokenizer):
    plain = [_fact(i, f.prompt, f.answer) for i, f in enumerate(CAPITALS)]
    ctl = choose_controls(plain, plain, tiny_tokenizer)
    assert {c.source for c in ctl.values()} == {ANY_RELATION}
    assert all(ctl[f.id].answer != f.answer for f in plain)


def test_single_fact_relation_is_refused_with_file_line_field(tiny_tokenizer):
    lone = _fact(10, "The largest ocean is the", "Pacific", "ocean", "largest ocean", line=12)
    with pytest.raises(InputError) as e:
        choose_controls([lone], CAPITALS + [lone], tiny_tokenizer)
    msg = str(e.value)
    assert "facts.jsonl" in msg and "12" in msg and "relation" in msg and "single fact" in msg
    check_relations(CAPITALS, CAPITALS + [lone])  # not attacked: no control needed, no error


def test_lens_attacks_score_the_control_on_the_same_sweep(tiny_llama):
    model = tiny_llama
    n = model.n_layers
    facts = CAPITALS
    ctl = {f.id: c for f, c in zip(facts, ["Tokyo", "Paris", "Berlin", None]) if c}
    hp = make_attack("head-projection", k=4, layers=[0, n - 1])
    pd = make_attack("probability-delta", k=2, layers=[0, n - 1])
    reads, outs = evaluate_attacks(model, facts, [hp, pd], AttackContext(controls=ctl))
    for i, f in enumerate(facts):
        r, o = reads["logit"][i], outs["head-projection"][i]
        assert o.best_rank == min(r.rank[0], r.rank[-1])
        assert o.hidden_rank == r.rank[0] and o.hidden == (r.rank[0] <= 4)  # output layer removed
        assert o.output == (r.rank[-1] <= 4)
        if f.id in ctl:
            assert o.control_rank == min(r.control_rank[0], r.control_rank[-1])
            assert o.control == (o.control_rank <= 4) and o.hidden_control == (r.control_rank[0] <= 4)
            # the control's ranks are its own: at the output, exactly one token holds each rank
            assert r.control_rank[-1] != r.rank[-1]
        else:
            assert o.control is None and r.control_rank is None
        # PD on two layers with the output removed reads no pair: never a hidden-only success
        assert outs["probability-delta"][i].hidden is False
    s = summarize(hp, n, outs["head-projection"], control=RELATION)
    assert s.n_control == 3 and s.control == RELATION
    assert s.success_control_pre == sum(o.control for o in outs["head-projection"][:3]) / 3
    assert s.excess == pytest.approx(s.success_pre - s.success_control)
    assert s.budget_hidden == 4 and hp.budget(n) == 8
