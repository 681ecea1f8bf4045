"""The :class:`Editor` base: one MLP weight, one optimisation loop, one restore.

Every editor (``constrained-ft``, ``lora``, ``rome``) changes one decoder layer's MLP output
projection (``down_proj`` / ``c_proj`` / ``fc_out``) of a copy-on-write clone of the model
(:func:`probe.model.clone_model`). The base owns everything the editors share:

* the edit layer (``layer``, else ``layer_frac`` of depth) and the weight's name;
* :meth:`Editor.check`: every validation, before any output is written;
* the step loop of :meth:`Editor.edit`: interrupt checks, the loss of each step, backward,
  **stable updates** (an update that raised the total loss while moving the retain prompts by
  more than :data:`RETAIN_KL_CAP` is undone and redone at half the learning rate with fresh
  optimizer moments, and recorded;
  a NaN/inf loss after an update is such a rejection), ONE non-finite policy for the unedited
  model (restore the weight, raise :class:`EditFailed`), early stopping at the objective's
  threshold (``early_stop``) on accepted states, a final measuring pass (the edit ends on a
  checked state), restore on any error;
* :meth:`Editor.applied`: a context manager that edits, yields the edited model and the
  :class:`EditInfo`, and restores the original weight bit for bit on exit (also on error); the
  clone is made once per model and re-used across calls.

A subclass supplies the per-step work as a context manager :meth:`Editor._run` yielding a
:class:`Steps` (set up before the loop, finish after it: LoRA merges its adapter, ROME writes the
rank-one update).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Iterator, Sequence

import torch

from probe.arch import get_attr_path, mlp_out_weight_name
from probe.errors import InputError
from probe.interrupt import check as check_interrupt
from probe.layers import layer_at_depth, resolve_layer
from probe.model import ProbeModel, clone_model
from probe.results import EditInfo

from .base import DeletionRequest, Objective
from .forward import StepLoss, stop_threshold

PROTOCOLS = ("one-at-a-time", "all-at-once")


#: Retain KL (nats, batch mean of KL(unedited || edited) over the retain prompts) under which an
#: update is accepted even though the total loss rose. 0.1 nats: by Pinsker's inequality the
#: retain prompts' next-token distributions then move by at most sqrt(0.1 / 2) = 0.22 in total
#: variation on average, so a top-1 answer leading by a clear margin keeps its place, while
#: the small rises of a noisy objective (LoRA dropout, Adam overshoot near the objective's floor)
#: do not stop progress. The Gemma-3-270M edit that broke " Ag" / " Fe" had a retain KL of ~5.6.
RETAIN_KL_CAP = 0.1

#: The lr is multiplied by this after every rejected update (a backtracking step size).
LR_SHRINK = 0.5

#: This many rejected updates in a row end the edit at the last accepted state. 8 lets the lr fall to
#: 2^-8 of the configured one before giving up: the Gemma-3-270M gold edit with the SmolLM2-tuned
#: constrained-FT settings (lr 1e-3) was first accepted at 2^-5, after five rejections.
MAX_REJECTIONS = 8


def accepted(total: float, retain_kl: float | None, last_total: float) -> bool:
    """Whether an update is kept: its total loss is finite and not above ``last_total`` (the last
    accepted state's), or its retain KL (nats; None: no retain term, i.e. 0) is at most
    :data:`RETAIN_KL_CAP`."""
    if not math.isfinite(total):
        return False
    kl = 0.0 if retain_kl is None else retain_kl
    return total <= last_total or kl <= RETAIN_KL_CAP


def _scaled_group_lr(optimizer: torch.optim.Optimizer | None) -> Callable[[float], None]:
    """``set_lr(scale)`` for an optimizer whose lr does not change by itself: every param group's
    lr as found now, times ``scale``.

    Raises:
        ValueError: no optimizer (the editor must then give ``Steps.set_lr``).
    """
    if optimizer is None:
        raise ValueError("Steps needs an optimizer or a set_lr function (a rejected update halves the lr)")
    base = [g["lr"] for g in optimizer.param_groups]

    def set_lr(scale: float) -> None:
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * scale
    return set_lr


class EditFailed(RuntimeError):
    """An edit failed: the loss (or ROME's v*) became NaN or infinite. The weights were restored."""


#: the historical name, kept so existing ``except DefenseDiverged`` clauses keep working
DefenseDiverged = EditFailed


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


@dataclass
class Applied:
    """What :meth:`Editor.applied` yields: the edited model and the edit's :class:`EditInfo`."""

    model: ProbeModel
    info: EditInfo


@dataclass
class Steps:
    """The per-step work of one edit, supplied by an editor's :meth:`Editor._run`.

    Attributes:
        n: the most optimiser updates; the loop makes at most ``n + 1`` forward passes, the last
            one only measuring (so the final state's loss is known and checked). With
            ``measure_last`` the last of ``n`` passes only measures (ROME: ``n - 1`` updates,
            as in the reference code).
        loss: ``loss(step) -> StepLoss``: one forward pass (``step``: the 0-based pass index,
            rejected passes included); the base zeroes ``params``' gradients and runs the
            backward itself.
        update: ``update()``: the optimiser step from the gradients in ``params[i].grad`` (and
            the projection / clamp).
        params: the trainable tensors (what :meth:`snapshot` copies; the weight for constrained
            FT, the adapter's matrices for LoRA, ROME's delta).
        optimizer: the optimiser over ``params`` (a rejection clears its state, see
            :meth:`restore`; its param groups' lr is what a rejection halves unless ``set_lr`` is
            given), or None.
        set_lr: ``set_lr(scale)``: set the lr to ``scale`` x the configured one (editors with an
            lr schedule, or without an optimizer); None: every param group's lr as the loop
            found it, times ``scale``.
        stop: the early-stopping threshold on the objective value (None: never).
        measure_last: the last of the ``n`` passes only measures (no extra pass).
        extra: editor-specific numbers for :attr:`EditInfo.extra` (the loop adds its own).
    """

    n: int
    loss: Callable[[int], StepLoss]
    update: Callable[[], None]
    params: Sequence[torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    set_lr: Callable[[float], None] | None = None
    stop: float | None = None
    measure_last: bool = False
    extra: dict = field(default_factory=dict)

    def snapshot(self) -> tuple:
        """Exact copies of ``params`` and their gradients."""
        with torch.no_grad():
            return ([p.detach().clone() for p in self.params],
                    [None if p.grad is None else p.grad.detach().clone() for p in self.params])

    def restore(self, state: tuple) -> None:
        """Put a :meth:`snapshot` back bit for bit (it can be restored again later) and clear the
        optimizer's state (Adam's moments and step count).

        Why clear rather than restore the moments: the rejected update's direction is Adam's
        m/sqrt(v), which carries earlier steps' momentum and need not be a descent direction for
        the current gradient, so shrinking the lr along it can fail forever (SmolLM2, "The
        capital of France is": eight halvings, each raising the total by ~1e-4). With fresh
        moments the redo is Adam's first step, lr * g / (|g| + eps) ~ lr * sign(g), which lowers
        the loss once the lr is small enough. For the first update the two are the same."""
        values, grads = state
        with torch.no_grad():
            for p, v, g in zip(self.params, values, grads):
                p.copy_(v)
                p.grad = None if g is None else g.clone()
        if self.optimizer is not None:
            self.optimizer.state.clear()


class Editor:
    """Base class of the one-MLP editors (see the module docstring).

    Subclasses are dataclasses with at least ``layer``, ``layer_frac`` and ``early_stop``, are
    registered with :func:`defenses.base.register_editor` (which sets :attr:`name`), and implement
    :meth:`_run`.
    """

    #: the registered name (set by ``@register_editor``)
    name: ClassVar[str] = "editor"
    #: False: the editor writes one fact per edit (refuses the all-at-once protocol)
    multi_fact: ClassVar[bool] = True
    #: settings from weakest to strongest edit, searched by ``probe-attack calibrate``
    #: (:mod:`probe.jobs.calibrate`); empty: the editor cannot be calibrated
    calibration_ladder: ClassVar[tuple[dict, ...]] = ()
    #: When even the ladder's first rung breaks the damage target, calibration tries weaker
    #: settings: :meth:`calibration_weaker` of the weakest measured rung, at most this many times.
    calibration_max_descent: ClassVar[int] = 0

    @classmethod
    def calibration_weaker(cls, rung: dict) -> dict | None:
        """A weaker setting than ``rung`` (below the ladder), or None when the editor has none."""
        return None

    layer: int | None
    layer_frac: float
    early_stop: float | str | None

    # -- configuration --------------------------------------------------------------------
    def config(self) -> dict:
        """The settings (dataclass fields not starting with ``_``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    # -- layer and weight -----------------------------------------------------------------
    def resolve_layer(self, model: ProbeModel) -> int:
        """The edit layer (non-negative). Raises ValueError when out of range."""
        n = model.n_layers
        layer = layer_at_depth(n, self.layer_frac) if self.layer is None else int(self.layer)
        return resolve_layer(layer, n, "edit layer")

    def param_name(self, model: ProbeModel) -> str:
        """Fully-qualified name of the edited weight (validates the layer)."""
        return mlp_out_weight_name(model, self.resolve_layer(model))

    def check(self, model: ProbeModel, objective: Objective, protocol: str = "one-at-a-time") -> None:
        """Validate everything before any output is written: the protocol, the edit layer, the
        objective's defense layers (and what the editor adds, e.g. ROME's layer order).

        Raises:
            InputError (field ``protocol``): unknown protocol, or one the editor cannot run.
            ValueError: edit or defense layer out of range (or the editor's own constraint).
        """
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {protocol!r}; use one-at-a-time or all-at-once", field="protocol")
        self.param_name(model)
        objective.layers(model.n_layers)
        self._check(model, objective)
        if protocol == "all-at-once" and not self.multi_fact:
            raise InputError(f"the {self.name} editor edits one fact per edit; use --protocol one-at-a-time",
                             field="protocol")

    def _check(self, model: ProbeModel, objective: Objective) -> None:
        """Editor-specific validation (default: none)."""

    def check_facts(self, facts) -> None:
        """Refuse, before a job writes anything, facts this editor cannot edit (default: none;
        ROME needs subjects).

        Raises:
            InputError: naming the fact's file, line and field.
        """

    # -- sessions -------------------------------------------------------------------------
    def session(self, model: ProbeModel) -> EditSession:
        """A new copy-on-write clone of ``model`` owning a private copy of the edited weight."""
        name = self.param_name(model)
        get_attr_path(model.hf, name.rsplit(".", 1)[0])  # raises AttributeError with the path
        clone = clone_model(model, [name])
        return EditSession(clone, name, dict(clone.hf.named_parameters())[name].detach().clone())

    def _cached_session(self, model: ProbeModel) -> EditSession:
        cache = self.__dict__.setdefault("_session_cache", {})
        name = self.param_name(model)
        hit = cache.get(id(model))
        if hit is None or hit[0] is not model or hit[1].param_name != name:
            hit = cache[id(model)] = (model, self.session(model))
        return hit[1]

    @contextlib.contextmanager
    def applied(self, model: ProbeModel, objective: Objective, request: DeletionRequest) -> Iterator[Applied]:
        """Edit a clone of ``model`` for ``request``; yields :class:`Applied` (``.model`` the
        edited clone, ``.info`` the :class:`EditInfo`). On exit (also on error) the original
        weight is restored bit for bit; the caller's ``model`` is never modified. The clone is
        made once per model and re-used by later calls.

        Raises:
            EditFailed: the edit diverged (nothing stays modified).
            ValueError: the request or settings are invalid (nothing is modified).
            RuntimeError: the editor is already applied to this model (nested use).
        """
        session = self._cached_session(model)
        busy = self.__dict__.setdefault("_busy", set())
        if id(session) in busy:
            raise RuntimeError(f"{self.name}: already applied to this model; leave the first `with` block first")
        busy.add(id(session))
        try:
            info = self.edit(session, objective, request)
            yield Applied(session.model, info)
        finally:
            session.restore()
            busy.discard(id(session))

    # -- the edit -------------------------------------------------------------------------
    def edit(self, session: EditSession, objective: Objective, request: DeletionRequest) -> EditInfo:
        """Optimise ``objective`` on ``session.model`` in place (restore with
        ``session.restore()``; :meth:`applied` does both).

        The loop (one place for every editor; see :data:`RETAIN_KL_CAP`): each pass measures the
        state the last update made; an update is accepted only if its total loss did not rise
        above the last accepted state's or the retain KL stays within :data:`RETAIN_KL_CAP`.
        A rejected update is undone (``Steps.restore``: the trainable tensors and their gradients
        as they were before it; the optimizer's moments are cleared), the lr is multiplied by
        :data:`LR_SHRINK` and the update is redone from the restored gradients (no extra forward
        pass); :data:`MAX_REJECTIONS` rejections in a row end the edit at the last
        accepted state. A NaN/inf total after an update is a rejection; on the unedited model
        it raises :class:`EditFailed`. Early stopping (``Steps.stop``) looks at accepted states
        only, and the final state is always an accepted, measured one.

        Returns:
            :class:`EditInfo`: ``losses`` the total loss of every accepted state (the unedited
            model first), ``steps = len(losses)``; ``extra`` adds ``rejected_steps`` (0-based
            indices of the passes that measured a rejected update; forward passes =
            ``steps + len(rejected_steps)``), ``rejected_losses`` (their totals), ``lr_scale``
            (the lr of the last update tried, relative to the configured lr: 0.5 per rejection)
            and ``retain_kl`` (the final state's retain KL, nats; None without retain prompts).

        Raises:
            EditFailed: the loss of the unedited model is NaN/inf (the weight is restored first).
            ValueError: invalid request or settings (nothing is modified).
        """
        t0 = time.perf_counter()
        losses: list[float] = []
        rejected: list[int] = []
        rejected_losses: list[float] = []
        scale, retain = 1.0, None
        try:
            with self._run(session, objective, request) as steps:
                set_lr = steps.set_lr or _scaled_group_lr(steps.optimizer)
                passes = steps.n if steps.measure_last else steps.n + 1
                state = None  # snapshot before the last update (None: no update made yet)
                in_a_row = 0
                for i in range(passes):
                    check_interrupt()
                    for p in steps.params:
                        p.grad = None
                    sl = steps.loss(i)
                    val = float(sl.total.detach())
                    if state is not None and not accepted(val, sl.retain_kl, losses[-1]):
                        rejected.append(i)
                        rejected_losses.append(val)
                        in_a_row += 1
                        steps.restore(state)
                        if in_a_row >= MAX_REJECTIONS or i == passes - 1:
                            break
                        scale *= LR_SHRINK
                        set_lr(scale)
                        steps.update()  # the rejected update again, at the smaller lr
                        continue
                    if not math.isfinite(val):
                        raise EditFailed(f"defense loss became {val} after {len(losses)} steps")
                    losses.append(val)
                    retain = sl.retain_kl
                    in_a_row = 0
                    if (steps.stop is not None and sl.objective < steps.stop) or i == passes - 1:
                        break
                    sl.total.backward()
                    state = steps.snapshot()
                    steps.update()
                for p in steps.params:  # free the gradients (the final state is measured, not updated)
                    p.grad = None
        except BaseException:
            session.restore()
            raise
        extra = {**steps.extra, "rejected_steps": rejected, "rejected_losses": rejected_losses, "lr_scale": scale,
                 "retain_kl": retain}
        return EditInfo(steps=len(losses), losses=losses, max_abs_change=session.max_abs_change(),
                        parameter=session.param_name, seconds=time.perf_counter() - t0, extra=extra)

    def _run(self, session: EditSession, objective: Objective, request: DeletionRequest):
        """Context manager yielding the :class:`Steps` of one edit; code after the ``yield`` runs
        once the loop has finished (and may write the final edit or raise :class:`EditFailed`).
        Must be implemented by subclasses."""
        raise NotImplementedError

    def _stop(self, objective: Objective) -> float | None:
        return stop_threshold(self.early_stop, objective)
