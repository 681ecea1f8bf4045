"""The ``linear-probe`` attack: trained per-layer probes read a deleted answer out of middle layers.

Threat model (Patil, Hase & Bansal, ICLR 2024, section 3: a whitebox attacker with the model's
weights and the ability to read its hidden states): the attacker holds the *edited* model and a
pool of facts it may train on -- every fact of the run except the ones being deleted (and the ones
attacked). On the attacked model itself (after the edit) it fits one standardised multinomial
logistic regression per layer from the residual stream at the last prompt token to the answer
string (:mod:`probe.probes`), then decodes each deleted fact's prompt with them.

Candidate set and budget, as for Head Projection (:class:`attacks.lens.HeadProjection`): the
union over the layers ``L`` of the probe's top-``k`` classes, ``B = k |L|`` (no
de-duplication); success iff the answer is among them, i.e. ``best_rank = min_{l in L} rank_l
<= k``. With ``k = 4`` and ``|L| = 5``, ``B = 20`` like the logit-lens attacks.

Default layers: 5 layers evenly spaced from one third of the depth to the last layer (SmolLM2-135M,
30 layers: {10, 15, 20, 24, 29}). Rationale: the point of a probe is the middle of the network,
where the logit lens is blind (SmolLM2: median lens rank ~20k up to layer 22); factual recall
happens there (ROME, Meng et al. 2022, section 2: mid-layer MLPs at the subject, moved to the
last token by attention in upper-middle layers; Geva et al. 2023, "Dissecting Recall"). Below
about a third of the depth the last token mostly encodes the prompt's *relation* (measured on the
308 CounterFact facts SmolLM2 knows: layer-0 probes already reach 0.44 held-out accuracy against
a 0.18 majority class, from the template alone; accuracy plateaus at ~0.62-0.67 over layers
4-22 and rises to ~0.81 from layer 23), so those layers would spend budget on a relation prior. The last layer
is included so the attack is never weaker than a probe on the model's own output state.

Limits of a probe attack (documented in each outcome's ``details``): it can only name answers
that are classes of its probes, i.e. answers of at least ``min_examples`` (default 2) training
facts; a deleted fact with a unique answer gets ``best_rank = UNRANKED`` and
``details["answer_is_class"] = False``.

Cost: the probes are cached per model state in ``ctx.cache`` (fresh per model state). Training
the probes takes seconds (lbfgs capped at ``max_iter=30``; SmolLM2, 307 training facts, one
contended CPU thread: 4.3 s for all 30 layers, 0.3-0.8 s for the 5 attack layers with
``rank_layers="attack"``; ``tests/benchmarks/probe_timing.py``); reading the training pool's
residual stream is one batched forward over the pool (14-25 s there) and dominates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from probe.layers import resolve_layers, spread_layers
from probe.probes import UNRANKED, LayerProbes, train_probes

from .base import Attack, AttackContext, AttackOutcome, register


@register("linear-probe")
@dataclass
class LinearProbeAttack(Attack):
    """Per-layer linear probes trained on the attacked model's non-deleted facts.

    Attributes:
        k: classes per layer in the candidate set.
        layers: the attack's layers ``L`` (None: 5 layers spread from a third of depth to the last,
            :func:`probe.layers.spread_layers` with ``start_frac=1/3``).
        rank_layers: ``"all"`` trains a probe at every decoder layer so that
            ``AttackOutcome.layer_ranks`` covers all layers (for layer-wise plots); ``"attack"``
            trains only ``L`` (about ``n_layers / |L|`` times faster) and leaves
            ``layer_ranks = None`` (the ranks at ``L`` are in ``details["ranks_at_L"]``).
        C, max_iter, min_examples: passed to :func:`probe.probes.train_probes`.
        batch_size: prompts per nnsight trace when reading the residual stream.
        max_train: at most this many training facts, taken evenly spaced over the pool's order
            (deterministic; a file sorted by relation keeps every relation); None = all.
            Reading the pool's residual stream dominates the cost per model state.
    """

    readout = "probe"

    kind = "whitebox"
    k: int = 4
    layers: Sequence[int] | None = None
    rank_layers: str = "all"
    C: float = 1.0
    max_iter: int = 30
    min_examples: int = 2
    batch_size: int = 32
    max_train: int | None = 400

    def resolve_layers(self, n_layers: int) -> list[int]:
        if self.layers is None:
            return spread_layers(n_layers, 5, start_frac=1 / 3)
        return resolve_layers(self.layers, n_layers, f"{self.name}: layer")

    def budget(self, n_layers: int) -> int:
        """``B = k |L|``."""
        return self.k * len(self.resolve_layers(n_layers))

    def attack_layers(self, n_layers: int) -> list[int]:
        return self.resolve_layers(n_layers)

    def per_list_k(self) -> int:
        return self.k

    def curve_budget(self, n_layers: int, k: int) -> int:
        return k * len(self.resolve_layers(n_layers))

    def _train_layers(self, n_layers: int) -> list[int]:
        if self.rank_layers == "all":
            return list(range(n_layers))
        if self.rank_layers == "attack":
            return self.resolve_layers(n_layers)
        raise ValueError(f"rank_layers must be 'all' or 'attack', got {self.rank_layers!r}")

    def train(self, model, pool: Sequence[Any], *, progress: bool = False) -> tuple[LayerProbes, float]:
        """Fit the probes on ``pool`` (facts) read from ``model`` as it is.

        Returns:
            ``(probes, read_seconds)``: the probes (``probes.fit_seconds`` = fitting time) and the
            time spent reading the residual stream.
        """
        from probe.probes import probe_dataset

        train_layers = self._train_layers(model.n_layers)
        t0 = time.perf_counter()
        X, y = probe_dataset(model, pool, train_layers, batch_size=self.batch_size, progress=progress)
        read_s = time.perf_counter() - t0
        probes = train_probes(X, y, train_layers, C=self.C, max_iter=self.max_iter,
                              min_examples=self.min_examples)
        return probes, read_s

    def run(self, model, facts: Sequence[Any], ctx: AttackContext) -> list[AttackOutcome]:
        """One outcome per fact: the probes' best rank of the answer over ``L`` on ``model``.

        The training pool is ``ctx.facts`` minus ``ctx.deleted`` minus ``facts``; the trained
        probes are cached in ``ctx.cache`` under a key naming this attack's configuration and
        the excluded ids, so several calls on one model state train once.

        Raises:
            ValueError: the training pool is empty, or a bad ``layers`` / ``rank_layers``.
        """
        from probe.probes import probe_dataset

        facts = list(facts)
        if not facts:
            return []
        n_layers = model.n_layers
        L = self.resolve_layers(n_layers)
        budget = self.k * len(L)
        excluded = frozenset(ctx.deleted) | frozenset(str(f.id) for f in facts)
        key = ("linear-probe", repr(sorted(self.config().items())), excluded)
        entry = ctx.cache.get(key)
        if entry is None:
            pool = [f for f in ctx.facts if str(f.id) not in excluded]
            if self.max_train is not None and len(pool) > self.max_train:
                step = len(pool) / self.max_train
                pool = [pool[int(i * step)] for i in range(self.max_train)]
            if not pool:
                raise ValueError("linear-probe: no facts left to train on (every fact is deleted or attacked)")
            probes, read_s = self.train(model, pool, progress=ctx.progress)
            entry = {"probes": probes, "read_seconds": read_s}
            ctx.cache[key] = entry
            cached = False
        else:
            cached = True
        probes: LayerProbes = entry["probes"]
        X, answers = probe_dataset(model, facts, probes.layers, batch_size=self.batch_size)
        proba = probes.predict_proba(X)  # [n, n_train_layers, n_classes]
        ranks = probes.rank_from_proba(proba, answers)  # [n, n_train_layers]
        col = {layer: j for j, layer in enumerate(probes.layers)}
        classes = set(probes.classes)
        topk = probes.top_k_from_proba(proba[:, [col[layer] for layer in L]], self.k)
        out = []
        for i, f in enumerate(facts):
            at_L = [int(ranks[i, col[layer]]) for layer in L]
            best = min(at_L) if at_L else UNRANKED
            layer_ranks = [int(r) for r in ranks[i]] if self.rank_layers == "all" else None
            out.append(AttackOutcome(
                success=best <= self.k, budget=budget, best_rank=int(best), layer_ranks=layer_ranks,
                details={
                    "answer_is_class": answers[i] in classes,
                    "layers": L,
                    "ranks_at_L": at_L,
                    "candidates": sorted({c for row in topk[i] for c in row}),
                    "n_classes": len(probes.classes),
                    "n_train": probes.n_train,
                    "fit_seconds": round(probes.fit_seconds, 3),
                    "read_seconds": round(entry["read_seconds"], 3),
                    "cached_probes": cached,
                }))
        return out
