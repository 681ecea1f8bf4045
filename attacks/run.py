"""Running whitebox attacks over facts and summarising attack success@B."""

from __future__ import annotations

from typing import Sequence

from probe.readout import lens_readout
from probe.results import AttackSummary, LayerReadout

from .whitebox import CURVE_K, WhiteboxAttack, success_at


def attack_readout(model, prompts: Sequence[str], answers: Sequence[str], attacks: Sequence[WhiteboxAttack], *,
                   batch_size: int | None = None, progress: bool = False, desc: str = "attacks") -> list[LayerReadout]:
    """Per-fact lens readout with each attack's best answer rank in ``attack_ranks[attack.name]``.

    Shapes and units: see :func:`probe.readout.lens_readout`.
    """
    n = model.n_layers
    scorers = {a.name: a.scorer(n) for a in attacks}
    return lens_readout(model, prompts, answers, scorers=scorers, batch_size=batch_size, progress=progress,
                        desc=desc)


def summarize_attacks(attacks: Sequence[WhiteboxAttack], n_layers: int, pre: Sequence[LayerReadout],
                      post: Sequence[LayerReadout] | None = None) -> dict[str, AttackSummary]:
    """Attack success@B (fractions, 0..1) before and, if given, after deletion, plus the
    success-vs-budget curves over per-list sizes :data:`CURVE_K`."""
    out = {}
    for a in attacks:
        pre_r = [r.attack_ranks[a.name] for r in pre]
        post_r = [r.attack_ranks[a.name] for r in post] if post is not None else None
        out[a.name] = AttackSummary(
            name=a.name, layers=a.resolve_layers(n_layers), k=a.k, budget=a.budget(n_layers),
            success_pre=success_at(pre_r, a.k),
            success_post=success_at(post_r, a.k) if post_r is not None else None,
            curve_k=list(CURVE_K), curve_budget=[a.budget(n_layers, k) for k in CURVE_K],
            curve_pre=[success_at(pre_r, k) for k in CURVE_K],
            curve_post=[success_at(post_r, k) for k in CURVE_K] if post_r is not None else None,
        )
    return out
