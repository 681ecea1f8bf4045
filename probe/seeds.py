"""Per-fact random streams: one recipe, one ``purpose`` string per kind of draw.

Every seeded per-fact draw of the project comes from here, keyed by the run seed, what the draw
is for (``purpose``) and the fact id, so two unrelated draws never share a stream and a fact's
draw does not depend on which other facts are in the run (resume-invariant):

* :func:`fact_seed` -> a 63-bit int (SHA-256; for ``torch.manual_seed``); purposes in use: each
  sampling attack's name (``question-rephrase``, ``jailbreak``, ``image-rephrase``, ...),
  ``relearning`` (its relearning-data choice and LoRA init / dropout masks) and ``causal-trace``
  (the causal-tracing noise, :data:`probe.causal.CAUSAL_TRACE`).
* :func:`fact_rng` -> a :class:`random.Random`; purposes in use: :data:`RETAIN` (retain-prompt
  selection), :data:`RANDOM_ACC` (the random Δ-Acc facts), :data:`ERROR_TARGET` (the
  error-injection target of a fact without ``alt_answer``), :data:`CONTROL` (the attack control),
  ``relearning-unknown`` (the never-known facts the relearning attack scores,
  :data:`attacks.relearning.UNKNOWN_SAMPLE`).

The streams keep the keys they had before this module existed (so results are unchanged):
``fact_rng`` seeds ``random.Random`` with ``"{purpose}:{seed}:{fact_id}"``, except the retain
selection, which keeps its historical key ``"{seed}:{fact_id}"``.
"""

from __future__ import annotations

import hashlib
import random

#: retain-prompt selection (:func:`defenses.retain.retain_prompts`)
RETAIN = "retain"
#: the other facts of the random Δ-Acc (:func:`probe.jobs.random_facts_for`)
RANDOM_ACC = "random-acc"
#: the error-injection defense's target when the fact has no ``alt_answer``
ERROR_TARGET = "error-injection-target"
#: the attack control answer of a fact (:func:`probe.controls.choose_controls`)
CONTROL = "control"

#: purposes whose ``random.Random`` key predates this module (kept so numbers do not change)
_LEGACY_KEYS = {RETAIN: "{seed}:{fact_id}"}


def fact_seed(seed: int, purpose: str, fact_id: str) -> int:
    """A 63-bit seed from the run seed, the draw's purpose and the fact id.

    Stable across processes and Python versions (SHA-256 of ``"{seed}\\x1f{purpose}\\x1f{fact_id}"``,
    not ``hash``).
    """
    h = hashlib.sha256(f"{int(seed)}\x1f{purpose}\x1f{fact_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def fact_rng(seed: int, purpose: str, fact_id: str) -> random.Random:
    """A :class:`random.Random` for one draw (``purpose``) about one fact under the run seed."""
    key = _LEGACY_KEYS.get(purpose, "{purpose}:{seed}:{fact_id}")
    return random.Random(key.format(purpose=purpose, seed=seed, fact_id=fact_id))
