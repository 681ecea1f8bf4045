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

Nothing here runs on a GPU or downloads anything; :func:`probe_dataset` is the only function
that runs the model.
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

__all__ = ["UNRANKED", "LayerProbes", "CVResult", "probe_dataset", "train_probes", "cross_validated_accuracy"]


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
    from sklearn.model_selection import KFold, StratifiedKFold

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
    stratified = top >= folds
    y = np.asarray(labels, dtype=object)
    if stratified:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(folds, shuffle=True, random_state=seed)
    correct = np.zeros(X.shape[1], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has only 1 member"
        splits = list(splitter.split(np.zeros(n), y))
    for train, test in splits:
        probes = train_probes(X[train], y[train].tolist(), layers, seed=seed, **train_kwargs)
        pred = probes.predict(X[test])  # [n_test, n_layers]
        correct += (pred == y[test][:, None]).sum(0)
    layer_ids = list(range(X.shape[1])) if layers is None else [int(x) for x in layers]
    return CVResult(layers=layer_ids, accuracy=(correct / n).tolist(), chance=top / n, majority=majority,
                    folds=folds, stratified=stratified, n=n, n_classes=len(counts))
