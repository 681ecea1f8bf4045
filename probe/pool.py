"""The pool of other facts that a deleted fact's attacks and metrics draw from.

Many parts of a job need facts besides the one being deleted: control answers, retain prompts,
random Δ-Acc, retention, error-injection targets, relearning data, linear-probe training data.
In the one-at-a-time protocol the pool for a deleted fact is **every other fact of the file**
(leave-one-out: the other facts are not deleted in that model state, so attackers may train on
them). A researcher's own file is often small (1, 2, 5, 30 facts), so where the file's part is
smaller than what a use needs, it is **topped up with the built-in facts**
(:data:`probe.facts.BUILTIN_FACTS`, 199 facts of 34 relations; ids prefixed ``builtin:``, never
deleted or evaluated, and never added when the file already holds them). File facts always come
first: a use only reaches built-in facts for the part the file cannot give.

Every use records which pool it drew from and its size (:class:`PoolUse`): ``"file"`` or
``"file + built-in"``, and how many candidates it had after its own filters. What each use
needs before it is topped up (the README's pool table is this one):

=====================  ================================================  ========================
use                    drawn from                                        top-up below
=====================  ================================================  ========================
control answer         other facts' answers (same relation first)        no usable answer
retain prompts         other facts' prompts and neighbourhood prompts,   ``retain_size`` prompts
                       leak-free (:mod:`defenses.retain`)
error-injection target other facts' answers                              no other answer
random Δ-Acc           other facts                                       ``random_n`` facts
retention              other facts the unedited model knows              :data:`RETENTION_MIN`
relearning data        other known facts (:mod:`attacks.relearning`)     ``n_examples`` pairs
relearning "taught"    facts the unedited model never knew               ``n_unknown`` facts
linear probe           other facts of the fact's relation                :data:`PROBE_MIN` facts
=====================  ================================================  ========================

The built-in facts' known / never-known status comes from the same known-fact sweep as the
file's (they are swept with it when the file has fewer than :data:`EXTRA_BELOW` facts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence, TypeVar

T = TypeVar("T")

#: Pool sources.
FILE, TOPPED_UP = "file", "file + built-in"
#: Files with fewer facts than this get the built-in facts as a top-up pool (swept once with the
#: known-fact filter); larger files (CounterFact's 1,400+) never need them.
EXTRA_BELOW = 200
#: Retention is measured on every other known fact of the file, topped up with the known built-in
#: facts when the file gives fewer than this.
RETENTION_MIN = 50
#: The linear probe of a relation trains on the file's other facts of that relation, topped up
#: with the built-in facts of the same relation (all of them when the file has no relations) when
#: the file gives fewer than this.
PROBE_MIN = 32
#: Id prefix of a built-in fact in the top-up pool.
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class PoolUse:
    """Where one use drew its facts from.

    Attributes:
        source: :data:`FILE` (the other facts of the file) or :data:`TOPPED_UP` (those plus
            built-in facts).
        size: candidates available to the use after its own filters (facts, prompts or answers).
    """

    source: str
    size: int

    def to_json(self) -> dict:
        return {"source": self.source, "size": self.size}

    @classmethod
    def from_json(cls, d: dict | None) -> "PoolUse | None":
        return cls(d["source"], int(d["size"])) if d else None


def top_up(file_items: Sequence[T], extra_items: Sequence[T], need: int) -> tuple[list[T], PoolUse]:
    """The file's candidates, followed by the built-in ones when the file gives fewer than ``need``.

    Returns:
        ``(candidates, PoolUse)``: ``file_items`` alone (source ``"file"``) when
        ``len(file_items) >= need`` or there is nothing to top up with, else ``file_items +
        extra_items`` (source ``"file + built-in"``), file items first.
    """
    items = list(file_items)
    if len(items) >= need or not extra_items:
        return items, PoolUse(FILE, len(items))
    items += list(extra_items)
    return items, PoolUse(TOPPED_UP, len(items))


def draw(file_items: Sequence[T], extra_items: Sequence[T], n: int, rng: random.Random) -> tuple[list[T], PoolUse]:
    """``n`` candidates, file first: a seeded sample of ``file_items`` when it has ``n``, else all of
    them plus a seeded sample of ``extra_items`` for the rest (fewer than ``n`` when both run out)."""
    file_items = list(file_items)
    if len(file_items) >= n or not extra_items:
        return rng.sample(file_items, min(n, len(file_items))), PoolUse(FILE, len(file_items))
    rest = list(extra_items)
    picked = file_items + rng.sample(rest, min(n - len(file_items), len(rest)))
    return picked, PoolUse(TOPPED_UP, len(file_items) + len(rest))


def pool_summary(units: Iterable[Any]) -> dict:
    """Which pool each metric and attack drew from, over finished units (:class:`probe.results.FactResult`):
    ``{"metrics": {use: {"file": n, "file + built-in": n, "size_min": m, "size_max": M}},
    "attacks": {attack: {...}}}`` (attacks: from the ``pool`` their outcomes record, pre and post)."""
    out: dict[str, dict] = {"metrics": {}, "attacks": {}}

    def add(kind: str, name: str, use: dict | None) -> None:
        if not use:
            return
        d = out[kind].setdefault(name, {FILE: 0, TOPPED_UP: 0, "size_min": use["size"], "size_max": use["size"]})
        d[use["source"]] += 1
        d["size_min"], d["size_max"] = min(d["size_min"], use["size"]), max(d["size_max"], use["size"])

    for u in units:
        for use, rec in sorted((getattr(u, "pools", None) or {}).items()):
            add("metrics", use, rec)
        for name, phases in sorted((getattr(u, "outcomes", None) or {}).items()):
            for o in phases.values():
                add("attacks", name, (getattr(o, "details", None) or {}).get("pool") if o is not None else None)
    return out


def is_builtin(fact) -> bool:
    """Whether ``fact`` is a built-in fact of the top-up pool (:func:`extra_facts`)."""
    return str(getattr(fact, "id", "")).startswith(BUILTIN_PREFIX)


def extra_facts(facts: Sequence) -> list:
    """The built-in text facts that can top up the pool of a file of ``facts``: none when the file
    has :data:`EXTRA_BELOW` facts or more; otherwise every built-in fact whose (prompt, answer) is
    not in the file, with its id prefixed :data:`BUILTIN_PREFIX`."""
    from .facts import load_facts

    if len(facts) >= EXTRA_BELOW:
        return []
    keys = {(str(f.prompt).strip(), f.answer.strip()) for f in facts}
    return [replace(g, id=BUILTIN_PREFIX + str(g.id)) for g in load_facts(None)
            if (str(g.prompt).strip(), g.answer.strip()) not in keys]


__all__ = ["FILE", "TOPPED_UP", "EXTRA_BELOW", "RETENTION_MIN", "PROBE_MIN", "BUILTIN_PREFIX", "PoolUse", "top_up",
           "draw", "pool_summary", "is_builtin", "extra_facts"]
