"""Defenses: delete a fact from a model's weights with an objective optimised by an editor.

Objectives (:data:`OBJECTIVES`): ``fact-erasure``, ``empty-response``, ``error-injection``,
``head-projection``, ``max-entropy``, ``input-rephrasing``. Editors (:data:`EDITORS`):
``constrained-ft`` (and ``lora``, ``rome`` when present). See :mod:`defenses.base` for how to add
one, :mod:`defenses.metrics` for the scores.
"""

import importlib as _importlib

from . import fact_erasure, objectives  # noqa: F401  (register the objectives)
from .base import (EDITORS, OBJECTIVES, DeletionRequest, Objective, ObjectiveInputs, make_editor, make_objective,
                   register_editor, register_objective)
from .base import editor_for
from .constrained_ft import ConstrainedFineTune
from .editor import DefenseDiverged, EditFailed, EditInfo, Editor, EditSession
from .fact_erasure import FactErasure
from .metrics import (generation_accuracy, neighborhood_score, rewrite_score_erasure, rewrite_score_target)
from .objectives import EmptyResponse, ErrorInjection, HeadProjectionDefense, InputRephrasing, MaxEntropy

for _mod in ("lora", "rome"):  # editors registered by their own modules
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is absent
        if _exc.name != f"{__name__}.{_mod}":
            raise

__all__ = ["EDITORS", "OBJECTIVES", "DeletionRequest", "Objective", "ObjectiveInputs", "make_editor", "make_objective",
           "register_editor", "register_objective", "editor_for", "ConstrainedFineTune", "Editor", "EditInfo", "EditFailed",
           "DefenseDiverged", "EditSession",
           "FactErasure", "EmptyResponse", "ErrorInjection", "HeadProjectionDefense", "InputRephrasing", "MaxEntropy",
           "generation_accuracy", "neighborhood_score", "rewrite_score_erasure", "rewrite_score_target"]
