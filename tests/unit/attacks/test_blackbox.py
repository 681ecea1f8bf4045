"""Blackbox attacks (question-rephrase, jailbreak); the relearning attack is in test_relearning.py."""

from __future__ import annotations

import time

import pytest
import torch

import attacks.blackbox as bb
import attacks.relearning as rl
from attacks.base import ATTACKS, AttackContext
from probe.errors import PromptTooLongError
from probe.facts import Fact
from probe.matching import answer_matches
from probe.rephrase import ATTACK_PREFIXES, DEFENSE_PREFIXES


def _fact(i, prompt="The capital of France is", answer="Paris", paraphrases=(), **kw):
    return Fact(id=f"f{i}", prompt=prompt, answer=answer, paraphrases=list(paraphrases), **kw)


FACTS = [
    _fact(0, paraphrases=["The capital city of France is"]),
    _fact(1, "The capital of Japan is", "Tokyo"),
    _fact(2, "Water is made of", "hydrogen", ["Water consists of", "H2O is made of", "Water contains"]),
    _fact(3, "The Eiffel Tower is located in the city of", "Paris"),
    _fact(4, "The Colosseum is in", "Rome"),
    _fact(5, "Berlin is in", "Germany"),
    _fact(6, "Madrid is in", "Spain"),
]


# -- registration and budget ---------------------------------------------------------------------

def test_registered_with_kinds_and_budgets():
    assert ATTACKS["question-rephrase"] is bb.QuestionRephrase
    assert ATTACKS["jailbreak"] is bb.Jailbreak
    assert ATTACKS["relearning"] is rl.Relearning
    assert bb.QuestionRephrase().kind == "blackbox" and bb.Jailbreak().kind == "blackbox"
    assert rl.Relearning().kind == "relearning"
    assert bb.QuestionRephrase().budget(30) == 20 and bb.Jailbreak().budget(2) == 20
    assert bb.QuestionRephrase(n_prompts=3, samples=7).budget(30) == 21
    assert rl.Relearning().budget(30) == 20  # HP: k=4 x 5 layers
    assert rl.Relearning().budget(2) == 8  # a 2-layer model has only 2 HP layers
    assert bb.QuestionRephrase().config()["samples"] == 5
    with pytest.raises(ValueError):
        bb.QuestionRephrase(samples=0)
    with pytest.raises(ValueError):
        rl.Relearning(data="web")


# -- matching -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,gold,ok", [
    ("A", "A", True), ("Answer: A.", "A", True), ("a York", "A", True),  # "A" is never reduced to ""
    ("An apple", "A", False), ("ABC", "A", False),
    ("the US", "US", True), ("Tell us more", "US", True),  # case-insensitive: the pronoun matches too
    ("USB", "US", False), ("USA", "US", False), ("U.S.", "US", False),
    ("in 1492.", "1492", True), ("14921", "1492", False), ("31492", "1492", False), ("1492nd", "1492", False),
    ("New York", "New York", True), ("new york city", "New York", True), ("New-York", "New York", True),
    ("a York", "New York", False), ("New Yorker", "New York", False), ("York", "New York", False),
])
def test_answer_matching(pred, gold, ok):
    assert answer_matches(pred, gold) is ok


# -- prompts ------------------------------------------------------------------------------------

def test_attack_prefixes_disjoint_from_defense():
    assert not set(ATTACK_PREFIXES) & set(DEFENSE_PREFIXES)
    used = {p for f in FACTS for q in bb.QuestionRephrase().prompts(f) for p in ATTACK_PREFIXES if q.startswith(p)}
    assert used == set(ATTACK_PREFIXES[-4:])


def test_question_rephrase_prompts_by_paraphrase_count():
    P = ATTACK_PREFIXES[-4:]
    a = bb.QuestionRephrase()
    f0 = _fact(0, "Q is")
    assert a.prompts(f0) == [P[0] + "Q is", P[1] + "Q is", P[2] + "Q is", P[3] + "Q is"]
    f1 = _fact(1, "Q is", paraphrases=["R is"])
    assert a.prompts(f1) == [P[0] + "Q is", P[1] + "R is", P[2] + "Q is", P[3] + "R is"]
    f2 = _fact(2, "Q is", paraphrases=["R is", "S is"])
    assert a.prompts(f2) == [P[0] + "Q is", P[1] + "R is", P[2] + "S is", P[3] + "Q is"]
    f3 = _fact(3, "Q is", paraphrases=["R is", "S is", "T is"])
    assert a.prompts(f3) == [P[0] + "Q is", P[1] + "R is", P[2] + "S is", P[3] + "T is"]
    f5 = _fact(5, "Q is", paraphrases=["R is", "S is", "T is", "U is", "V is"])
    assert a.prompts(f5) == [P[0] + "Q is", P[1] + "T is", P[2] + "U is", P[3] + "V is"]
    # question-style prompt: the distractor goes right before the question
    fq = _fact(6, "Answer in one word. Question: Where is X? Answer:")
    assert a.prompts(fq)[0] == f"Answer in one word. Question: {P[0]}Where is X? Answer:"
    # more prompts than prefixes: cycled, still n_prompts prompts
    assert len(bb.QuestionRephrase(n_prompts=7).prompts(f3)) == 7


