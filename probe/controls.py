"""Attack controls: for every attacked fact, an answer the model does not hold for that prompt.

An attack's success means little without a floor: a sampling attack can "extract" an answer it
was handed, a lens attack can read a relation's frequent answer from any prompt. So every fact
gets a **control answer** and every attack scores it exactly as it scores the real answer, on the
same candidate sets, samples and relearned weights (:attr:`attacks.AttackContext.controls`,
:attr:`probe.results.AttackOutcome.control`). The headline is the excess success, post - control
(method.md section 10; this project's standard, not the papers').

The control of a fact (:func:`choose_controls`) is the first, in a per-fact seeded shuffle
(:data:`probe.seeds.CONTROL`), of the other answers of the fact's **relation** (``Fact.relation``)
that

* differ from the fact's answer (normalised: :func:`probe.matching.normalize_answer`),
* do not occur in the prompt or the subject (:func:`probe.matching.answer_matches`),
* have a first token different from the answer's first token and from the unedited model's own
  top-1 next token for the prompt (the model does not "give" the control).

When the facts file has no relations, or no answer of the fact's relation passes these tests, the
control is drawn from the other facts' answers of any relation, and the fact's
``control_source`` says ``"any-relation"``. When no answer of the file qualifies (a file of one
fact, or of one answer), the built-in facts top the pool up (:mod:`probe.pool`): their answers of
the same relation name first, then of any relation; ``control_source`` says ``"built-in"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import InputError
from .facts import Fact
from .matching import answer_matches, normalize_answer
from .seeds import CONTROL, fact_rng
from .tokens import answer_ids

#: ``control_source`` values.
RELATION, ANY_RELATION, BUILTIN = "relation", "any-relation", "built-in"


@dataclass(frozen=True)
class Control:
    """A fact's control answer, where it was drawn from (``"relation"`` / ``"any-relation"`` /
    ``"built-in"``) and how many distinct answers that pool offered (``size``)."""

    answer: str
    source: str
    size: int = 0

    @property
    def pool(self):
        """The :class:`probe.pool.PoolUse` of this control."""
        from .pool import FILE, TOPPED_UP, PoolUse

        return PoolUse(TOPPED_UP if self.source == BUILTIN else FILE, self.size)


def check_relations(facts: Sequence[Fact], pool: Sequence[Fact], extra: Sequence[Fact] = ()) -> None:
    """Refuse a fact whose relation has no other fact in ``pool`` nor in the built-in top-up
    ``extra`` (no control of that relation can be drawn).

    Raises:
        InputError: naming the fact's file, line and field ``relation``.
    """
    counts = Counter(g.relation for g in pool if g.relation is not None)
    counts.update(g.relation for g in extra if g.relation is not None)
    for f in facts:
        if f.relation is not None and counts[f.relation] < 2:
            file, line = f.where()
            raise InputError(f"relation {f.relation!r} has a single fact (none in the built-in facts either); a "
                             f"control answer needs another fact of the same relation", file=file, line=line,
                             field="relation")


def _norm(text: str) -> str | None:
    try:
        return normalize_answer(text)
    except ValueError:
        return None


def _usable(fact: Fact, cand: str, tokenizer, banned_ids: set[int]) -> bool:
    if _norm(cand) is None or _norm(cand) == _norm(fact.answer):
        return False
    text = str(fact.prompt) + " " + (fact.subject or "")
    if answer_matches(text, cand):
        return False
    try:
        first = answer_ids(tokenizer, fact.prompt, cand)[0]
    except (ValueError, IndexError):
        return False
    return first not in banned_ids


def choose_controls(facts: Sequence[Fact], pool: Sequence[Fact], tokenizer, *, seed: int = 0,
                    top_tokens: Mapping[str, int] | None = None, extra: Sequence[Fact] = ()) -> dict[str, Control]:
    """The control answer of each fact (module docstring), seeded per fact (resume-invariant).

    Args:
        facts: the attacked facts.
        pool: every fact of the file (the answers controls are drawn from).
        tokenizer: the model's tokenizer (first answer tokens are taken in context of the prompt).
        top_tokens: fact id -> the unedited model's top-1 next-token id for the prompt (a control
            never starts with it).
        extra: the built-in top-up pool (:func:`probe.pool.extra_facts`), used only for a fact
            that no answer of ``pool`` qualifies for.

    Returns:
        ``{fact id: Control}``; a fact for which no answer qualifies is left out (no control).

    Raises:
        InputError: a fact's relation has a single fact in ``pool`` (:func:`check_relations`).
    """
    check_relations(facts, pool, extra)

    def answers(src: Sequence[Fact]) -> tuple[dict[str, list[str]], list[str]]:
        by_rel: dict[str, set[str]] = {}
        for g in src:
            if g.relation is not None:
                by_rel.setdefault(g.relation, set()).add(g.answer)
        return {r: sorted(a) for r, a in by_rel.items()}, sorted({g.answer for g in src})

    (by_rel, every), (x_rel, x_every) = answers(pool), answers(extra)
    out: dict[str, Control] = {}
    for f in facts:
        banned = {answer_ids(tokenizer, f.prompt, f.answer)[0]}
        if top_tokens and top_tokens.get(f.id) is not None:
            banned.add(int(top_tokens[f.id]))
        rng = fact_rng(seed, CONTROL, f.id)
        for source, cands in ((RELATION, by_rel.get(f.relation, []) if f.relation else []),
                              (ANY_RELATION, every),
                              (BUILTIN, x_rel.get(f.relation, []) if f.relation else []),
                              (BUILTIN, x_every)):
            order = list(cands)
            rng.shuffle(order)  # seeded order; the first answer that qualifies is the control
            pick = next((c for c in order if _usable(f, c, tokenizer, banned)), None)
            if pick is not None:
                out[f.id] = Control(pick, source, len(order))
                break
    return out


def control_label(controls: Mapping[str, Control]) -> str | None:
    """The runs's control source for summaries: ``"relation"``, ``"any-relation"``, ``"built-in"``
    when every fact has that source, else the most common one with the others counted, e.g.
    ``"relation (2 any-relation)"``; None without controls."""
    if not controls:
        return None
    counts = Counter(c.source for c in controls.values())
    main = RELATION if counts[RELATION] else max(counts, key=lambda s: (counts[s], s == ANY_RELATION))
    others = ", ".join(f"{counts[s]} {s}" for s in (RELATION, ANY_RELATION, BUILTIN) if s != main and counts[s])
    return f"{main} ({others})" if others else main
