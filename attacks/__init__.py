"""Extraction attacks: decode a "deleted" answer back out of a model.

Every attack is an :class:`~attacks.base.Attack` registered by CLI name (:func:`register`) in one
registry (:data:`ATTACKS`), yielding one :class:`AttackOutcome` per fact:

* lens attacks (:mod:`attacks.lens`): ``head-projection``, ``probability-delta``, ``pd2`` on the
  logit lens, and ``tuned-lens`` (Head Projection on the tuned lens, :mod:`attacks.tuned_lens`);
* blackbox ``question-rephrase``, ``jailbreak``, ``image-rephrase``, ``multimodal-rephrase``
  (sampling, :mod:`attacks.blackbox`);
* ``relearning`` (fine-tune after the edit, then Head Projection, :mod:`attacks.relearning`);
* ``linear-probe`` (probes trained on the attacked model, :mod:`attacks.linear_probe`).

:func:`make_attack` builds any of them by name; :func:`evaluate_attacks` runs a list of attacks
on one model state (one lens sweep per readout); :func:`summarize` is the one summary type.
"""

from .base import (ATTACKS, CURVE_K, Attack, AttackContext, AttackOutcome, attack_fields, attack_names, make_attack,
                   register, success_at, summarize)
from .lens import PD2, HeadProjection, LensAttack, ProbabilityDelta, attack_readout, evaluate_attacks
from . import blackbox, relearning, tuned_lens, linear_probe  # noqa: E402,F401  (register themselves)

__all__ = ["ATTACKS", "CURVE_K", "Attack", "AttackContext", "AttackOutcome", "attack_fields", "attack_names",
           "make_attack", "register", "success_at", "summarize", "PD2", "HeadProjection", "LensAttack",
           "ProbabilityDelta", "evaluate_attacks", "attack_readout"]
