"""Leak-free retain sets (defenses/retain.py, issue 12 item 1)."""

from __future__ import annotations

import re

import pytest

from defenses.retain import (SIMILARITY_MAX, RetainPool, leak_reasons, leaks, pool_for, retain_prompts,
                             similarity)
from probe.facts import Fact, load_counterfact, load_facts

DS = Fact("ds", "Nintendo DS Lite, created by", "Nintendo",
          paraphrases=["In the year 2020 the biggest city and seat of government of this island nation was"],
          neighborhood=[{"prompt": "Game Boy Advance, created by", "answer": "Nintendo"}],
          subject="Nintendo DS Lite", relation="P178")


@pytest.mark.parametrize("prompt,answer,subject,relation,reason", [
    ("Game Boy Advance, created by", "Nintendo", None, None, "own prompt"),  # an evaluated neighbour
    ("Nintendo DS Lite, developed by", "Nintendo", "nintendo ds lite", "P178", "same relation and subject"),
    ("Nintendo DS Lite was released in", "2006", "Nintendo DS Lite", "P577", "same subject"),
    ("The NINTENDO DS LITE is sold in", "Japan", None, None, "subject in text"),
    ("The mother tongue of Lite is", "English", "Lite", "P103", "candidate subject in deleted prompt"),
    ("Wii U, developed by", "nintendo.", None, None, "same answer"),           # normalised equal
    ("Super Mario Bros., created by", "Nintendo EAD", None, None, "same answer"),  # first token shared
    ("Mario is the mascot of Nintendo, the Japanese firm from", None, None, None, "answer in text"),  # no answer given
    ("In the year 2021 the biggest city and seat of government of this island nation was", "Tokyo", None, None,
     "similar"),
])
def test_each_leak_reason(prompt, answer, subject, relation, reason):
    assert leaks(DS, prompt, answer, subject, relation) == reason
    assert leak_reasons(DS, prompt, answer, subject, relation)[0] == reason


def test_clean_candidates_are_kept():
    # same template, other subject and answer: what the similar half is for
    assert leaks(DS, "PlayStation Portable, created by", "Sony", "PlayStation Portable", "P178") is None
    # "Lite" inside a longer word, "Nintendo" inside another token: whole words only
    assert leaks(DS, "Xbox Lites, created by", "Microsoft") is None
    assert leaks(DS, "Nintendos fan club is based in", "Kyoto") is None


def test_leak_reasons_lists_every_reason():
    assert leak_reasons(DS, "Nintendo DS Lite, created by", "Nintendo", "Nintendo DS Lite", "P178") == [
        "own prompt", "same relation and subject", "same subject", "same answer", "subject in text",
        "candidate subject in deleted prompt", "answer in text", "similar"]
    assert leak_reasons(DS, "PlayStation Portable, created by", "Sony", "PlayStation Portable", "P178") == []


def test_similarity_values_and_threshold():
    # 4 shared words + 2 shared bigrams of 12 distinct features: one template, another subject
    assert similarity("The capital of France is", "The capital of Mexico is") == pytest.approx(6 / 12)
    assert similarity("The capital of France is", "the CAPITAL of France, is") == 1.0
    # 14 words + 15 bigrams each; all shared but "2020"/"2021" and the two bigrams around it
    assert similarity(DS.paraphrases[0], DS.paraphrases[0].replace("2020", "2021")) == pytest.approx(26 / 32)
    assert 26 / 32 > SIMILARITY_MAX > 0.78  # above the most similar one-template pair of CounterFact


def _facts():
    def mk(i, p, a, s, r, nb=()):
        return Fact(i, p, a, neighborhood=[{"prompt": q, "answer": x} for q, x in nb], subject=s, relation=r)

    return [
        mk("fr", "The capital of France is", "Paris", "France", "capital", [("The capital of Spain is", "Madrid")]),
        mk("jp", "The capital of Japan is", "Tokyo", "Japan", "capital", [("The capital of Peru is", "Lima")]),
        mk("it", "The capital of Italy is", "Rome", "Italy", "capital"),
        mk("fr-lang", "The official language of France is", "French", "France", "language"),
        mk("louvre", "The Louvre is located in the city of", "Paris", "The Louvre", "city",
           [("Notre-Dame de Paris is a cathedral in", "France")]),
        mk("tokyo-tower", "Tokyo Tower is in the country of", "Japan", "Tokyo Tower", "country"),
        mk("de-river", "The river through Berlin is the", "Spree", "Berlin", "river"),
    ]


