"""Defenses: delete a fact from a model's weights with an objective optimised by an editor.

Objectives (:data:`OBJECTIVES`): ``fact-erasure``. Editors (:data:`EDITORS`): ``constrained-ft``.
See :mod:`defenses.base` for how to add one, :mod:`defenses.metrics` for the scores.
"""

from . import fact_erasure  # noqa: F401  (registers the objective)
from .base import EDITORS, OBJECTIVES, DeletionRequest, Objective, make_editor, make_objective, register_editor, register_objective
from .constrained_ft import ConstrainedFineTune, DefenseDiverged, EditSession
from .fact_erasure import FactErasure
from .metrics import (generation_accuracy, neighborhood_score, rewrite_score_erasure, rewrite_score_target)

__all__ = ["EDITORS", "OBJECTIVES", "DeletionRequest", "Objective", "make_editor", "make_objective", "register_editor",
           "register_objective", "ConstrainedFineTune", "DefenseDiverged", "EditSession", "FactErasure",
           "generation_accuracy", "neighborhood_score", "rewrite_score_erasure", "rewrite_score_target"]
