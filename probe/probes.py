"""Linear probes: per-layer classifiers from the residual stream to the answer string.

The logit lens only decodes answers in the last few layers of small models (SmolLM2-135M: the
last ~6 of 30). A *trained* linear probe reads a layer in its own basis, so it shows where the
answer is linearly decodable earlier. Following the probing attacks of Patil, Hase & Bansal
(ICLR 2024, section 3.1, "the attacker has the model's weights") and the standard linear-probe
methodology (Alain & Bengio 2016; Belinkov 2022, "Probing Classifiers"), one multinomial logistic
regression per decoder layer maps the residual stream at the **last prompt token** to the
answer, for facts that share an answer vocabulary (CounterFact: many facts per answer, e.g.
"French", "Toyota").

Conventions:

* features: the residual stream after decoder block ``l`` (``probe.residual_stream``), fp32,
  standardised per layer (zero mean, unit variance per feature, fitted on the training set);
* classifier: scikit-learn ``LogisticRegression`` (lbfgs, multinomial soft-max loss for more
  than two classes, L2 with ``C``), ``random_state`` fixed: a probe is a deterministic function
  of its training data;
* classes: answer strings (stripped). Answers with fewer than ``min_examples`` (default 2)
  training examples are **dropped** before fitting -- a class seen once is a memorised point,
  not a direction in the residual stream -- and are treated like any answer the probe never saw
  (see :data:`UNRANKED`);
* ranks are 1-based among the probe's classes (ties count for the answer, as in
  :func:`probe.readout.answer_rank`); an answer that is not a class gets :data:`UNRANKED`.

Per relation (issue 11 item 5). A probe over all of CounterFact mostly learns the relation the
prompt asks about and that relation's frequent answers (layer 0 already scores well), so the
``linear-probe`` attack and the report's cross-validation train one set of probes per relation
(:func:`fact_relations`: facts without any relation form one relation :data:`ANY_RELATION`) and
compare them with the **relation prior** (:func:`prior_order`: the relation's answers by training
frequency, no hidden state). :func:`relation_cv` / :func:`probe_cv_report` give the per-layer
held-out accuracy of both, pooled over relations.

Nothing here runs on a GPU or downloads anything; :func:`probe_dataset` (and
:func:`probe_cv_report`, through it) is the only function that runs the model.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: Rank given to an answer that is not among a probe's classes (never seen in training, or
#: dropped for having fewer than ``min_examples`` examples): ``2**63 - 1``, larger than any class
#: count, so ``rank <= k`` is False for every k. The same sentinel as the logit-lens attacks use
#: for "no candidate list" (``torch.iinfo(torch.long).max``). Plots treat it as "not ranked".
UNRANKED = int(np.iinfo(np.int64).max)

__all__ = ["UNRANKED", "ANY_RELATION", "LayerProbes", "CVResult", "probe_dataset", "train_probes",
           "cross_validated_accuracy", "fact_relations", "prior_order", "evenly_capped", "relation_cv",
           "probe_cv_report"]

#: The one relation all facts share when no fact of a file carries a ``relation``.
ANY_RELATION = "any"
#: What results say when :data:`ANY_RELATION` was used.
ANY_RELATION_NOTE = "the facts carry no relation: all facts were treated as one relation 'any'"


def probe_dataset(model, facts: Sequence[Any], layers: int | Sequence[int] | None = None, *,
                  batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Residual stream at the last prompt token of each fact, and the facts' answers.

    Args:
        model: a :class:`~probe.model.ProbeModel` (read as it is: inside an
            :func:`~probe.edit_residual` block, or an edited copy, the edited states are read).
        facts: objects with ``.prompt`` and ``.answer`` (:class:`~probe.facts.Fact`).
        layers: decoder-layer indices (negative allowed); None = all layers. The layer axis of
            ``X`` follows the sorted, de-duplicated list (:func:`probe.residual.normalize_layers`).
        batch_size: prompts per nnsight trace.

    Returns:
        ``(X, labels)``: ``X`` float32 ``[n_facts, n_layers, d_model]``; ``labels`` the answers
        (stripped strings), one per fact.

    Raises:
        ValueError: no facts. InputError / PromptTooLongError / IndexError: as
        :func:`probe.residual_stream`.
    """
    from .residual import residual_stream

    facts = list(facts)
    if not facts:
        raise ValueError("probe_dataset needs at least one fact")
    resid = residual_stream(model, [f.prompt for f in facts], layers, -1, batch_size=batch_size, progress=progress)
    return resid.float().cpu().numpy(), [str(f.answer).strip() for f in facts]


