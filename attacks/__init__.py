"""Extraction attacks: decode a "deleted" answer back out of a model.

Whitebox attacks read the residual stream through the logit lens (:mod:`attacks.whitebox`):
``head-projection``, ``probability-delta`` and ``pd2``. :func:`run_attacks` measures attack
success@B for a list of facts on one model state.
"""

from .whitebox import (CURVE_K, PD2, WHITEBOX_ATTACKS, HeadProjection, ProbabilityDelta, WhiteboxAttack,
                       default_layers, make_attack, register_attack, success_at)
from .run import attack_readout, summarize_attacks

__all__ = ["CURVE_K", "PD2", "WHITEBOX_ATTACKS", "HeadProjection", "ProbabilityDelta", "WhiteboxAttack",
           "default_layers", "make_attack", "register_attack", "success_at", "attack_readout", "summarize_attacks"]
