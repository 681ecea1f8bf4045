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
import math
from dataclasses import asdict, dataclass, field

import torch

from probe.arch import get_attr_path
from probe.interrupt import check as check_interrupt
from probe.model import ProbeModel, clone_model
from probe.readout import answer_logprobs, teacher_forced_inputs
from probe.tokens import encode_ids, tokenize

from .base import DeletionRequest, Objective, register_editor


class DefenseDiverged(RuntimeError):
    """The defense loss became NaN or infinite."""


@contextlib.contextmanager
def only_trainable(model: ProbeModel, params: list[torch.nn.Parameter]):
    """Temporarily set ``requires_grad`` on ``params`` only (restores every flag on exit)."""
    flags = {p: p.requires_grad for p in model.hf.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.hf.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


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


@register_editor("constrained-ft")
@dataclass
class ConstrainedFineTune:
    """Constrained fine-tuning of one layer's MLP output projection.

    Attributes:
        layer: decoder layer to edit; None = ``round(layer_frac * (n_layers - 1))``.
        layer_frac: relative depth of the default layer.
        steps: Adam steps per edit.
        lr: Adam learning rate.
        norm_bound: element-wise bound on ``|W - W0|`` (the papers' ``norm_constraint``).
        retain_weight: weight of the KL retain loss (0 disables it).
        early_stop: stop once the objective's loss is below this value (None: run all steps).
        optimizer: ``"adam"`` or ``"sgd"`` (the multimodal reference code uses SGD; plain SGD keeps
            the update of a single prompt low-rank, i.e. keyed on that prompt's MLP activations).
    """

    layer: int | None = None
    layer_frac: float = 0.3
    steps: int = 25
    lr: float = 1e-3
    norm_bound: float = 2e-3
    retain_weight: float = 1.0
    early_stop: float | None = 0.01
    optimizer: str = "adam"
    cli_name: str = field(default="constrained-ft", repr=False)

    def resolve_layer(self, model: ProbeModel) -> int:
        n = model.n_layers
        layer = int(round(self.layer_frac * (n - 1))) if self.layer is None else self.layer
        if not -n <= layer < n:
            raise ValueError(f"edit layer {layer} out of range for {n} layers")
        return layer % n

    def param_name(self, model: ProbeModel) -> str:
        return f"{model.arch.layers}.{self.resolve_layer(model)}.{model.arch.mlp_out}.weight"

    def session(self, model: ProbeModel) -> EditSession:
        """Clone ``model`` with a private copy of the weight this editor edits."""
        name = self.param_name(model)
        get_attr_path(model.hf, name.rsplit(".", 1)[0])  # raises AttributeError with the path
        clone = clone_model(model, [name])
        sess = EditSession(clone, name, dict(clone.hf.named_parameters())[name].detach().clone())
        return sess

    def config(self) -> dict:
        d = asdict(self)
        d.pop("cli_name", None)
        return d

    def edit(self, session: EditSession, objective: Objective, request: DeletionRequest) -> dict:
        """Optimise ``objective`` on ``session.model`` in place (restore with ``session.restore()``).

        Returns:
            ``{"losses": [...], "steps": n, "max_abs_change": float}``.

        Raises:
            DefenseDiverged: the loss became NaN/inf (weights are restored first).
        """
        model = session.model
        param = session.param
        w0 = session.original
        rows, a_ids, _ = teacher_forced_inputs(model.tokenizer, request.prompts, request.answers)
        retain = [tokenize(model.tokenizer, p) for p in request.retain_prompts] if self.retain_weight else []
        n_del = len(rows)
        all_rows = rows + retain
        retain_ref = None
        if retain:
            with torch.no_grad():
                _, retain_ref = _forward(model, all_rows, a_ids, n_del)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam or sgd")
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([param], lr=self.lr)
        losses: list[float] = []
        with only_trainable(model, [param]):
            for _ in range(self.steps):
                check_interrupt()
                opt.zero_grad(set_to_none=True)
                lps, retain_lp = _forward(model, all_rows, a_ids, n_del)
                loss = objective.loss(lps)
                obj_val = float(loss.detach())
                if retain_ref is not None:
                    kl = torch.nn.functional.kl_div(retain_lp, retain_ref, log_target=True, reduction="batchmean")
                    loss = loss + self.retain_weight * kl
                val = float(loss.detach())
                if not math.isfinite(val):
                    session.restore()
                    raise DefenseDiverged(f"defense loss became {val} after {len(losses)} steps")
                losses.append(val)
                if self.early_stop is not None and obj_val < self.early_stop:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    param.copy_(torch.clamp(param, w0 - self.norm_bound, w0 + self.norm_bound))
        return {"losses": losses, "steps": len(losses), "max_abs_change": session.max_abs_change()}


def _forward(model: ProbeModel, rows: list[list[int]], a_ids: list[list[int]], n_del: int):
    """One nnsight trace over deletion rows (``prompt + answer[:-1]``) followed by retain prompts.

    Returns:
        ``(answer_logprobs, retain_logprobs)``: per deletion row the answer tokens'
        log-probabilities ``[n_tokens]``; the retain rows' next-token log-probabilities at their
        last token ``[n_retain, vocab]`` (or None). fp32, nats.
    """
    batch = encode_ids(model, rows)
    max_a = max(len(a) for a in a_ids)
    with model.nn.trace(**batch.model_inputs(), logits_to_keep=max_a):
        logits = model.nn.output.logits.save()  # positions T - max_a .. T - 1
    lp = torch.log_softmax(logits.float(), -1)
    answer_lps, _ = answer_logprobs(lp, a_ids)
    retain_lp = lp[n_del:, -1] if len(rows) > n_del else None
    return answer_lps, retain_lp
