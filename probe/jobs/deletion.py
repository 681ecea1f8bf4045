"""The one deletion loop's body: measure one deletion unit, before and after the edit.

Both ``probe-attack run`` and ``probe-attack grid`` are short loops over
:func:`measure_pre` (the unedited model's measurements of a fact, shared by every defense) and
:func:`measure_deletion` (one edit of one or several facts from a fresh copy, every attack and
every score on the edited model, exact restore). One failure policy: an edit that fails
(:class:`defenses.EditFailed`, e.g. a non-finite loss, or a ``ValueError`` raised by the edit) is
recorded on the unit as ``error`` and counted in ``n_failed``; the job goes on.

This is where :mod:`attacks` and :mod:`defenses` meet (with :mod:`probe.cli`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from attacks import AttackContext, LensAttack, attack_readout, evaluate_attacks, make_attack
from defenses import EditFailed, make_objective
from defenses.base import editor_for
from defenses.evaluate import (deletion_scores, fact_probs, random_accuracy, target_probs,
                               target_scores)

from ..facts import Fact
from ..images import ImagePrompt, plain_text
from ..results import AttackOutcome, DeletionScores, FactResult, LayerReadout, ModalReadout, PreMeasure
from ..seeds import RANDOM_ACC, fact_rng
from ..tokens import answer_ids as _answer_ids


@dataclass
class Plan:
    """What a job runs, built and validated before anything is written.

    Attributes:
        attacks: attack objects (every registered kind, in the user's order).
        defenses: defense name -> ``(objective, editor)``.
        pool: every fact of the file (retain prompts, random Δ-Acc, distractors, attacker data).
    """

    attacks: list
    defenses: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    pool: list[Fact] = field(default_factory=list)

    @property
    def lens_attacks(self) -> list:
        return [a for a in self.attacks if isinstance(a, LensAttack)]

    @property
    def other_attacks(self) -> list:
        return [a for a in self.attacks if not isinstance(a, LensAttack)]


def attack_context(plan: Plan, deleted, cfg):
    """A fresh :class:`attacks.AttackContext` for one model state: the plan's pool, the ids never to
    train on, the run seed and batch size, an empty per-state cache."""
    return AttackContext(facts=plan.pool, deleted=frozenset(deleted), seed=cfg.seed, cache={},
                         batch_size=cfg.batch_size)


def build_plan(model, attack_names: Sequence[str], defense_names: Sequence[str], cfg, *,
               protocol: str = "one-at-a-time") -> Plan:
    """Attack objects and (objective, editor) per defense, every setting checked against ``model``
    (edit layer, defense layers, editor constraints) before any output is written.

    Raises:
        ValueError: unknown names or settings; InputError: a setting that does not fit the model
            or protocol.
    """

    attacks = [make_attack(n, **cfg.attack_config.get(n, {})) for n in attack_names]
    for a in attacks:
        a.attack_layers(model.n_layers)  # validates explicit layers before anything is written
    defenses = {}
    for d in defense_names:
        objective = make_objective(d, **cfg.objective_config.get(d, {}))
        editor = editor_for(objective, cfg.editor, cfg.editor_config)
        editor.check(model, objective, protocol)
        defenses[d] = (objective, editor)
    return Plan(attacks=attacks, defenses=defenses)


# ----------------------------------------------------------------------------------------
# facts


def evenly_spaced(items: list, n: int) -> list:
    """At most ``n`` items spread evenly over ``items`` (keeps order; all of them if ``n >= len``),
    so a subset of a file sorted by relation still covers every relation."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def random_facts_for(fact: Fact, pool: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    """``n`` other facts (never ``fact``), seeded by the fact id, for the random Δ-Acc."""
    others = [g for g in pool if g.id != fact.id]
    rng = fact_rng(seed, RANDOM_ACC, fact.id)
    return rng.sample(others, min(n, len(others)))


def text_form(fact) -> str | None:
    """The text-only form of an image fact (its ``text_prompt`` naming the entity, else the
    prompt's text without the image), or None for a text fact."""
    if not isinstance(fact.prompt, ImagePrompt):
        return None
    return getattr(fact, "text_prompt", None) or plain_text(fact.prompt)


def text_readouts(model, facts: Sequence[Fact], *, batch_size: int | None = None) -> list[LayerReadout | None]:
    """Logit-lens readouts of the facts' text-only forms (None for text facts): the same question
    without the image, for the per-layer "with vs without the image" comparison."""
    from ..readout import lens_readout

    idx = [i for i, f in enumerate(facts) if text_form(f) is not None]
    out: list = [None] * len(facts)
    if idx:
        reads = lens_readout(model, [text_form(facts[i]) for i in idx], [facts[i].answer for i in idx],
                             batch_size=batch_size)
        for i, r in zip(idx, reads):
            out[i] = r
    return out


def image_examples(facts: Sequence[Fact], n: int = 4) -> list[dict]:
    """Up to ``n`` image facts as plain data for the report's example images."""
    out = []
    for f in facts:
        if getattr(f, "image", None) and len(out) < n:
            out.append({"fact_id": f.id, "prompt": str(f.prompt), "answer": f.answer, "image": f.image,
                        "image_paraphrases": dict(getattr(f, "image_paraphrases", None) or {}),
                        "neighborhood_images": list(getattr(f, "neighborhood_images", None) or [])})
    return out


def known_facts(model, facts: Sequence[Fact], plan: Plan, known_rank: int, max_facts: int | None, ctx, *,
                progress: bool = False, desc: str = "known-fact filter"
                ) -> tuple[list[tuple[Fact, LayerReadout, dict[str, AttackOutcome]]], int]:
    """The known-fact filter: one logit-lens sweep of the unedited model over every fact (scoring
    the logit-lens attacks in the same pass), keeping facts whose answer's first token is at rank
    <= ``known_rank`` at the output, then at most ``max_facts`` of them, evenly spaced; the other
    lens readouts (tuned lens) are swept on the kept facts only.

    Returns:
        ``([(fact, logit-lens readout, {lens attack: pre outcome}), ...], number of known facts
        before max_facts)``.

    Raises:
        RunError: no fact is known.
    """

    from .output import RunError

    logit = [a for a in plan.lens_attacks if a.lens == "logit"]
    reads = attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], logit, ctx=ctx,
                           progress=progress, desc=desc)
    kept = [i for i, r in enumerate(reads) if r.rank[-1] <= known_rank]
    n_known = len(kept)
    if max_facts:
        kept = evenly_spaced(kept, max_facts)
    if not kept:
        raise RunError(f"none of the {len(facts)} facts is known by the model (answer's first token at rank "
                       f"<= {known_rank}); nothing to delete")
    kfacts = [facts[i] for i in kept]
    _, outs = evaluate_attacks(model, kfacts, plan.lens_attacks, ctx, readouts={"logit": [reads[i] for i in kept]},
                               progress=progress)
    return [(f, reads[i], {a: o[j] for a, o in outs.items()}) for j, (f, i) in enumerate(zip(kfacts, kept))], n_known


