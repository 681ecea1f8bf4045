"""The ``tuned-lens`` attack: Head Projection read through a tuned lens instead of the logit lens.

Candidate rule of Head Projection (Patil, Hase & Bansal, ICLR 2024, section 3.1): the union over
layers l in L of the top-k tokens of the lens distribution at the last prompt token, budget
B = k |L| (no de-duplication); here the distribution is the tuned lens's (Belrose et al. 2023,
section 3; :mod:`probe.tuned_lens`) rather than the logit lens's. The attack succeeds on a fact
when the answer's first token is in the candidate set, i.e. when its best (smallest, 1-based)
rank over the layers of L is ``<= k``.

Default layers: 5 layers evenly spaced from the middle of the network (depth n/2) to the last
layer (SmolLM2-135M, 30 layers: {15, 18, 22, 26, 29}; B = 4 x 5 = 20, the papers' budget). The
logit-lens Head Projection uses the last quarter (:func:`attacks.whitebox.default_layers`:
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
from typing import Any, Sequence

from probe.lens_training import get_tuned_lens
from probe.readout import lens_readout
from probe.tuned_lens import TunedLens

from .base import Attack, AttackContext, AttackOutcome, register
from .whitebox import default_layers, resolve_layer_list

#: Tuned lenses already loaded in this process, by model fingerprint (loaded once per process).
_LENSES: dict[str, TunedLens] = {}


def tuned_lens_layers(n_layers: int, count: int = 5) -> list[int]:
    """``count`` layers evenly spaced from depth ``n_layers / 2`` to the last layer (all layers if
    ``n_layers <= count``)."""
    return default_layers(n_layers, count, 0.5)


def _field(fact: Any, name: str):
    return fact[name] if isinstance(fact, dict) else getattr(fact, name)


@register("tuned-lens")
@dataclass
class TunedLensAttack(Attack):
    """Head Projection on tuned-lens distributions: top-``k`` at each layer of ``layers``, union.

    Attributes:
        k: candidates per layer (default 4).
        layers: decoder layers (negative allowed); None = :func:`tuned_lens_layers`.
        batch_size: prompts per trace (None = auto).
        train_if_missing: train (and cache) a lens when none is cached, else raise
            ``FileNotFoundError``.
        train_minutes: training budget when a lens must be trained.
    """

    k: int = 4
    layers: Sequence[int] | None = None
    batch_size: int | None = None
    train_if_missing: bool = True
    train_minutes: float = 8.0

    kind = "whitebox"

    def resolve_layers(self, n_layers: int) -> list[int]:
        """Sorted distinct non-negative layer indices.

        Raises:
            ValueError: a layer outside ``[-n_layers, n_layers)``.
        """
        if self.layers is None:
            return tuned_lens_layers(n_layers)
        return resolve_layer_list(self.layers, n_layers, self.name)

    def budget(self, n_layers: int, k: int | None = None) -> int:
        """Candidate-set size B = k |L|."""
        return (self.k if k is None else k) * len(self.resolve_layers(n_layers))

    def lens(self, model, ctx: AttackContext | None = None) -> TunedLens:
        """The tuned lens for ``model``'s fingerprint, bound to ``model`` (loaded once per process)."""
        lens = ctx.cache.get("tuned-lens") if ctx is not None else None
        if lens is None:
            lens = _LENSES.get(model.fingerprint)
            if lens is None:
                lens = get_tuned_lens(model, train_if_missing=self.train_if_missing, minutes=self.train_minutes,
                                      progress=bool(ctx and ctx.progress))
                _LENSES[model.fingerprint] = lens
            if ctx is not None:
                ctx.cache["tuned-lens"] = lens
        return lens.bind(model)

    def run(self, model, facts: Sequence[Any], ctx: AttackContext) -> list[AttackOutcome]:
        """One :class:`~attacks.base.AttackOutcome` per fact: ``best_rank`` = min over ``layers`` of
        the answer's first-token rank (1-based) under the tuned lens at the last prompt token,
        ``success = best_rank <= k``, ``layer_ranks`` = that rank at every layer, ``details``
        with the layers and the per-layer tuned-lens probabilities of the answer."""
        if not facts:
            return []
        n = model.n_layers
        layers = self.resolve_layers(n)
        lens = self.lens(model, ctx)
        prompts = [_field(f, "prompt") for f in facts]
        answers = [_field(f, "answer") for f in facts]
        readouts = lens_readout(model, prompts, answers, lens=lens, batch_size=self.batch_size,
                                progress=ctx.progress, desc="tuned-lens attack")
        budget = self.budget(n)
        out = []
        for r in readouts:
            best = min(r.rank[layer] for layer in layers)
            out.append(AttackOutcome(success=best <= self.k, budget=budget, best_rank=int(best),
                                     layer_ranks=list(r.rank),
                                     details={"layers": layers, "k": self.k, "layer_probs": list(r.prob)}))
        return out
