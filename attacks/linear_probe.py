"""The ``linear-probe`` attack: per-relation linear probes read a deleted answer out of the hidden states.

Threat model (Patil, Hase & Bansal, ICLR 2024, section 3: a whitebox attacker with the model's
weights and the ability to read its hidden states): the attacker holds the *edited* model and a
pool of facts it may train on -- every fact of the run except the ones being deleted
(``ctx.deleted``) and the ones attacked. On the attacked model itself (after the edit) it fits,
**per relation**, one standardised multinomial logistic regression per layer from the residual
stream at the last prompt token to the answer string (:mod:`probe.probes`), trained on the
*other* facts of the attacked fact's relation, then decodes the attacked fact's prompt with them.

Why per relation (issue 11 item 5): a probe trained over all relations mostly learns which
relation the prompt asks about and that relation's most frequent answers -- on CounterFact such a
probe scored 67% top-4 already at layer 0, the same before and after deletion. Restricted to one
relation, the candidates are that relation's answers only (an answer of another relation is
never a candidate), and the question becomes whether the hidden state says *which* of them.

Candidate set and budget, as for Head Projection (:class:`attacks.lens.HeadProjection`): the
union over the layers ``L`` of the probe's top-``k`` classes, ``B = k |L|`` (no
de-duplication); success iff the answer is among them, i.e. ``best_rank = min_{l in L} rank_l
<= k``. With ``k = 4`` and ``|L| = 5``, ``B = 20`` like the logit-lens attacks.

Skipped facts: a probe can only name answers that are classes, i.e. answers of at least
``min_examples`` (default 2) training facts of the relation; a fact whose answer has fewer is
skipped (``AttackOutcome.skipped = "answer has < 2 training examples"``) and counted, never scored
-- on the built-in facts most answers are unique, and such facts used to fail by construction. A
fact without a relation, when other facts have one, is skipped too (``"fact has no relation"``).
When *no* fact carries a relation, all facts form one relation ``"any"`` and every outcome's
``details["relation_note"]`` says so.

Control (``control_kind = "relation prior"``): the same rule with the hidden state taken away --
the relation prior, i.e. the probe's classes ordered by their frequency among the same training
facts (ties by the answer string, ascending; :func:`probe.probes.prior_order`). The prior gets a
candidate set of the same size as the probe's: the first ``m`` answers, ``m`` = the number of
distinct answers in the probe's candidate set for this fact (``k <= m <= B``), so success minus
control is what the hidden state adds at equal candidate-set size. ``control_rank`` is the
answer's 1-based position in the prior (the control at plain top-``k`` is ``control_rank <= k``).

Default layers: 5 layers evenly spaced from one third of the depth to the last layer (SmolLM2-135M,
30 layers: {10, 15, 20, 24, 29}): factual recall happens in the middle of the network (ROME, Meng
et al. 2022, section 2; Geva et al. 2023, "Dissecting Recall"), where the logit lens is blind; the
last layer is included so the attack is never weaker than a probe on the model's own output state.
:func:`probe.probes.probe_cv_report` gives the per-layer cross-validated accuracy against the prior.

Cost: per model state and relation, one forward pass over at most ``max_train`` training facts
(default 200) and one fit per trained layer. The residual streams read are cached per fact in
``ctx.cache`` (fresh per model state), and so are the probes (per relation and training pool), so
the unedited model trains once per relation for the whole run, while every edited state (one per
fact in the one-at-a-time protocol) trains the attacked fact's relation once. Measured on SmolLM2
with CounterFact (``tests/benchmarks/linear_probe_relations.py``; one thread, 2 cores shared with
other jobs): a fresh model state costs 5-12 s per fact with ``rank_layers="all"`` (read <= 200
prompts + 30 fits) and 3-7 s with ``"attack"``; on the unedited model, with the cache shared by all
308 known facts, 144 s in all (0.47 s per fact).

Operating point: with ``k = 4`` and 5 layers the candidate set holds ~5 distinct answers, about as
many as a small relation has; the prior at that size already contains 87% of the known facts'
answers (95% of those whose answer is not in the prompt), so the excess over the control, not
the success, is the number to read; ``k = 1`` separates the two more (see the benchmark).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from probe.layers import resolve_layers, spread_layers
from probe.matching import answer_matches
from probe.pool import PROBE_MIN, PoolUse, top_up
from probe.probes import ANY_RELATION, LayerProbes, evenly_capped, fact_relations, prior_order, train_probes

from .base import Attack, AttackContext, AttackOutcome, register


@register("linear-probe")
@dataclass
class LinearProbeAttack(Attack):
    """Per-relation, per-layer linear probes trained on the attacked model's other facts.

    Attributes:
        k: classes per layer in the candidate set.
        layers: the attack's layers ``L`` (None: 5 layers spread from a third of depth to the last,
            :func:`probe.layers.spread_layers` with ``start_frac=1/3``).
        rank_layers: ``"all"`` trains a probe at every decoder layer so that
            ``AttackOutcome.layer_ranks`` covers all layers (for layer-wise plots); ``"attack"``
            trains only ``L`` (about ``n_layers / |L|`` times faster to fit) and leaves
            ``layer_ranks = None`` (the ranks at ``L`` are in ``details["ranks_at_L"]``).
        C, max_iter, min_examples: passed to :func:`probe.probes.train_probes`; ``min_examples``
            is also the skip rule (an answer with fewer training examples is not a class).
        batch_size: prompts per nnsight trace when reading the residual stream.
        max_train: at most this many training facts per relation, evenly spaced over the pool's
            order (deterministic); None = all. Reading them dominates the cost per model state.
    """

    readout = "probe"
    kind = "whitebox"
    control_kind = "relation prior"
    k: int = 4
    layers: Sequence[int] | None = None
    rank_layers: str = "all"
    C: float = 1.0
    max_iter: int = 30
    min_examples: int = 2
    batch_size: int = 32
    max_train: int | None = 200

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

    @property
    def skip_reason(self) -> str:
        return f"answer has < {self.min_examples} training examples"

    def training_pool(self, relation: str, attacked: Sequence[Any], ctx: AttackContext) -> list[Any]:
        """The facts the probes of ``relation`` train on (:meth:`training_data`)."""
        return self.training_data(relation, attacked, ctx)[0]

    def training_data(self, relation: str, attacked: Sequence[Any], ctx: AttackContext) -> tuple[list[Any], PoolUse]:
        """The facts the probes of ``relation`` train on and where they came from: ``ctx.facts`` of
        that relation minus ``ctx.deleted`` minus ``attacked`` (one at a time: every other fact of
        the file), at most ``max_train`` of them (evenly spaced); when those are fewer than
        :data:`probe.pool.PROBE_MIN`, topped up with the built-in facts of ``ctx.extra`` of the same
        relation (all of them for :data:`probe.probes.ANY_RELATION`) up to ``max_train`` in all --
        text facts only (a built-in text prompt is no training example for an image fact).

        With no relation on any fact of ``ctx.facts`` and ``attacked``, every fact belongs to
        :data:`probe.probes.ANY_RELATION`."""
        excluded = frozenset(ctx.deleted) | frozenset(str(f.id) for f in attacked)
        rels, _ = fact_relations(list(ctx.facts) + list(attacked))
        pool = evenly_capped([f for f, r in zip(ctx.facts, rels) if r == relation and str(f.id) not in excluded],
                             self.max_train)
        text = not any(getattr(f, "has_image", False) for f in [*pool, *attacked])
        extra = [g for g in ctx.extra if text and (relation == ANY_RELATION or g.relation == relation)]
        room = None if self.max_train is None else max(0, self.max_train - len(pool))
        return top_up(pool, evenly_capped(extra, room) if room != 0 else [], PROBE_MIN)

    def _hidden(self, model, facts: Sequence[Any], layers: list[int], ctx: AttackContext) -> np.ndarray:
        """Residual streams ``[n, len(layers), d_model]`` of ``facts`` on ``model``, read once per
        fact and model state (cached in ``ctx.cache``)."""
        from probe import probes as _probes  # looked up at call time (tests replace probe_dataset)

        store = ctx.cache.setdefault(("linear-probe", "resid", tuple(layers)), {})
        missing = list({str(f.id): f for f in facts if str(f.id) not in store}.values())
        if missing:
            X, _ = _probes.probe_dataset(model, missing, layers, batch_size=self.batch_size,
                                         progress=ctx.progress and len(missing) > self.batch_size)
            for f, x in zip(missing, X):
                store[str(f.id)] = x
        return np.stack([store[str(f.id)] for f in facts])

    def _probes(self, model, relation: str, pool: list[Any], layers: list[int], ctx: AttackContext) -> dict:
        """The relation's probes and prior on ``pool`` (cached per configuration and pool)."""
        key = ("linear-probe", repr(sorted(self.config().items())), relation, tuple(str(f.id) for f in pool))
        entry = ctx.cache.get(key)
        if entry is not None:
            return {**entry, "cached": True}
        t0 = time.perf_counter()
        X = self._hidden(model, pool, layers, ctx) if pool else None
        read_s = time.perf_counter() - t0
        labels = [str(f.answer).strip() for f in pool]
        probes = (train_probes(X, labels, layers, C=self.C, max_iter=self.max_iter, min_examples=self.min_examples)
                  if pool else None)
        classes = probes.classes if probes is not None else []
        entry = {"probes": probes, "prior": prior_order(labels, classes), "read_seconds": read_s}
        ctx.cache[key] = entry
        return {**entry, "cached": False}

    def run(self, model, facts: Sequence[Any], ctx: AttackContext) -> list[AttackOutcome]:
        """One outcome per fact: the relation probes' best rank of the answer over ``L`` on
        ``model``, and the relation prior's verdict at the same candidate-set size as control.

        Raises:
            ValueError: a bad ``layers`` / ``rank_layers``.
        """
        facts = list(facts)
        if not facts:
            return []
        n_layers = model.n_layers
        L = self.resolve_layers(n_layers)
        budget = self.k * len(L)
        train_layers = self._train_layers(n_layers)
        col = [train_layers.index(layer) for layer in L]
        rels_all, note = fact_relations(list(ctx.facts) + facts)
        rels = rels_all[len(ctx.facts):]
        out: list[AttackOutcome | None] = [None] * len(facts)
        for rel in sorted({r for r in rels if r is not None}):
            idx = [i for i, r in enumerate(rels) if r == rel]
            pool, use = self.training_data(rel, facts, ctx)
            entry = self._probes(model, rel, pool, train_layers, ctx)
            probes: LayerProbes | None = entry["probes"]
            classes = set(probes.classes) if probes is not None else set()
            scored = [i for i in idx if str(facts[i].answer).strip() in classes]
            for i in idx:
                if i not in scored:
                    out[i] = AttackOutcome.skip(budget, self.skip_reason, {"relation": rel, "pool": use.to_json()})
            if not scored:
                continue
            X = self._hidden(model, [facts[i] for i in scored], train_layers, ctx)
            answers = [str(facts[i].answer).strip() for i in scored]
            proba = probes.predict_proba(X)  # [n, n_train_layers, n_classes]
            ranks = probes.rank_from_proba(proba, answers)  # [n, n_train_layers]
            topk = probes.top_k_from_proba(proba[:, col], self.k)
            prior_rank = {a: j + 1 for j, a in enumerate(entry["prior"])}
            for row, i in enumerate(scored):
                f = facts[i]
                at_L = [int(ranks[row, c]) for c in col]
                best = min(at_L)
                candidates = sorted({c for lst in topk[row] for c in lst})
                m = len(candidates)
                c_rank = prior_rank[answers[row]]
                details = {
                    "relation": rel,
                    "layers": L,
                    "ranks_at_L": at_L,
                    "candidates": candidates,
                    "prior": entry["prior"][:m],
                    "n_classes": len(probes.classes),
                    "n_train": probes.n_train,
                    "answer_in_prompt": answer_matches(str(f.prompt), answers[row]),
                    "fit_seconds": round(probes.fit_seconds, 3),
                    "read_seconds": round(entry["read_seconds"], 3),
                    "pool": use.to_json(),
                    "cached_probes": entry["cached"],
                }
                if note:
                    details["relation_note"] = note
                out[i] = AttackOutcome(
                    success=best <= self.k, budget=budget, best_rank=int(best),
                    layer_ranks=[int(r) for r in ranks[row]] if self.rank_layers == "all" else None,
                    control=c_rank <= m, control_rank=int(c_rank), details=details)
        for i, r in enumerate(rels):
            if r is None:
                out[i] = AttackOutcome.skip(budget, "fact has no relation")
        return out
