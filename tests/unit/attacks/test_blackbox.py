"""Blackbox attacks (question-rephrase, jailbreak, the image attacks' shared scoring); the relearning attack is in
test_relearning.py."""

from __future__ import annotations

import time

import pytest
import torch

import attacks.blackbox as bb
import attacks.relearning as rl
from attacks.base import ATTACKS, AttackContext, summarize
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
    assert len(o.samples) == 20 and o.budget == 20
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


# -- answer in the input: skipped ---------------------------------------------------------------

def test_answer_in_input_is_skipped_without_sampling():
    qr, jb = bb.QuestionRephrase(), bb.Jailbreak()
    apple = _fact(0, "Apple A5 was created by", "Apple", subject="Apple A5")  # CounterFact: answer in the subject
    ferrari = _fact(1, "Ferrari F40, developed by", "Ferrari", subject="Ferrari F40")
    para = _fact(2, "The capital of France is", "Paris", ["Paris is the capital of"])  # only a paraphrase has it
    us = _fact(3, "The Statue of Liberty is in the", "US")  # a rephrasing prefix says "the US"
    grandma = _fact(4, "Little Red Riding Hood visits her", "grandmother")  # a jailbreak preamble does
    expected = {"question-rephrase": [True, True, True, True, False], "jailbreak": [True, True, False, False, True]}
    for a in (qr, jb):
        facts = [apple, ferrari, para, us, grandma]
        # model=None: a skipped fact never reaches the model
        got = [a.attack_fact(None, f, 0) if skip else None for f, skip in zip(facts, expected[a.name])]
        assert [o.skipped for o in got if o] == ["answer in input"] * sum(expected[a.name])
        assert all(o.budget == 20 and not o.success and o.samples is None for o in got if o)
        assert [bb.occurs_in(f.answer, a.input_texts(f, a.prompts(f))) for f in facts] == expected[a.name]
    # the subject counts even when a caller-built fact's prompt does not contain it
    odd = Fact(id="x", prompt="It was created by", answer="Apple", subject="Apple A5")
    assert qr.attack_fact(None, odd, 0).skipped == "answer in input"
    assert bb.occurs_in("Paris", ["Parisian food"]) is False  # the scoring rule, not a substring test


def test_answer_in_input_kept_on_request_and_counted_by_summarize(make_tiny):
    m = make_tiny("llama")
    facts = [_fact(0, "Apple A5 was created by", "Apple", subject="Apple A5"), FACTS[1]]
    a = bb.QuestionRephrase(max_new_tokens=3)
    outs = a.run(m, facts, AttackContext(seed=0))
    assert outs[0].skipped == "answer in input" and outs[1].skipped is None and len(outs[1].samples) == 20
    s = summarize(a, m.n_layers, outs, outs)
    assert (s.n_facts, s.n_skipped) == (1, 1)
    keep = bb.QuestionRephrase(max_new_tokens=3, skip_answer_in_input=False).run(m, facts, AttackContext(seed=0))
    assert keep[0].skipped is None and len(keep[0].samples) == 20 and keep[0].details["answer_in_input"] is True
    assert "answer_in_input" not in keep[1].details and keep[1].samples == outs[1].samples
    assert "skip_answer_in_input" in bb.QuestionRephrase().config()


# -- control answer on the same samples ----------------------------------------------------------

def _fixed_samples(monkeypatch, rows_of):
    """Make every sampling attack draw the given samples (``rows_of(prompts)`` -> rows)."""
    calls = []

    def fake(model, prompts, *, samples, **kw):
        calls.append(list(prompts))
        return rows_of(prompts, samples)

    monkeypatch.setattr(bb, "sample_continuations", fake)
    return calls


def test_control_scored_on_the_same_samples(monkeypatch):
    texts = ["Paris, of course.", "It is Lyon.", "Parisian food", "Lyon and Paris", "no idea"]
    calls = _fixed_samples(monkeypatch, lambda prompts, n: [texts[:n] for _ in prompts])
    a = bb.QuestionRephrase()
    f = FACTS[0]
    ctx = AttackContext(seed=0, controls={"f0": "Lyon", "f1": "Osaka", "f3": "Nice"})
    lyon, nothing = a.run(None, [f, FACTS[1]], ctx)
    assert (lyon.hits, lyon.success) == (8, True)  # "Paris" in 2 of the 5 texts x 4 prompts; not "Parisian"
    assert (lyon.control, lyon.details["control_hits"], lyon.details["control_answer"]) == (True, 8, "Lyon")
    assert (nothing.hits, nothing.success, nothing.control, nothing.details["control_hits"]) == (0, False, False, 0)
    assert len(calls) == 2  # one sampling call per fact: the control costs no samples
    # no control for the fact: None
    none = a.run(None, [FACTS[2]], ctx)[0]
    assert none.control is None and "control_hits" not in none.details
    # a control that occurs in the input is not scored (copying would find it)
    tower = _fact(7, "The tower in Nice is in", "Paris")
    c = a.run(None, [tower], AttackContext(seed=0, controls={"f7": "Nice"}))[0]
    assert c.control is None and c.details["control_skipped"] == "control in input" and c.hits == 8
    # a skipped fact scores no control either
    apple = _fact(8, "Apple A5 was created by", "Apple", subject="Apple A5")
    sk = a.run(None, [apple], AttackContext(seed=0, controls={"f8": "Samsung"}))[0]
    assert sk.skipped == "answer in input" and sk.control is None and len(calls) == 4


