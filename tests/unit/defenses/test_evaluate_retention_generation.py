"""defenses.evaluate: the output sweep of the retention score and the generation-based scores
(issue 12 items 4 and 5)."""

from __future__ import annotations

import pytest

import defenses.metrics
from defenses.evaluate import generation_hits, generation_scores, output_ranks, retention_scores
from probe.facts import Fact
from probe.readout import lens_readout

FACTS = [
    Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of", "The Eiffel Tower is in"]),
    Fact("water", "Water is made of hydrogen and", "oxygen"),
    Fact("rio", "The city famous for its Carnival in Brazil is", "Rio de Janeiro", paraphrases=["Carnival is in"]),
    Fact("rome", "The Colosseum is in", "Rome"),
    Fact("jp", "The capital of Japan is", "Tokyo"),
]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_output_ranks_are_the_lens_readouts_output_rank(make_tiny, kind):
    # batches of 2 prompts of different lengths: left padding must not move the last prompt token
    model = make_tiny(kind)
    expect = [r.rank[-1] for r in lens_readout(model, [f.prompt for f in FACTS], [f.answer for f in FACTS])]
    assert output_ranks(model, FACTS, batch_size=2) == expect
    assert len(set(expect)) > 1  # a random model: the ranks differ, so the comparison means something


def test_retention_scores_are_fractions_of_the_other_known_facts():
    s = retention_scores([True, True, True, False], [True, False, False, False])
    assert s == {"retention_acc_pre": 0.75, "retention_acc_post": 0.25, "retention_drop": 0.5, "retention_n": 4}
    assert retention_scores([], []) == {}


@pytest.mark.parametrize("pre, post, expect", [
    # prompt generated before, not after; 2 of 3 paraphrases generated before, 1 of those still after
    ([True, True, True, False], [False, True, False, True], (1.0, 1.0, 2 / 3, 0.5)),
    # prompt never generated: no efficacy (not a success); no paraphrase generated: none either
    ([False, False], [False, False], (0.0, None, 0.0, None)),
    # still generated after the edit: a failure; no paraphrases: nothing for them
    ([True], [True], (1.0, 0.0, None, None)),
])
def test_generation_scores(pre, post, expect):
    s = generation_scores(pre, post)
    assert (s["generation_acc_pre"], s["generation_efficacy"], s["generation_paraphrase_acc_pre"],
            s["generation_paraphrase_efficacy"]) == expect


def test_generation_scores_refuse_mismatched_lists():
    with pytest.raises(ValueError, match="prompt first"):
        generation_scores([True, False], [True])


def test_generation_hits_split_one_batched_generation_per_fact(tiny_llama, monkeypatch):
    calls = []
    texts = {FACTS[0].prompt: " Paris.", FACTS[0].paraphrases[0]: " the Parisian suburbs",  # not the word
             FACTS[0].paraphrases[1]: " PARIS, France", FACTS[1].prompt: " hydrogen",
             FACTS[2].prompt: " Rio de Janeiro!", FACTS[2].paraphrases[0]: " Rio"}  # the whole answer needed

    def greedy(model, prompts, *, max_new_tokens=8, batch_size=16):
        calls.append((list(prompts), max_new_tokens, batch_size))
        return [texts[p] for p in prompts]

    monkeypatch.setattr(defenses.metrics, "greedy_texts", greedy)
    hits = generation_hits(tiny_llama, FACTS[:3], max_new_tokens=36)
    assert hits == [[True, False, True], [False], [True, False]]
    assert len(calls) == 1 and calls[0][1] == 36 and len(calls[0][0]) == 6


def test_generation_hits_on_a_real_generation(tiny_llama):
    from probe.generate import greedy_texts

    text = greedy_texts(tiny_llama, [FACTS[3].prompt], max_new_tokens=5)[0]
    word = text.split()[0].strip(".,!?;:\"'") if text.split() else ""
    assert word, text  # the random model says something; taking its own first word as the answer must hit
    fact = Fact("x", FACTS[3].prompt, word, paraphrases=[FACTS[4].prompt])
    hits = generation_hits(tiny_llama, [fact], max_new_tokens=5)
    assert hits[0][0] is True and len(hits[0]) == 2
