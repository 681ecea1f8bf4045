"""Constrained fine-tuning of one MLP layer: the papers' "FT" editor with a norm bound.

Zhu et al. (2020), as used by Meng et al. (2022) and Patil, Hase & Bansal (ICLR 2024, section 5):
Adam on one MLP output projection (``down_proj`` for Llama/Gemma), and after every step the
weights are clamped element-wise into ``[W0 - bound, W0 + bound]`` (the "norm constraint").
A KL retain term on prompts whose behaviour must not change (other facts' prompts: never the
evaluated neighbours) keeps the edit specific; its weight is ``retain_weight``.

All forward passes go through nnsight (one trace per step for the deletion and retain prompts), and the edit is
made on a copy-on-write clone of the model (:func:`probe.model.clone_model`): the caller's model
is never modified, and :meth:`EditSession.restore` puts the original weights back bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from probe.model import only_trainable

from .base import DeletionRequest, Objective, register_editor
from .editor import Editor, EditSession, Steps
from .forward import objective_step_loss, prepare, retain_reference


@register_editor("constrained-ft")
@dataclass
class ConstrainedFineTune(Editor):
    """Constrained fine-tuning of one layer's MLP output projection.

    Attributes:
        layer: decoder layer to edit; None = ``layer_frac`` of depth (:func:`probe.layers.layer_at_depth`).
        layer_frac: relative depth of the default layer.
        steps: Adam steps per edit (at most; an update the editor loop rejects is redone at half
            the lr and counts as a step, see :meth:`defenses.editor.Editor.edit`).
        lr: Adam learning rate.
        norm_bound: element-wise bound on ``|W - W0|`` (the papers' ``norm_constraint``).
        retain_weight: weight of the KL retain loss (0 disables it).
        early_stop: stop once the objective's loss is below this value; ``"auto"`` (default) uses
            the objective's own threshold (fact erasure: p < 0.01); None runs every step.
        optimizer: ``"adam"`` or ``"sgd"`` (the multimodal reference code uses SGD; plain SGD keeps
            the update of a single prompt low-rank, i.e. keyed on that prompt's MLP activations).
    """

    layer: int | None = None
    layer_frac: float = 0.3
    steps: int = 25
    lr: float = 1e-3
    norm_bound: float = 2e-3
    retain_weight: float = 1.0
    early_stop: float | str | None = "auto"
    optimizer: str = "adam"

    #: the edit size: norm bound (and lr = bound / 2, the ratio of the tuned defaults), 25 steps
    calibration_ladder: ClassVar[tuple[dict, ...]] = tuple(
        {"norm_bound": b, "lr": b / 2} for b in (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2))
    #: below the ladder: halve bound and lr, down to 5e-4 / 16 (Gemma-3-270M breaks the target at 5e-4)
    calibration_max_descent: ClassVar[int] = 4

    @classmethod
    def calibration_weaker(cls, rung: dict) -> dict | None:
        return {k: v / 2 for k, v in rung.items() if k in ("norm_bound", "lr")} or None

    @contextlib.contextmanager
    def _run(self, session: EditSession, objective: Objective, request: DeletionRequest):
        """Adam (or SGD) on the weight, clamped into ``[W0 - norm_bound, W0 + norm_bound]`` after
        every step. Every step is one nnsight trace (:func:`defenses.forward.objective_forward`):
        the deletion rows, the lens at the objective's defense layers and the retain prompts."""
        model = session.model
        param = session.param
        w0 = session.original
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam or sgd")
        prep = prepare(model, objective, request, retain=bool(self.retain_weight))
        retain_ref = retain_reference(model, prep)
        stop = self._stop(objective)
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([param], lr=self.lr)

        def loss(step: int):
            return objective_step_loss(model, prep, objective, retain_ref, self.retain_weight)

        def update() -> None:
            opt.step()
            with torch.no_grad():
                param.copy_(torch.clamp(param, w0 - self.norm_bound, w0 + self.norm_bound))

        with only_trainable(model, [param]), torch.enable_grad():
            yield Steps(self.steps, loss, update, [param], opt, stop=stop)