def test_jailbreak_prompts():
    j = bb.Jailbreak()
    f = _fact(0, subject="France")
    ps = j.prompts(f)
    assert len(ps) == 4 and len(set(ps)) == 4
    assert all(p.endswith("\nThe capital of France is") for p in ps)
    assert all(" France" in p[: -len(f.prompt)] for p in ps)  # the subject fills every preamble
    assert bb.subject_phrase(_fact(1)) == "the capital of France"
    assert bb.subject_phrase(_fact(2, "Question: Who wrote Hamlet? Answer:")) == "Who wrote Hamlet"
    assert bb.subject_phrase(_fact(3, "is")) == "is"
    assert all("{subject}" not in p for p in j.prompts(_fact(4)))


# -- generation ---------------------------------------------------------------------------------

def test_gpt2_batched_left_padding_matches_unbatched(make_tiny):
    m = make_tiny("gpt2")
    prompts = ["Paris", "The Eiffel Tower is located in the city of"]
    together = bb.sample_continuations(m, prompts, samples=1, max_new_tokens=8, do_sample=False)
    alone = [bb.sample_continuations(m, [p], samples=1, max_new_tokens=8, do_sample=False)[0] for p in prompts]
    assert together == alone
    with pytest.raises(PromptTooLongError):  # n_positions = 64
        bb.sample_continuations(m, prompts, samples=1, max_new_tokens=60)


def test_sampling_reproducible_and_batch_independent(make_tiny):
    m = make_tiny("llama")
    a = bb.QuestionRephrase(max_new_tokens=6)
    ctx = AttackContext(facts=FACTS, seed=3)
    state = torch.get_rng_state()
    together = a.run(m, FACTS[:3], ctx)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    alone = [a.run(m, [f], ctx)[0] for f in reversed(FACTS[:3])][::-1]
    again = a.run(m, FACTS[:3], AttackContext(facts=FACTS, seed=3))
    assert [o.samples for o in together] == [o.samples for o in alone] == [o.samples for o in again]
    other = a.run(m, FACTS[:3], AttackContext(facts=FACTS, seed=4))
    assert [o.samples for o in other] != [o.samples for o in together]
    o = together[0]
    assert len(o.samples) == 20 and o.budget == 20 and o.hits == sum(answer_matches(s, "Paris") for s in o.samples)
    assert len(set(o.samples)) > 1  # sampled, not greedy
    assert o.to_json()["details"]["prompts"] == a.prompts(FACTS[0])


def _force_token(m, token_id):
    """Make ``m`` emit ``token_id`` at every step (hook on the unembedding)."""
    def hook(module, inp, out):
        out = out.clone()
        out[..., token_id] += 1e4
        return out
    return m.hf.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("cls", [bb.QuestionRephrase, bb.Jailbreak])
def test_model_that_emits_answer_succeeds(make_tiny, tiny_tokenizer, cls):
    m = make_tiny("llama")
    m.hf.config.max_position_embeddings = 512  # rotary: any length works; the preambles are long in bytes
    ids = tiny_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    h = _force_token(m, ids[0])
    try:
        out = cls(max_new_tokens=3).run(m, [FACTS[0], FACTS[1]], AttackContext(seed=0))
    finally:
        h.remove()
    assert out[0].success and out[0].hits == 20
    assert all(s.strip().startswith("Paris") for s in out[0].samples)
    assert not out[1].success and out[1].hits == 0  # "Tokyo" never appears


# -- real model ---------------------------------------------------------------------------------

def test_question_rephrase_smollm2_france(smollm2):
    fact = _fact(0, paraphrases=["The capital city of France is", "France's capital city is"])
    t = time.time()
    out = bb.QuestionRephrase().run(smollm2, [fact], AttackContext(seed=0))[0]
    assert time.time() - t < 60
    assert out.success and out.hits >= 1 and len(out.samples) == 20