def test_image_attacks_share_skip_and_control(monkeypatch, images):
    _fixed_samples(monkeypatch, lambda prompts, n: [["A flag of Madrid"] * n for _ in prompts])
    paras = {"easy": [images[1]], "medium": [images[2]], "hard": [images[2]]}
    f = _fact(0, "The capital of this country is", "Madrid", image=images[0], image_paraphrases=paras)
    ctx = AttackContext(seed=0, controls={"f0": "Barcelona", "f1": "Madrid"})
    o = bb.ImageRephrase().run(None, [f], ctx)[0]
    assert (o.budget, o.hits, o.control, o.details["control_hits"]) == (20, 20, False, 0)
    assert len(o.details["images"]) == 4
    g = _fact(1, "The capital of this country is", "Barcelona", image=images[0], image_paraphrases=paras)
    o = bb.MultimodalRephrase().run(None, [g], ctx)[0]
    assert (o.budget, o.hits, o.control, o.details["control_hits"]) == (16, 0, True, 16)
    spain = _fact(2, "The capital of Spain is", "Madrid", image=images[0], image_paraphrases=paras)
    for cls in (bb.ImageRephrase, bb.MultimodalRephrase):
        assert cls().run(None, [spain], ctx)[0].skipped is None  # "Spain" is not "Madrid"
    own = _fact(3, "<image>\nMadrid is the capital of", "Madrid", image=images[0], image_paraphrases=paras)
    assert bb.ImageRephrase().run(None, [own], ctx)[0].skipped == "answer in input"


# -- the sampler ignores the model's generation config -------------------------------------------

HOSTILE = dict(min_p=0.3, typical_p=0.2, repetition_penalty=2.0, no_repeat_ngram_size=1, top_k=3, top_p=0.5,
               temperature=0.3, epsilon_cutoff=0.2, eta_cutoff=0.2, suppress_tokens=[5, 6],
               begin_suppress_tokens=[7], forced_bos_token_id=8, min_new_tokens=4, bad_words_ids=[[9]],
               renormalize_logits=True, do_sample=True)


def test_sampler_ignores_model_generation_config(make_tiny):
    from probe.generate import greedy_texts

    plain, hostile = make_tiny("llama"), make_tiny("llama")
    for k, v in HOSTILE.items():
        setattr(hostile.hf.generation_config, k, v)
    ps = ["The capital of France is", "Water is made of"]
    ids = plain.tokenizer(ps[:1], return_tensors="pt").input_ids
    # the config is live: Hugging Face's own generate samples differently with it
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = hostile.hf.generate(ids, max_new_tokens=6, num_return_sequences=5, pad_token_id=0)
        torch.manual_seed(0)
        ours = plain.hf.generate(ids, max_new_tokens=6, num_return_sequences=5, do_sample=True, top_k=0,
                                 pad_token_id=0)
    assert not torch.equal(theirs, ours)
    processors = []
    real = hostile.hf._get_logits_processor

    def spy(*args, **kw):
        got = real(*args, **kw)
        processors.append(list(got))
        return got

    hostile.hf._get_logits_processor = spy
    a = bb.QuestionRephrase(max_new_tokens=6)
    ctx = AttackContext(seed=1)
    assert [o.samples for o in a.run(hostile, FACTS[:2], ctx)] == [o.samples for o in a.run(plain, FACTS[:2], ctx)]
    assert processors == [[], []]  # plain sampling: no logits processor at all
    assert bb.sample_continuations(hostile, ps, seed=2) == bb.sample_continuations(plain, ps, seed=2)
    assert greedy_texts(hostile, ps, max_new_tokens=6) == greedy_texts(plain, ps, max_new_tokens=6)
    assert processors[-1] == []
    assert hostile.hf.generation_config.min_p == 0.3  # the model's config is restored afterwards


# -- real model ---------------------------------------------------------------------------------

def test_question_rephrase_smollm2_france(smollm2):
    fact = _fact(0, paraphrases=["The capital city of France is", "France's capital city is"])
    t = time.time()
    out = bb.QuestionRephrase().run(smollm2, [fact], AttackContext(seed=0))[0]
    assert time.time() - t < 60
    assert out.hits >= 5 and len(out.samples) == 20  # measured: 9 of 20 samples say "Paris" (seed 0)