def test_retain_prompts_leak_free_similar_first_and_seeded():
    facts = _facts()
    fr = facts[0]
    got = retain_prompts(fr, facts, 3, sim_frac=1.0)
    # "The capital of Spain is" is fr's own neighbour; the France, Louvre (answer Paris) and
    # Notre-Dame (Paris in the text) prompts leak; what is left, most similar first
    assert got == ["The capital of Italy is", "The capital of Japan is", "The capital of Peru is"]
    pool = RetainPool(facts)
    assert pool.leak_free(fr) == sorted(["The capital of Italy is", "The capital of Japan is",
                                         "The capital of Peru is", "The river through Berlin is the",
                                         "Tokyo Tower is in the country of"])
    assert len(pool) == 10
    # the similar half, then a seeded draw from the rest; the same seed gives the same set
    a = retain_prompts(fr, facts, 4, sim_frac=0.5, seed=1)
    assert a[:2] == ["The capital of Italy is", "The capital of Japan is"]
    assert a == retain_prompts(fr, facts, 4, sim_frac=0.5, seed=1, pool=pool)
    draws = {tuple(retain_prompts(fr, facts, 3, sim_frac=0.0, seed=s)) for s in range(12)}
    assert len(draws) > 1 and all(set(d) <= set(pool.leak_free(fr)) for d in draws)
    # a pool smaller than the size asked comes back whole; size 0 gives nothing
    assert retain_prompts(fr, facts, 50) == pool.leak_free(fr)
    assert retain_prompts(fr, facts, 0) == []
    # Tokyo Tower names Japan's answer: leaks for Japan, fine for Italy
    assert "Tokyo Tower is in the country of" not in pool.leak_free(facts[1])
    assert pool.leak_free_all([facts[0], facts[1]]) == ["The capital of Italy is", "The river through Berlin is the"]


def test_pool_is_built_once_per_fact_list():
    facts = _facts()
    assert pool_for(facts) is pool_for(facts)
    assert pool_for(facts) is not pool_for(list(reversed(facts)))


def _brute_leak_free(pool: RetainPool, fact: Fact) -> list[str]:
    return [p for p in pool.prompts
            if all(leaks(fact, c.prompt, c.answer, c.subject, c.relation) is None for c in pool.where(p))]


def test_prefilter_equals_the_predicate_on_builtin_facts():
    facts = load_facts(None)
    pool = RetainPool(facts)
    for f in facts[::10]:
        assert pool.leak_free(f) == _brute_leak_free(pool, f), f.id


def _mentions(text: str, phrase: str) -> bool:
    """Independent of probe.matching: case-insensitive whole-word substring."""
    return re.search(r"(?<!\w)" + re.escape(phrase.casefold().strip()) + r"(?!\w)", text.casefold()) is not None


def test_no_leaking_retain_prompt_on_all_counterfact(counterfact_path):
    facts = load_counterfact(counterfact_path)
    assert len(facts) == 1400
    pool = RetainPool(facts)
    for f in facts:
        own = {f.prompt, *f.paraphrases, *(n["prompt"] for n in f.neighborhood)}
        similar = retain_prompts(f, facts, 4, sim_frac=1.0, seed=0, pool=pool)  # the jobs' defaults
        drawn = retain_prompts(f, facts, 4, sim_frac=0.0, seed=0, pool=pool)
        assert len(similar) == len(drawn) == 4, f.id
        for p in similar + drawn:
            assert p not in own
            assert not _mentions(p, f.subject) and not _mentions(p, f.answer), (f.id, p)
            for c in pool.where(p):
                assert leaks(f, p, c.answer, c.subject, c.relation) is None, (f.id, p)
                assert c.answer.casefold().strip() != f.answer.casefold().strip(), (f.id, p)
                assert (c.subject or "").casefold() != f.subject.casefold(), (f.id, p)
                assert max(similarity(p, r) for r in own) <= SIMILARITY_MAX, (f.id, p)
    # before the leak-free pool, 594 of the 1,400 facts had a retain prompt with the deleted answer
    # (scripts/retain_leaks.py); the prefilter agrees with the predicate on a few facts
    for f in facts[::467]:
        assert pool.leak_free(f) == _brute_leak_free(pool, f), f.id