def _check_X(X, n_layers: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 3:
        raise ValueError(f"X must be [n, n_layers, d_model], got shape {X.shape}")
    if n_layers is not None and X.shape[1] != n_layers:
        raise ValueError(f"X has {X.shape[1]} layers, the probes were trained on {n_layers}")
    return X


@dataclass
class LayerProbes:
    """One trained linear probe per layer (standardiser + multinomial logistic regression).

    Attributes:
        layers: decoder-layer index of each entry of X's layer axis (``[n_layers]``).
        classes: the answer strings the probes can output, sorted (shared by all layers).
        scalers: per layer ``(mean [d], scale [d])`` float32 of the standardisation, or None for
            a degenerate probe (fewer than two classes).
        models: per layer a fitted ``LogisticRegression`` (None when degenerate).
        n_train: number of training examples kept (after dropping rare answers).
        dropped: answers dropped for having fewer than ``min_examples`` examples -> count.
        fit_seconds: wall-clock time of the fit, all layers.
    """

    layers: list[int]
    classes: list[str]
    scalers: list[tuple[np.ndarray, np.ndarray] | None]
    models: list[Any]
    n_train: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    fit_seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def predict_proba(self, X_new) -> np.ndarray:
        """Probe probabilities over :attr:`classes`.

        Args:
            X_new: ``[n, n_layers, d_model]`` residual streams, same layer axis as training.

        Returns:
            float64 ``[n, n_layers, n_classes]`` (rows sum to 1; ``[n, n_layers, 0]`` when the
            probes have no class; a single class gets probability 1).

        Raises:
            ValueError: wrong shape.
        """
        X_new = _check_X(X_new, self.n_layers)
        n, C = X_new.shape[0], len(self.classes)
        out = np.zeros((n, self.n_layers, C), dtype=np.float64)
        if C == 1:
            out[...] = 1.0
            return out
        for j, (sc, clf) in enumerate(zip(self.scalers, self.models)):
            if clf is None or sc is None:
                continue
            mean, scale = sc
            out[:, j] = clf.predict_proba((X_new[:, j] - mean) / scale)
        return out

    def top_k(self, X_new, k: int) -> list[list[list[str]]]:
        """The ``k`` most probable classes per example and layer: ``[n][n_layers][<=k]`` strings."""
        return self.top_k_from_proba(self.predict_proba(X_new), k)

    def top_k_from_proba(self, p: np.ndarray, k: int) -> list[list[list[str]]]:
        """:meth:`top_k` from probabilities ``[n, n_layers', n_classes]`` (any subset of layers)."""
        order = np.argsort(-p, axis=-1, kind="stable")[..., :k]
        return [[[self.classes[c] for c in row] for row in ex] for ex in order]

    def rank(self, X_new, answer: str | Sequence[str]) -> np.ndarray:
        """1-based rank of the answer among the probe's classes, per example and layer.

        Args:
            X_new: ``[n, n_layers, d_model]``.
            answer: one answer for all rows, or one per row (stripped before comparison).

        Returns:
            int64 ``[n, n_layers]``: ``1 + #{classes with a higher probability}`` (ties count for
            the answer). An answer that is not a class gets :data:`UNRANKED` at every layer.

        Raises:
            ValueError: wrong shape, or ``len(answer) != n``.
        """
        return self.rank_from_proba(self.predict_proba(X_new), answer)

    def rank_from_proba(self, p: np.ndarray, answer: str | Sequence[str]) -> np.ndarray:
        """:meth:`rank` from probabilities ``p`` ``[n, n_layers, n_classes]`` already computed by
        :meth:`predict_proba` (int64 ``[n, n_layers]``, :data:`UNRANKED` for non-classes)."""
        n = p.shape[0]
        answers = [answer] * n if isinstance(answer, str) else list(answer)
        if len(answers) != n:
            raise ValueError(f"{len(answers)} answers for {n} rows")
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.full((n, self.n_layers), UNRANKED, dtype=np.int64)
        for i, a in enumerate(answers):
            c = index.get(str(a).strip())
            if c is None:
                continue
            out[i] = (p[i] > p[i, :, c:c + 1]).sum(-1) + 1
        return out

    def predict(self, X_new) -> np.ndarray:
        """Most probable class per example and layer: object array ``[n, n_layers]`` of strings
        (None when the probes have no class)."""
        p = self.predict_proba(X_new)
        out = np.empty(p.shape[:2], dtype=object)
        if p.shape[-1]:
            cls = np.asarray(self.classes, dtype=object)
            out[...] = cls[p.argmax(-1)]
        return out


def train_probes(X, labels: Sequence[str], layers: Sequence[int] | None = None, *, C: float = 1.0,
                 max_iter: int = 100, min_examples: int = 2, seed: int = 0) -> LayerProbes:
    """Fit one standardised multinomial logistic regression per layer of ``X``.

    Args:
        X: ``[n, n_layers, d_model]`` residual streams (e.g. from :func:`probe_dataset`).
        labels: ``[n]`` answer strings.
        layers: the decoder-layer index of each entry of X's layer axis (default
            ``0..n_layers-1``); only used to label the probes.
        C: inverse L2 strength (scikit-learn convention).
        max_iter: lbfgs iterations per layer (a cap; non-convergence warnings are silenced:
            the probes are used for ranking, and more iterations barely change held-out
            accuracy, see ``tests/benchmarks/probe_timing.py``).
        min_examples: answers with fewer training examples are dropped before fitting
            (reported in ``LayerProbes.dropped``); they are then "not a class"
            (:data:`UNRANKED`). Use 1 to keep every answer.
        seed: ``random_state`` of the classifiers.

    Returns:
        :class:`LayerProbes`. With fewer than two classes left the probes are degenerate: no
        classifier is fitted, one class ranks 1 everywhere, no class means everything is
        :data:`UNRANKED`.

    Raises:
        ValueError: ``len(labels) != n``, wrong ``X`` shape, or ``len(layers) != n_layers``.
    """
    import time

    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    X = _check_X(X)
    labels = [str(a).strip() for a in labels]
    if len(labels) != X.shape[0]:
        raise ValueError(f"{len(labels)} labels for {X.shape[0]} examples")
    layers = list(range(X.shape[1])) if layers is None else [int(x) for x in layers]
    if len(layers) != X.shape[1]:
        raise ValueError(f"{len(layers)} layer indices for an X with {X.shape[1]} layers")
    counts = Counter(labels)
    dropped = {a: c for a, c in sorted(counts.items()) if c < min_examples}
    keep = np.array([a not in dropped for a in labels], dtype=bool)
    y = np.asarray(labels, dtype=object)[keep]
    classes = sorted(set(y.tolist()))
    scalers: list = [None] * len(layers)
    models: list = [None] * len(layers)
    if len(classes) >= 2:
        Xk = X[keep]
        for j in range(len(layers)):
            feats = Xk[:, j].astype(np.float64)
            mean = feats.mean(0)
            scale = feats.std(0)
            scale[scale < 1e-12] = 1.0
            clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning at a capped max_iter
                clf.fit((feats - mean) / scale, y)
            if list(clf.classes_) != classes:  # sklearn sorts classes too; keep the invariant explicit
                raise RuntimeError("class order mismatch")
            scalers[j] = (mean.astype(np.float32), scale.astype(np.float32))
            models[j] = clf
    return LayerProbes(layers=layers, classes=classes, scalers=scalers, models=models, n_train=int(keep.sum()),
                       dropped=dropped, fit_seconds=time.perf_counter() - t0)


@dataclass
class CVResult:
    """Cross-validated accuracy of the per-layer probes.

    Attributes:
        layers: decoder-layer index of each entry.
        accuracy: per layer, the fraction of held-out examples whose top-1 probe class is the
            answer (0..1); examples whose answer is absent from a fold's training set count as
            wrong.
        chance: majority-class fraction of all labels (the accuracy of always answering the
            most frequent answer).
        majority: the most frequent answer.
        folds: number of folds actually used.
        stratified: whether ``StratifiedKFold`` was used (else a shuffled ``KFold``).
        n: number of examples; n_classes: number of distinct answers.
    """

    layers: list[int]
    accuracy: list[float]
    chance: float
    majority: str
    folds: int
    stratified: bool
    n: int
    n_classes: int

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def cross_validated_accuracy(X, labels: Sequence[str], folds: int = 5, *, layers: Sequence[int] | None = None,
                             seed: int = 0, **train_kwargs) -> CVResult:
    """K-fold held-out top-1 accuracy of :func:`train_probes`, per layer.

    Folds are stratified by answer (``StratifiedKFold``, shuffled with ``seed``) when at least one
    answer has ``folds`` examples -- rarer answers are then spread as evenly as possible -- else a
    shuffled ``KFold``. ``folds`` is capped at the number of examples.

    Args:
        X: ``[n, n_layers, d_model]``; labels: ``[n]`` answers.
        folds: number of folds (>= 2).
        layers: decoder-layer labels of X's layer axis.
        train_kwargs: passed to :func:`train_probes` (``C``, ``max_iter``, ``min_examples``).

    Returns:
        :class:`CVResult` with per-layer accuracy and the majority-class chance level.

    Raises:
        ValueError: fewer than 2 examples or ``folds < 2``.
    """
    X = _check_X(X)
    labels = [str(a).strip() for a in labels]
    n = X.shape[0]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} examples")
    if n < 2 or folds < 2:
        raise ValueError("cross-validation needs at least 2 examples and 2 folds")
    folds = min(folds, n)
    counts = Counter(labels)
    majority, top = counts.most_common(1)[0]
    y = np.asarray(labels, dtype=object)
    splits, stratified = _splits(labels, folds, seed)
    correct = np.zeros(X.shape[1], dtype=np.int64)
    for train, test in splits:
        probes = train_probes(X[train], y[train].tolist(), layers, seed=seed, **train_kwargs)
        pred = probes.predict(X[test])  # [n_test, n_layers]
        correct += (pred == y[test][:, None]).sum(0)
    layer_ids = list(range(X.shape[1])) if layers is None else [int(x) for x in layers]
    return CVResult(layers=layer_ids, accuracy=(correct / n).tolist(), chance=top / n, majority=majority,
                    folds=folds, stratified=stratified, n=n, n_classes=len(counts))


