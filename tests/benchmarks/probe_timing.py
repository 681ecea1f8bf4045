"""Benchmark: causal tracing and linear probes on SmolLM2-135M with CounterFact known facts.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tests/benchmarks/probe_timing.py \
        [--known-ids /tmp/known_ids.json] [--skip-cv]

Measures (wall-clock seconds):

causal_trace_s
    ``probe.causal.causal_trace`` of "The Eiffel Tower is located in the city of" -> "Paris",
    subject "The Eiffel Tower", all 30 layers x 10 positions, 10 noise samples (ROME's default;
    1 before issue 11).
known filter
    facts of ``../shared/data/counterfact_filtered.json`` whose answer's first token is the
    model's top-1 (a lens sweep over 1,400 prompts; ``--known-ids`` caches the ids in a file).
read_s
    ``probe_dataset`` over the known facts, all layers (one batched forward per 32 prompts).
fit_all_s / fit_L_s
    ``train_probes`` on all 30 layers / on the attack's 5 layers (lbfgs, ``max_iter`` 30 and 100).
cv
    5-fold stratified held-out accuracy per layer (``cross_validated_accuracy``) and the
    majority-class chance level.
attack_state_s
    one ``linear-probe`` attack call on a fresh model state (new ``ctx.cache``), attacking one
    fact with the other known facts of its relation as training pool: read + fit + rank, as in the
    one-at-a-time protocol (``tests/benchmarks/linear_probe_relations.py`` measures it on all of
    CounterFact, with the relation-prior control).

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--known-ids", type=Path, default=None, help="cache file for the known-fact ids")
    ap.add_argument("--skip-cv", action="store_true")
    args = ap.parse_args()

    import probe
    from attacks.base import AttackContext
    from attacks.linear_probe import LinearProbeAttack
    from probe.layers import spread_layers
    from probe.causal import causal_trace
    from probe.facts import load_counterfact
    from probe.probes import cross_validated_accuracy, probe_dataset, train_probes
    from probe.readout import lens_readout

    out: dict = {}
    model = probe.load_model()
    causal_trace(model, "The capital of Japan is", "Tokyo", subject="Japan", layers=[0])  # warm-up
    t = time.perf_counter()
    tr = causal_trace(model, "The Eiffel Tower is located in the city of", "Paris", subject="The Eiffel Tower")
    out["causal_trace_s"] = round(time.perf_counter() - t, 2)
    out["causal_trace"] = {"clean_prob": round(tr.clean_prob, 4), "corrupted_prob": round(tr.corrupted_prob, 4),
                           "peak": tr.peak(), "max_prob": round(float(tr.probs.max()), 4)}
    print("causal trace", out["causal_trace_s"], out["causal_trace"], flush=True)

    facts = load_counterfact(ROOT.parent / "shared" / "data" / "counterfact_filtered.json")
    if args.known_ids and args.known_ids.is_file():
        ids = set(json.loads(args.known_ids.read_text()))
        known = [f for f in facts if f.id in ids]
    else:
        t = time.perf_counter()
        reads = lens_readout(model, [f.prompt for f in facts], [f.answer for f in facts])
        known = [f for f, r in zip(facts, reads) if r.rank[-1] <= 1]
        out["known_filter_s"] = round(time.perf_counter() - t, 1)
        if args.known_ids:
            args.known_ids.write_text(json.dumps([f.id for f in known]))
    out["n_known"] = len(known)

    t = time.perf_counter()
    X, y = probe_dataset(model, known)
    out["read_s"] = round(time.perf_counter() - t, 2)
    L = spread_layers(model.n_layers, 5, start_frac=1 / 3)
    for mi in (30, 100):
        t = time.perf_counter()
        p = train_probes(X, y, max_iter=mi)
        out[f"fit_all_s_iter{mi}"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        train_probes(X[:, L], y, L, max_iter=mi)
        out[f"fit_L_s_iter{mi}"] = round(time.perf_counter() - t, 2)
    out["n_classes"], out["n_train"], out["n_dropped"] = len(p.classes), p.n_train, len(p.dropped)
    print({k: v for k, v in out.items() if k.startswith(("fit", "read", "n_"))}, flush=True)

    if not args.skip_cv:
        t = time.perf_counter()
        cv = cross_validated_accuracy(X, y, folds=5, max_iter=30)
        out["cv_s"] = round(time.perf_counter() - t, 1)
        out["cv_accuracy"] = [round(a, 3) for a in cv.accuracy]
        out["cv_chance"] = round(cv.chance, 3)
        out["cv_majority"] = cv.majority
        print("cv", out["cv_accuracy"], "chance", out["cv_chance"], flush=True)

    for rank_layers in ("all", "attack"):
        ctx = AttackContext(facts=known, deleted=frozenset({known[0].id}))
        t = time.perf_counter()
        (o,) = LinearProbeAttack(rank_layers=rank_layers).run(model, [known[0]], ctx)
        out[f"attack_state_s_{rank_layers}"] = round(time.perf_counter() - t, 2)
        out[f"attack_{rank_layers}"] = {"best_rank": o.best_rank, "skipped": o.skipped,
                                        "fit_seconds": o.details.get("fit_seconds"),
                                        "read_seconds": o.details.get("read_seconds")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
