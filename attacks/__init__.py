"""Extraction attacks: decode a "deleted" answer back out of a model.

* Logit-lens whitebox attacks (:mod:`attacks.whitebox`), scored together from one lens sweep:
  ``head-projection``, ``probability-delta``, ``pd2``.
* Attacks with their own :meth:`~attacks.base.Attack.run` (:mod:`attacks.base`): blackbox
  ``question-rephrase`` and ``jailbreak`` (sampling), ``relearning`` (fine-tune after the edit,
  then attack), and the middle-layer readers ``tuned-lens`` and ``linear-probe``.

:func:`make_attack` builds any of them by name; :func:`attack_readout` runs the lens sweep.
"""

import importlib as _importlib

from .base import ATTACKS, Attack, AttackContext, AttackOutcome, register
from .whitebox import (CURVE_K, PD2, WHITEBOX_ATTACKS, HeadProjection, ProbabilityDelta, WhiteboxAttack,
                       all_attack_names, make_attack, register_attack, success_at)
from .run import attack_readout, summarize_attacks

for _mod in ("blackbox", "relearning", "tuned_lens", "linear_probe"):  # register themselves
    try:
        _importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is absent
        if _exc.name != f"{__name__}.{_mod}":
            raise

__all__ = ["ATTACKS", "Attack", "AttackContext", "AttackOutcome", "register", "CURVE_K", "PD2", "WHITEBOX_ATTACKS",
           "HeadProjection", "ProbabilityDelta", "WhiteboxAttack", "all_attack_names", "make_attack",
           "register_attack", "success_at", "attack_readout", "summarize_attacks"]