# ------------------------------------------------------------------------------------------
# per-relation probes and the relation prior (issue 11 item 5)


def fact_relations(facts: Sequence[Any]) -> tuple[list[str | None], str | None]:
    """The relation each fact's probe is trained within.

    Args:
        facts: objects with an optional ``.relation`` (:class:`~probe.facts.Fact`).

    Returns:
        ``(relations, note)``: one relation per fact (``None`` for a fact without one when other
        facts have one: such a fact has no relation to train within); when *no* fact has a
        relation, every fact gets :data:`ANY_RELATION` and ``note`` is :data:`ANY_RELATION_NOTE`
        (else ``note`` is None).
    """
    rels = [getattr(f, "relation", None) or None for f in facts]
    if all(r is None for r in rels):
        return [ANY_RELATION] * len(rels), ANY_RELATION_NOTE
    return rels, None


def prior_order(labels: Sequence[str], classes: Sequence[str] | None = None) -> list[str]:
    """The relation prior: answers by decreasing training frequency, no hidden state.

    Ties are broken by the answer string in ascending code-point order (Python ``str`` order), so
    the order is a deterministic function of the training labels and independent of the attacked
    fact and of the order of the training set.

    Args:
        labels: training answers (stripped before counting).
        classes: restrict to these answers (the probe's classes, i.e. answers with at least
            ``min_examples`` training examples); None = every label.

    Returns:
        The answers, most frequent first; the prior's top-``m`` set is the first ``m`` entries
        and an answer's prior rank is its 1-based position.
    """
    counts = Counter(str(a).strip() for a in labels)
    keep = counts.keys() if classes is None else [c for c in classes if c in counts]
    return sorted(keep, key=lambda a: (-counts[a], a))


