"""The ``tuned-lens`` attack: Head Projection read through a tuned lens instead of the logit lens.

It is :class:`attacks.lens.HeadProjection` with ``lens="tuned"`` and its own default layers; the
jobs score it from one tuned-lens sweep per model state (:func:`attacks.lens.evaluate_attacks`).

Candidate rule of Head Projection (Patil, Hase & Bansal, ICLR 2024, section 3.1): the union over
layers l in L of the top-k tokens of the lens distribution at the last prompt token, budget
B = k |L| (no de-duplication); here the distribution is the tuned lens's (Belrose et al. 2023,
section 3; :mod:`probe.tuned_lens`) rather than the logit lens's. The attack succeeds on a fact
when the answer's first token is in the candidate set, i.e. when its best (smallest, 1-based)
rank over the layers of L is ``<= k``.

Default layers: 5 layers evenly spaced from the middle of the network (depth n/2) to the last
layer (SmolLM2-135M, 30 layers: {15, 18, 22, 26, 29}; B = 4 x 5 = 20, the papers' budget). The
logit-lens Head Projection uses the last quarter (:func:`probe.layers.spread_layers`:
{22, 24, 26, 27, 29}), where the logit lens is already readable; the point of a tuned lens is to
read earlier layers, so the span reaches back to the middle while keeping the last layer, where
the model itself says the answer. Measured on SmolLM2 (300 CounterFact facts, lens trained for 8
minutes): the tuned lens puts the answer in the top 4 for ~50 % of facts at layers 23-28 (logit
lens: 0-4 %), 16 % at 22, 5 % at 21 and ~0 before; success@20 is 0.58 with these layers, 0.58 with
{10, 15, 20, 24, 29} (a third of the depth) and 0.61 with the logit-lens layers -- the middle
layers are included for coverage of what a deletion may leave there, not because an unedited
135M model already states the answer there. Models with 5 layers or fewer use all of them.

The lens is the one trained on the *unedited* model (:func:`probe.lens_training.get_tuned_lens`,
keyed by ``model.fingerprint``, which edited clones share with their original): the attacker
learns the translators once, from the model before deletion and from generic text, and decodes
the edited model's residuals with them through the edited model's own final norm and unembedding.
If no lens is cached, the first call trains one (minutes; ``probe-attack tuned-lens`` does it
ahead of time) -- call it on the unedited model first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from probe.layers import spread_layers
from probe.lens_training import get_tuned_lens
from probe.tuned_lens import TunedLens

from .base import AttackContext, register
from .lens import HeadProjection

#: Tuned lenses already loaded in this process, by model fingerprint (loaded once per process).
_LENSES: dict[str, TunedLens] = {}


def tuned_lens_layers(n_layers: int, count: int = 5) -> list[int]:
    """``count`` layers evenly spaced from depth ``n_layers / 2`` to the last layer (all layers if
    ``n_layers <= count``)."""
    return spread_layers(n_layers, count, span_frac=0.5)


def tuned_lens_for(model, ctx: AttackContext | None = None, *, train_if_missing: bool = True,
                   minutes: float = 8.0) -> TunedLens:
    """The tuned lens for ``model``'s fingerprint, bound to ``model`` (loaded once per process;
    trained and cached when missing and ``train_if_missing``).

    Raises:
        FileNotFoundError: no cached lens and ``train_if_missing=False``.
    """
    lens = ctx.cache.get("tuned-lens") if ctx is not None else None
    if lens is None:
        lens = _LENSES.get(model.fingerprint)
        if lens is None:
            lens = get_tuned_lens(model, train_if_missing=train_if_missing, minutes=minutes,
                                  progress=bool(ctx and ctx.progress))
            _LENSES[model.fingerprint] = lens
        if ctx is not None:
            ctx.cache["tuned-lens"] = lens
    return lens.bind(model)


@register("tuned-lens")
@dataclass
class TunedLensAttack(HeadProjection):
    """Head Projection on tuned-lens distributions: top-``k`` at each layer of ``layers``, union.

    Attributes:
        k: candidates per layer (default 4).
        layers: decoder layers (negative allowed); None = :func:`tuned_lens_layers`.
        lens: ``"tuned"`` (fixed by this attack's purpose; ``head-projection`` with ``lens="tuned"``
            is the same rule at the logit-lens attack's layers).
        train_if_missing: train (and cache) a lens when none is cached, else raise
            ``FileNotFoundError``.
        train_minutes: training budget when a lens must be trained.
    """

    k: int = 4
    layers: Sequence[int] | None = None
    lens: str = "tuned"
    train_if_missing: bool = True
    train_minutes: float = 8.0

    def default_layers(self, n_layers: int) -> list[int]:
        return tuned_lens_layers(n_layers)
