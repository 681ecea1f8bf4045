"""Choosing retain prompts: what a deletion must leave alone.

The KL retain term of an editor needs prompts whose next-token distribution should not move.
Specificity is hardest for prompts of the *same relation about other subjects* ("The capital of
France is" while deleting Tokyo as Japan's capital): their last-token MLP inputs look like the
deleted prompt's. So half (``sim_frac``) of the retain set is the pool prompts most similar to the
fact's prompt (word and word-bigram overlap) and the rest is drawn at random (seeded per fact).
The fact's own prompt, its paraphrases and its evaluated neighbourhood prompts are never used:
the neighbourhood score stays an honest held-out measurement.
"""

from __future__ import annotations

from typing import Sequence

from probe.facts import Fact
from probe.seeds import RETAIN, fact_rng


def _words(text: str) -> set:
    w = text.lower().split()
    return set(w) | set(zip(w, w[1:]))


def retain_prompts(fact: Fact, facts: Sequence[Fact], size: int, *, sim_frac: float = 0.5,
                   seed: int = 0) -> list[str]:
    """Up to ``size`` retain prompts for deleting ``fact``, drawn from the other facts' prompts and
    neighbourhood prompts (see module docstring). Deterministic for a given ``seed`` and fact id."""
    if size <= 0:
        return []
    banned = {fact.prompt, *fact.paraphrases, *(n["prompt"] for n in fact.neighborhood)}
    pool = sorted({g.prompt for g in facts if g.id != fact.id}
                  | {n["prompt"] for g in facts if g.id != fact.id for n in g.neighborhood} - banned)
    if len(pool) <= size:
        return pool
    ref = _words(fact.prompt)
    n_sim = int(round(size * sim_frac))
    similar = sorted(pool, key=lambda p: (-len(ref & _words(p)) / (1 + len(_words(p))), p))[:n_sim]
    chosen = set(similar)
    rest = [p for p in pool if p not in chosen]
    return similar + fact_rng(seed, RETAIN, fact.id).sample(rest, size - n_sim)