# ----------------------------------------------------------------------------------------
# the unit


def measure_pre(model, fact: Fact, readout: LayerReadout, lens_outcomes: dict[str, AttackOutcome], plan: Plan,
                ctx, cfg) -> PreMeasure:
    """The unedited model's measurements of ``fact``, shared by every defense: every attack's
    outcome (the lens attacks' come from the filter's sweep), full-answer probabilities of prompt,
    paraphrases and neighbours (with neighbour accuracy), the random Δ-Acc draw and its accuracy,
    and the image fact's text-form readout."""

    outcomes = dict(lens_outcomes)
    for a in plan.other_attacks:
        outcomes[a.name] = a.run(model, [fact], ctx)[0]
    probs = fact_probs(model, [fact], max_new_tokens=cfg.acc_tokens)[0]
    rand = random_facts_for(fact, plan.pool, cfg.random_n, cfg.seed)
    return PreMeasure(fact.id, readout, {a.name: outcomes[a.name] for a in plan.attacks}, probs,
                      [g.id for g in rand], random_accuracy(model, rand, max_new_tokens=cfg.acc_tokens),
                      text_readouts(model, [fact])[0])


def measure_deletion(model, facts: Sequence[Fact], pres: Sequence[PreMeasure], defense: str, plan: Plan, request,
                     cfg, *, ctx_for: Callable[[], Any], during_edit: Callable[[Any, Fact], None] | None = None,
                     by_id: dict[str, Fact] | None = None) -> list[FactResult]:
    """Delete ``facts`` with one edit (``request``; one fact for the one-at-a-time protocol) by
    ``defense`` from a fresh copy of ``model``, then measure every attack and every score on the
    edited model; the original weights are restored on return.

    Args:
        pres: :func:`measure_pre` of each fact (parallel to ``facts``).
        ctx_for: a fresh :class:`attacks.AttackContext` for the edited model state.
        during_edit: called with (edited model, fact) for each fact while the edit is applied
            (e.g. causal traces).

    Returns:
        One :class:`FactResult` per fact; on a failed edit each has ``error`` set and no post
        measurements.
    """

    objective, editor = plan.defenses[defense]
    by_id = by_id or {f.id: f for f in plan.pool}
    targets = [objective.target_for(f, plan.pool) for f in facts]
    t_pre = [target_probs(model, f, t) if t else None for f, t in zip(facts, targets)]
    a_ids = [_answer_ids(model.tokenizer, f.prompt, f.answer) for f in facts]

    def base(i: int, f: Fact) -> FactResult:
        return FactResult(f.id, str(f.prompt), f.answer, a_ids[i], pres[i].readout, defense=defense)

    with contextlib.ExitStack() as stack:
        try:
            edit = stack.enter_context(editor.applied(model, objective, request))
        except (EditFailed, ValueError) as exc:
            out = []
            for i, f in enumerate(facts):
                r = base(i, f)
                r.error = f"{type(exc).__name__}: {exc}"
                out.append(r)
            return out
        edited = edit.model
        reads, post_out = evaluate_attacks(edited, list(facts), plan.attacks, ctx_for())
        text_post = text_readouts(edited, list(facts))
        post_probs = fact_probs(edited, list(facts), max_new_tokens=cfg.acc_tokens)
        rand_post = [random_accuracy(edited, [by_id[g] for g in p.random_ids], max_new_tokens=cfg.acc_tokens)
                     for p in pres]
        t_post = [target_probs(edited, f, t) if t else None for f, t in zip(facts, targets)]
        if during_edit is not None:
            for f in facts:
                during_edit(edited, f)
        info = edit.info
    out = []
    for i, f in enumerate(facts):
        post = reads["logit"][i]
        s = deletion_scores(pres[i].probs, post_probs[i])
        if pres[i].random_ids:
            s["random_delta_acc"] = (sum(pres[i].random_acc) - sum(rand_post[i])) / len(pres[i].random_ids)
        if targets[i]:
            s.update(target_scores(t_pre[i], t_post[i]), target=targets[i])
        s["efficacy"] = float(post.rank[-1] > 1)
        r = base(i, f)
        r.post, r.scores, r.edit = post, DeletionScores(**s), info
        r.outcomes = {a.name: {"pre": pres[i].outcomes.get(a.name), "post": post_out[a.name][i]} for a in plan.attacks}
        if pres[i].text_readout is not None:
            r.modal = ModalReadout(text_form(f), pres[i].text_readout, text_post[i])
        out.append(r)
    return out
