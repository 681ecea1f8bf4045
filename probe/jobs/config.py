"""Settings of the jobs: one base for what ``run`` and ``grid`` share, and name resolution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from attacks import attack_names
from defenses import OBJECTIVES

#: The six deletion objectives of the papers, in the grid's row order.
ALL_DEFENSES = ["fact-erasure", "empty-response", "error-injection", "head-projection", "max-entropy",
                "input-rephrasing"]
#: Attacks of ``probe-attack run`` / ``attack`` by default (the three logit-lens attacks).
RUN_ATTACKS = ["head-projection", "probability-delta", "pd2"]
#: Attacks of ``probe-attack grid`` by default.
GRID_ATTACKS = ["head-projection", "probability-delta", "pd2", "question-rephrase", "jailbreak", "relearning"]


@dataclass
class JobConfig:
    """Settings every job shares (the CLI flags). Defaults follow the papers where they apply.

    Attributes:
        attacks: attack names (``all`` = every registered attack).
        attack_config: per attack name, settings of that attack (e.g.
            ``{"question-rephrase": {"max_new_tokens": 12}}``).
        editor, editor_config: the editor every defense uses, and its settings (override the
            objective's :attr:`~defenses.base.Objective.editor_defaults`).
        objective_config: per defense name, settings of that objective.
        known: the known-fact rule: ``"rank"`` (the answer's first token at rank <= ``known_rank``
            at the output) or ``"reference"`` (the text paper's: p(answer) > 0.02 and the answer in
            the greedy 36-token continuation); see :func:`probe.jobs.deletion.is_known`.
        known_rank: with ``known="rank"``, the largest rank kept.
        max_facts: use at most this many known facts (evenly spaced over the file).
        retain_size, retain_similar: KL retain prompts per edit (see :mod:`defenses.retain`).
        random_n: other facts per edit for the random Δ-Acc (UnLOK-VQA: 10).
        acc_tokens: greedy tokens for the accuracy metrics.
        gen_tokens: greedy tokens of the generation-based deletion scores (prompt and every
            paraphrase, before and after the edit; 36 as the text paper's ``max_new_tokens``;
            0 = not measured).
        batch_size: prompts per forward pass of the lens sweeps (None = automatic).
        seed: base seed (per-fact seeds derive from it and the fact id).
        calibration: the matched-damage calibration in use (:meth:`probe.jobs.calibrate.Calibration.job_record`:
            ``source``, ``editor``, target, per-objective ``settings``, calibration ``facts``), or ``{}``
            for none: each objective then uses its built-in editor defaults. Its settings sit between
            the objective's defaults and ``editor_config`` (explicit settings win); its facts are left
            out of the evaluated facts.
    """

    attacks: list[str] = field(default_factory=lambda: list(RUN_ATTACKS))
    attack_config: dict = field(default_factory=dict)
    editor: str = "constrained-ft"
    editor_config: dict = field(default_factory=dict)
    objective_config: dict = field(default_factory=dict)
    known: str = "rank"
    known_rank: int = 1
    max_facts: int | None = None
    retain_size: int = 4
    retain_similar: float = 1.0
    random_n: int = 10
    acc_tokens: int = 8
    gen_tokens: int = 36
    batch_size: int | None = None
    seed: int = 0
    calibration: dict = field(default_factory=dict)
    progress: bool = True


@dataclass
class RunConfig(JobConfig):
    """``probe-attack run`` / ``attack``: one defense; ``protocol`` one-at-a-time (the papers') or
    all-at-once; causal traces of the first ``causal_traces`` deleted facts."""

    defense: str = "fact-erasure"
    protocol: str = "one-at-a-time"
    causal_traces: int = 0


@dataclass
class GridConfig(JobConfig):
    """``probe-attack grid``: every defense of ``defenses`` (``all`` = :data:`ALL_DEFENSES`) x every
    attack, one fact at a time from a fresh copy."""

    attacks: list[str] = field(default_factory=lambda: list(GRID_ATTACKS))
    defenses: list[str] = field(default_factory=lambda: list(ALL_DEFENSES))


def resolve_names(names: Sequence[str] | str, kind: str) -> list[str]:
    """Expand ``all`` and validate attack or defense names.

    Raises:
        ValueError: an unknown name or an empty list (the message lists the valid ones).
    """

    valid = list(OBJECTIVES) if kind == "defense" else attack_names()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(ALL_DEFENSES) + [n for n in valid if n not in ALL_DEFENSES] if kind == "defense" else valid
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown {kind} {bad[0]!r}; valid {kind}s: {', '.join(valid)}")
    if not names:
        raise ValueError(f"no {kind}s selected; valid {kind}s: {', '.join(valid)}")
    return list(dict.fromkeys(names))
