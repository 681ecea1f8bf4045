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

import math
from dataclasses import asdict, dataclass, field

import torch

from probe.arch import get_attr_path
from probe.interrupt import check as check_interrupt
from probe.model import ProbeModel, clone_model, only_trainable  # noqa: F401  (only_trainable: re-export)

from .base import DeletionRequest, Objective, register_editor
from .forward import objective_step_loss, prepare, retain_reference, stop_threshold


class DefenseDiverged(RuntimeError):
    """The defense loss became NaN or infinite."""


@dataclass
class EditSession:
    """A clone of the model with one editable weight, and its exact original value.

    Attributes:
        model: the clone being edited (shares all other weights with the original).
        param_name: the edited parameter's fully-qualified name.
        original: a copy of the parameter before any edit.
    """

    model: ProbeModel
    param_name: str
    original: torch.Tensor

    @property
    def param(self) -> torch.nn.Parameter:
        return dict(self.model.hf.named_parameters())[self.param_name]

    def restore(self) -> None:
        """Put the original weights back (bit-identical)."""
        with torch.no_grad():
            self.param.copy_(self.original)

    def max_abs_change(self) -> float:
        return float((self.param.detach() - self.original).abs().max())


class OneMLPEditor:
    """Shared plumbing of the editors that change one decoder layer's MLP output projection
    (``down_proj`` / ``c_proj`` / ``fc_out``): the layer (``layer``, else ``layer_frac`` of
    depth), the weight's name, and an :class:`EditSession` on a copy-on-write clone."""

    layer: int | None
    layer_frac: float

    def resolve_layer(self, model: ProbeModel) -> int:
        """The edit layer (non-negative). Raises ValueError when out of range."""
        n = model.n_layers
        layer = int(round(self.layer_frac * (n - 1))) if self.layer is None else int(self.layer)
        if not -n <= layer < n:
            raise ValueError(f"edit layer {layer} out of range for {n} layers")
        return layer % n

    def param_name(self, model: ProbeModel) -> str:
        """Fully-qualified name of the edited weight (validates the layer)."""
        return f"{model.arch.layers}.{self.resolve_layer(model)}.{model.arch.mlp_out}.weight"

    def session(self, model: ProbeModel) -> EditSession:
        """A copy-on-write clone of ``model`` owning a private copy of the edited weight."""
        name = self.param_name(model)
        get_attr_path(model.hf, name.rsplit(".", 1)[0])  # raises AttributeError with the path
        clone = clone_model(model, [name])
        return EditSession(clone, name, dict(clone.hf.named_parameters())[name].detach().clone())


@register_editor("constrained-ft")
@dataclass
class ConstrainedFineTune(OneMLPEditor):
    """Constrained fine-tuning of one layer's MLP output projection.

    Attributes:
        layer: decoder layer to edit; None = ``round(layer_frac * (n_layers - 1))``.
        layer_frac: relative depth of the default layer.
        steps: Adam steps per edit.
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
    cli_name: str = field(default="constrained-ft", repr=False)

    def config(self) -> dict:
        d = asdict(self)
        d.pop("cli_name", None)
        return d

    def edit(self, session: EditSession, objective: Objective, request: DeletionRequest) -> dict:
        """Optimise ``objective`` on ``session.model`` in place (restore with ``session.restore()``).

        Every step is one nnsight trace (:func:`defenses.forward.objective_forward`): the
        deletion rows, the lens at the objective's defense layers and the retain prompts.

        Returns:
            ``{"losses": [...], "steps": n, "max_abs_change": float}``.

        Raises:
            DefenseDiverged: the loss became NaN/inf (weights are restored first).
        """
        model = session.model
        param = session.param
        w0 = session.original
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam or sgd")
        prep = prepare(model, objective, request, retain=bool(self.retain_weight))
        retain_ref = retain_reference(model, prep)
        stop = stop_threshold(self.early_stop, objective)
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([param], lr=self.lr)
        losses: list[float] = []
        with only_trainable(model, [param]), torch.enable_grad():
            for _ in range(self.steps):
                check_interrupt()
                opt.zero_grad(set_to_none=True)
                loss, obj_val = objective_step_loss(model, prep, objective, retain_ref,
                                                    self.retain_weight)
                val = float(loss.detach())
                if not math.isfinite(val):
                    session.restore()
                    raise DefenseDiverged(f"defense loss became {val} after {len(losses)} steps")
                losses.append(val)
                if stop is not None and obj_val < stop:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    param.copy_(torch.clamp(param, w0 - self.norm_bound, w0 + self.norm_bound))
        return {"losses": losses, "steps": len(losses), "max_abs_change": session.max_abs_change()}