def evenly_capped(items: Sequence[Any], cap: int | None) -> list[Any]:
    """At most ``cap`` items taken evenly spaced over ``items``' order (deterministic; all when
    ``cap`` is None or not exceeded)."""
    items = list(items)
    if cap is None or len(items) <= cap:
        return items
    step = len(items) / cap
    return [items[int(i * step)] for i in range(cap)]


def _splits(labels: Sequence[str], folds: int, seed: int) -> tuple[list, bool]:
    """K-fold ``(train, test)`` index pairs: stratified by answer when at least one answer has
    ``folds`` examples, else a shuffled ``KFold``; ``(splits, stratified)``."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(labels)
    stratified = Counter(labels).most_common(1)[0][1] >= folds
    splitter = (StratifiedKFold if stratified else KFold)(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has only 1 member"
        return list(splitter.split(np.zeros(n), np.asarray(labels, dtype=object))), stratified


def relation_cv(X, labels: Sequence[str], relations: Sequence[str | None], folds: int = 5, *,
                layers: Sequence[int] | None = None, k: int = 4, seed: int = 0, min_examples: int = 2,
                **train_kwargs) -> dict:
    """Cross-validated per-layer accuracy of per-relation probes against the relation prior.

    Within each relation, ``folds``-fold cross-validation (stratified by answer when some answer
    has ``folds`` examples, shuffled with ``seed``; ``folds`` capped at the relation's size): on
    every training part, per-layer probes (:func:`train_probes`, ``min_examples``) and the prior
    (:func:`prior_order` of the same part, over the probes' classes); every held-out example whose
    answer is a class of that part is scored by both -- the same rule as the ``linear-probe``
    attack, whose control is that prior. Held-out examples whose answer has fewer than
    ``min_examples`` examples in the training part are counted in ``n_skipped`` (the attack skips
    them too), as are relations with fewer than 2 facts and facts without a relation.

    Args:
        X: ``[n, n_layers, d_model]`` residual streams; labels: ``[n]`` answers; relations:
            ``[n]`` relation per example (None = no relation).
        folds: folds per relation (>= 2). layers: decoder-layer labels of X's layer axis.
        k: the "top-k" of ``accuracy_at_k`` / ``prior_at_k``.
        train_kwargs: passed to :func:`train_probes` (``C``, ``max_iter``).

    Returns:
        JSON-serialisable dict, fractions 0..1 of the scored held-out examples, pooled over
        relations (``None`` where nothing was scored)::

            {"layers": [l, ...], "accuracy": [top-1 per layer], "accuracy_at_k": [top-k per layer],
             "prior": top-1 of the prior, "prior_at_k": top-k of the prior, "k", "folds", "seed",
             "min_examples", "n": scored examples, "n_skipped": not scored,
             "relations": {relation: {"n", "n_scored", "n_classes", "folds", "stratified",
                                       "accuracy", "accuracy_at_k", "prior", "prior_at_k"}}}

    Raises:
        ValueError: ``folds < 2``, ``k < 1``, or lengths that do not match ``X``.
    """
    X = _check_X(X)
    labels = [str(a).strip() for a in labels]
    n, n_layers = X.shape[0], X.shape[1]
    if len(labels) != n or len(relations) != n:
        raise ValueError(f"{len(labels)} labels and {len(relations)} relations for {n} examples")
    if folds < 2 or k < 1:
        raise ValueError(f"relation_cv needs folds >= 2 and k >= 1, got folds={folds}, k={k}")
    layer_ids = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    y = np.asarray(labels, dtype=object)
    tot = {"c1": np.zeros(n_layers, np.int64), "ck": np.zeros(n_layers, np.int64), "p1": 0, "pk": 0, "n": 0}
    per_rel: dict[str, dict] = {}
    n_skipped = sum(1 for r in relations if r is None)
    for rel in sorted({r for r in relations if r is not None}):
        idx = np.array([i for i, r in enumerate(relations) if r == rel])
        if len(idx) < 2:
            n_skipped += len(idx)
            continue
        f = min(folds, len(idx))
        splits, stratified = _splits(y[idx].tolist(), f, seed)
        c1 = np.zeros(n_layers, np.int64)
        ck = np.zeros(n_layers, np.int64)
        p1 = pk = scored = 0
        for train, test in splits:
            tr, te = idx[train], idx[test]
            probes = train_probes(X[tr], y[tr].tolist(), layer_ids, seed=seed, min_examples=min_examples,
                                  **train_kwargs)
            prior_rank = {a: j + 1 for j, a in enumerate(prior_order(y[tr].tolist(), probes.classes))}
            te = np.array([i for i in te if y[i] in prior_rank], dtype=np.int64)
            if not len(te):
                continue
            ranks = probes.rank(X[te], y[te].tolist())  # [n_test, n_layers]
            c1 += (ranks == 1).sum(0)
            ck += (ranks <= k).sum(0)
            pr = np.array([prior_rank[y[i]] for i in te])
            p1 += int((pr == 1).sum())
            pk += int((pr <= k).sum())
            scored += len(te)
        n_skipped += len(idx) - scored
        tot["c1"] += c1
        tot["ck"] += ck
        tot["p1"] += p1
        tot["pk"] += pk
        tot["n"] += scored
        per_rel[rel] = {"n": int(len(idx)), "n_scored": scored, "n_classes": len(set(y[idx].tolist())),
                        "folds": f, "stratified": stratified, **_fractions(c1, ck, p1, pk, scored)}
    return {"layers": layer_ids, **_fractions(tot["c1"], tot["ck"], tot["p1"], tot["pk"], tot["n"]), "k": k,
            "folds": folds, "seed": seed, "min_examples": min_examples, "n": tot["n"], "n_skipped": n_skipped,
            "relations": per_rel}


def _fractions(c1, ck, p1: int, pk: int, n: int) -> dict:
    if not n:
        return {"accuracy": [None] * len(c1), "accuracy_at_k": [None] * len(ck), "prior": None, "prior_at_k": None}
    return {"accuracy": (c1 / n).tolist(), "accuracy_at_k": (ck / n).tolist(), "prior": p1 / n, "prior_at_k": pk / n}


def probe_cv_report(model, facts: Sequence[Any], layers: int | Sequence[int] | None = None, *, folds: int = 5,
                    k: int = 4, max_per_relation: int | None = 200, relations: Sequence[str] | None = None,
                    min_examples: int = 2, C: float = 1.0, max_iter: int = 30, seed: int = 0, batch_size: int = 32,
                    progress: bool = False) -> dict:
    """Per-layer cross-validated accuracy of per-relation linear probes vs the relation prior, on
    ``model`` as it is (for the report; issue 11 item 5).

    Reads the residual stream at the last prompt token (:func:`probe_dataset`) of at most
    ``max_per_relation`` facts per relation (evenly spaced in file order) and runs
    :func:`relation_cv` on it. A probe layer that beats the prior reads more than the relation's
    answer frequencies out of the hidden state (Belinkov 2022, "Probing Classifiers": compare a
    probe with a control that has no access to the representation).

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        facts: :class:`~probe.facts.Fact` objects; without any ``relation`` they form one relation
            :data:`ANY_RELATION` (the result's ``relation_note`` says so).
        layers: decoder layers (negative allowed); None = every layer.
        relations: only these relations (None = all).
        folds, k, min_examples, seed: see :func:`relation_cv`. C, max_iter: :func:`train_probes`.

    Returns:
        :func:`relation_cv`'s dict plus ``"max_per_relation"``, ``"relation_note"`` (str or None)
        and ``"seconds"`` (wall-clock, read + fits). JSON-serialisable.

    Raises:
        ValueError: no fact left to read, or as :func:`relation_cv`. InputError / IndexError: as
        :func:`probe_dataset`.
    """
    import time

    from .layers import resolve_layers

    t0 = time.perf_counter()
    facts = list(facts)
    rels, note = fact_relations(facts)
    wanted = None if relations is None else set(relations)
    by_rel: dict[str, list[int]] = {}
    for i, r in enumerate(rels):
        if r is not None and (wanted is None or r in wanted):
            by_rel.setdefault(r, []).append(i)
    chosen = sorted(i for idx in by_rel.values() for i in evenly_capped(idx, max_per_relation))
    if not chosen:
        raise ValueError("probe_cv_report: no fact with a (selected) relation to read")
    layer_ids = resolve_layers(layers, model.n_layers, "probe_cv_report: layer", error=IndexError)
    X, labels = probe_dataset(model, [facts[i] for i in chosen], layer_ids, batch_size=batch_size,
                              progress=progress)
    out = relation_cv(X, labels, [rels[i] for i in chosen], folds, layers=layer_ids, k=k, seed=seed,
                      min_examples=min_examples, C=C, max_iter=max_iter)
    out.update(max_per_relation=max_per_relation, relation_note=note, seconds=round(time.perf_counter() - t0, 2))
    return out
