"""The :class:`Editor` base: one MLP weight, one optimisation loop, one restore.

Every editor (``constrained-ft``, ``lora``, ``rome``) changes one decoder layer's MLP output
projection (``down_proj`` / ``c_proj`` / ``fc_out``) of a copy-on-write clone of the model
(:func:`probe.model.clone_model`). The base owns everything the editors share:

* the edit layer (``layer``, else ``layer_frac`` of depth) and the weight's name;
* :meth:`Editor.check`: every validation, before any output is written;
* the step loop of :meth:`Editor.edit`: interrupt checks, the loss of each step, ONE non-finite
  policy (restore the weight, raise :class:`EditFailed`), early stopping at the objective's
  threshold (``early_stop``), restore on any error;
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
from typing import Callable, ClassVar, Iterator

import torch

from probe.arch import get_attr_path, mlp_out_weight_name
from probe.errors import InputError
from probe.interrupt import check as check_interrupt
from probe.layers import layer_at_depth, resolve_layer
from probe.model import ProbeModel, clone_model
from probe.results import EditInfo

from .base import DeletionRequest, Objective
from .forward import stop_threshold

PROTOCOLS = ("one-at-a-time", "all-at-once")


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
        n: the most forward passes.
        loss: ``loss(step) -> (total loss tensor, objective value)``: zero the gradients and run
            one forward pass (the base checks the value, records it and stops early).
        update: ``update(loss)``: backward and optimiser step (and projection/clamp).
        stop: the early-stopping threshold on the objective value (None: never).
        measure_last: the last pass only measures (ROME: ``n - 1`` updates).
    """

    n: int
    loss: Callable[[int], tuple[torch.Tensor, float]]
    update: Callable[[torch.Tensor], None]
    stop: float | None = None
    measure_last: bool = False
    extra: dict = field(default_factory=dict)


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

        Raises:
            EditFailed: the loss became NaN/inf (the weight is restored first).
            ValueError: invalid request or settings (nothing is modified).
        """
        t0 = time.perf_counter()
        losses: list[float] = []
        try:
            with self._run(session, objective, request) as steps:
                for i in range(steps.n):
                    check_interrupt()
                    loss, obj_val = steps.loss(i)
                    val = float(loss.detach())
                    if not math.isfinite(val):
                        raise EditFailed(f"defense loss became {val} after {len(losses)} steps")
                    losses.append(val)
                    if (steps.stop is not None and obj_val < steps.stop) or (steps.measure_last and i == steps.n - 1):
                        break
                    steps.update(loss)
        except BaseException:
            session.restore()
            raise
        return EditInfo(steps=len(losses), losses=losses, max_abs_change=session.max_abs_change(),
                        parameter=session.param_name, seconds=time.perf_counter() - t0, extra=dict(steps.extra))

    def _run(self, session: EditSession, objective: Objective, request: DeletionRequest):
        """Context manager yielding the :class:`Steps` of one edit; code after the ``yield`` runs
        once the loop has finished (and may write the final edit or raise :class:`EditFailed`).
        Must be implemented by subclasses."""
        raise NotImplementedError

    def _stop(self, objective: Objective) -> float | None:
        return stop_threshold(self.early_stop, objective)
