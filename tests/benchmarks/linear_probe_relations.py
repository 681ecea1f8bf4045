"""Benchmark: the per-relation linear probe on SmolLM2-135M with CounterFact (issue 11 item 5).

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tests/benchmarks/linear_probe_relations.py \\
        [--known-ids /tmp/known_ids.json] [--cv-layers 0,5,10,15,20,23,24,29] [--timing-facts 6]

Measures on the unedited model:

cv
    :func:`probe.probes.probe_cv_report` over every relation of CounterFact (at most 200 facts per
    relation): per-layer 5-fold held-out top-1 / top-4 accuracy vs the relation prior, pooled and
    for the largest relations.
attack
    the ``linear-probe`` attack at its defaults as the ``run`` job calls it before the edit: the
    known facts (answer's first token at rank 1) are attacked and deleted, the probes train on the
    other facts of each relation; success vs the relation-prior control, skipped count.
per_fact_s
    the cost per edited model state in the one-at-a-time protocol: a fresh ``ctx.cache`` per fact
    (nothing cached), one fact attacked, its relation trained (read <= 200 prompts + fit), for
    ``rank_layers`` "all" (the default) and "attack".

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact_filtered.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--known-ids", type=Path, default=None, help="cache file for the known-fact ids")
    ap.add_argument("--cv-layers", default="0,5,10,15,20,23,24,29")
    ap.add_argument("--timing-facts", type=int, default=6)
    args = ap.parse_args()

    import probe
    from attacks.base import AttackContext, summarize
    from attacks.linear_probe import LinearProbeAttack
    from probe.facts import load_counterfact
    from probe.readout import lens_readout

    out: dict = {}
    model = probe.load_model()
    facts = load_counterfact(COUNTERFACT)

    t = time.perf_counter()
    cv = probe.probes.probe_cv_report(model, facts, [int(x) for x in args.cv_layers.split(",")])
    out["cv_s"] = round(time.perf_counter() - t, 1)
    r3 = lambda xs: [None if x is None else round(x, 3) for x in xs]  # noqa: E731
    out["cv"] = {"layers": cv["layers"], "accuracy": r3(cv["accuracy"]), "accuracy_at_4": r3(cv["accuracy_at_k"]),
                 "prior": round(cv["prior"], 3), "prior_at_4": round(cv["prior_at_k"], 3), "n": cv["n"],
                 "n_skipped": cv["n_skipped"], "n_relations": len(cv["relations"])}
    big = sorted(cv["relations"].items(), key=lambda kv: -kv[1]["n"])[:5]
    out["cv_relations"] = {r: {"n_scored": d["n_scored"], "n_classes": d["n_classes"], "prior": round(d["prior"], 3),
                               "accuracy": r3(d["accuracy"])} for r, d in big}
    print("cv", json.dumps(out["cv"]), json.dumps(out["cv_relations"]), flush=True)

    if args.known_ids and args.known_ids.is_file():
        ids = set(json.loads(args.known_ids.read_text()))
    else:
        reads = lens_readout(model, [f.prompt for f in facts], [f.answer for f in facts])
        ids = {f.id for f, r in zip(facts, reads) if r.rank[-1] <= 1}
        if args.known_ids:
            args.known_ids.write_text(json.dumps(sorted(ids)))
    known = [f for f in facts if f.id in ids]
    out["n_known"] = len(known)

    attack = LinearProbeAttack()
    ctx = AttackContext(facts=facts, deleted=frozenset(ids))
    t = time.perf_counter()
    res = [attack.run(model, [f], ctx)[0] for f in known]  # one call per fact, shared cache, as measure_pre
    out["attack_pre_s"] = round(time.perf_counter() - t, 1)
    s = summarize(attack, model.n_layers, res)
    kept = [o for o in res if not o.skipped]
    out["attack"] = {"n_facts": s.n_facts, "n_skipped": s.n_skipped, "success": round(s.success_pre, 3),
                     "control": round(s.success_control_pre, 3), "excess": round(s.excess, 3),
                     "control_at_4": round(sum(o.control_rank <= 4 for o in kept) / len(kept), 3),
                     "mean_candidates": round(sum(len(o.details["candidates"]) for o in kept) / len(kept), 2),
                     "answer_in_prompt": sum(o.details["answer_in_prompt"] for o in kept)}
    clean = [o for o in kept if not o.details["answer_in_prompt"]]
    out["attack_answer_not_in_prompt"] = {"n": len(clean),
                                          "success": round(sum(o.success for o in clean) / len(clean), 3),
                                          "control": round(sum(o.control for o in clean) / len(clean), 3)}
    print("attack", json.dumps(out["attack"]), json.dumps(out["attack_answer_not_in_prompt"]), flush=True)

    picks = [known[int(i * len(known) / args.timing_facts)] for i in range(args.timing_facts)]
    for rank_layers in ("all", "attack"):
        a = LinearProbeAttack(rank_layers=rank_layers)
        secs = []
        for f in picks:
            fresh = AttackContext(facts=facts, deleted=frozenset(ids))  # a new model state: empty cache
            t = time.perf_counter()
            o = a.run(model, [f], fresh)[0]
            secs.append(round(time.perf_counter() - t, 2))
        out[f"per_fact_s_{rank_layers}"] = secs
        print(rank_layers, secs, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
