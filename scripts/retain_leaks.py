"""How often the retain set leaks the deleted fact, before and after the leak-free pool (issue 12).

    python scripts/retain_leaks.py [FACTS] [--size 4] [--seed 0] [--sim-frac 1.0]

FACTS: a facts file (default ``../shared/data/counterfact_filtered.json``; ``builtin`` for the
built-in set). For every fact, the retain set of ``--size`` prompts is chosen twice: with the rule
before issue 12 (every other fact's prompt and neighbourhood prompt, half by word overlap; copied
below as :func:`before_rule`) and with :func:`defenses.retain.retain_prompts`. Each chosen prompt
is checked, for every way it occurs in the pool (another fact's prompt with its answer and subject,
or a neighbourhood prompt with its answer), against each reason of :func:`defenses.retain.leak_reasons`.
Printed as Markdown: per reason, the facts with at least one such retain prompt and the number of
such prompts, over all facts and over the first 200 (the issue quoted a 200-fact sample), then the
leak-free pool and retain-set sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defenses.retain import RetainPool, _tokens, leak_reasons, retain_prompts  # noqa: E402
from probe.facts import load_facts  # noqa: E402
from probe.matching import normalize_answer  # noqa: E402
from probe.seeds import RETAIN, fact_rng  # noqa: E402

SUBJECT = {"same relation and subject", "same subject", "subject in text", "candidate subject in deleted prompt"}
ROWS = [
    ("shares the subject (a, c)", lambda r, eq: bool(SUBJECT & r)),
    ("answer = deleted answer (normalised equal; the issue's count)", lambda r, eq: eq),
    ("answer matches the deleted answer (whole words, either way)", lambda r, eq: "same answer" in r),
    ("deleted answer in its text", lambda r, eq: "answer in text" in r),
    ("similarity > SIMILARITY_MAX to a deleted prompt", lambda r, eq: "similar" in r),
    ("one of the fact's own prompts", lambda r, eq: "own prompt" in r),
    ("any leak", lambda r, eq: bool(r)),
]


def _words(text: str) -> set:  # the similarity of the rule before issue 12
    w = text.lower().split()
    return set(w) | set(zip(w, w[1:]))


def before_rule(pool: RetainPool, words: dict, fact, size: int, sim_frac: float, seed: int) -> list[str]:
    """The retain selection before issue 12 (``defenses/retain.py`` at be61cc9), on a prebuilt pool."""
    banned = {fact.prompt, *fact.paraphrases, *(n["prompt"] for n in fact.neighborhood)}
    cands = [p for p in pool.prompts if p not in banned]
    if len(cands) <= size:
        return cands
    ref = _words(fact.prompt)
    n_sim = int(round(size * sim_frac))
    similar = sorted(cands, key=lambda p: (-len(ref & words[p]) / (1 + len(words[p])), p))[:n_sim]
    chosen = set(similar)
    rest = [p for p in cands if p not in chosen]
    return similar + fact_rng(seed, RETAIN, fact.id).sample(rest, size - n_sim)


def check(pool: RetainPool, fact, prompt: str) -> tuple[set, bool]:
    """(every leak reason over the prompt's occurrences, whether one occurrence's answer equals the
    deleted answer after normalisation)."""
    reasons, eq = set(), False
    gold = normalize_answer(fact.answer)
    for c in pool.where(prompt):
        reasons |= set(leak_reasons(fact, c.prompt, c.answer, c.subject, c.relation))
        eq |= bool(c.answer and c.answer.strip() and normalize_answer(c.answer) == gold)
    return reasons, eq


def partial_subject(fact, prompt: str) -> bool:
    """Diagnostic (not a rejection rule): the prompt has at least half of the subject's words
    (subjects of two or more words). On CounterFact these are other entities of the same kind
    ("Brown University" vs "McGill University, whose headquarters are in"), which the retain set
    is meant to hold."""
    if not fact.subject:
        return False
    sw = set(_tokens(normalize_answer(fact.subject)))
    return len(sw) >= 2 and 2 * len(sw & set(_tokens(prompt))) >= len(sw)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("facts", nargs="?", default=str(ROOT.parent / "shared" / "data" / "counterfact_filtered.json"))
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-frac", type=float, default=1.0)  # the jobs' retain_similar
    args = ap.parse_args(argv)
    facts = load_facts(None if args.facts == "builtin" else args.facts)
    pool = RetainPool(facts)
    words = {p: _words(p) for p in pool.prompts}
    sets = {
        "before": [before_rule(pool, words, f, args.size, args.sim_frac, args.seed) for f in facts],
        "after": [retain_prompts(f, facts, args.size, sim_frac=args.sim_frac, seed=args.seed, pool=pool)
                  for f in facts],
    }
    checked = {k: [[check(pool, f, p) for p in ps] for f, ps in zip(facts, v)] for k, v in sets.items()}
    first = min(200, len(facts))
    print(f"{args.facts}: {len(facts)} facts, pool {len(pool)} prompts, retain size {args.size}, "
          f"sim_frac {args.sim_frac}, seed {args.seed}\n")
    print(f"| retain prompt ... | before: facts (all {len(facts)}) | prompts | facts (first {first}) | prompts "
          f"| after: facts (all) | prompts | facts (first {first}) | prompts |")
    print("|---|" + "---:|" * 8)
    for label, test in ROWS:
        cells = []
        for k in ("before", "after"):
            for rows in (checked[k], checked[k][:first]):
                hits = [sum(test(r, eq) for r, eq in fr) for fr in rows]
                cells += [str(sum(h > 0 for h in hits)), str(sum(hits))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for k in ("before", "after"):
        for rows in (sets[k], sets[k][:first]):
            hits = [sum(partial_subject(f, p) for p in ps) for f, ps in zip(facts, rows)]
            cells += [str(sum(h > 0 for h in hits)), str(sum(hits))]
    label = "has >= half the subject's words (diagnostic: other entities of one kind, kept)"
    print(f"| {label} | " + " | ".join(cells) + " |")
    free = [len(pool.leak_free(f)) for f in facts]
    got = [len(ps) for ps in sets["after"]]
    print(f"\nleak-free pool per fact: min {min(free)}, mean {sum(free) / len(free):.1f} (of {len(pool)}); "
          f"retain set: min {min(got)}, mean {sum(got) / len(got):.2f} (asked {args.size})")


if __name__ == "__main__":
    main()
