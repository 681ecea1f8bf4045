"""Tune the editor settings per deletion objective on CounterFact known facts (SmolLM2).

For each objective and each (norm bound, lr) setting of the constrained-FT editor, deletes N known
facts one at a time and prints: rewrite score (erasure form), target rewrite score (empty
response / error injection), neighborhood score, the fraction of facts whose answer is still in
Head Projection's candidate set (B = 20), and seconds per edit. The last line is one JSON object.

    .venv/bin/python tests/benchmarks/objective_tuning.py --n 6 --objectives empty-response,max-entropy \
        --bounds 2e-3,5e-3,1e-2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COUNTERFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact_filtered.json"


def main() -> None:
    import attacks
    import defenses
    from defenses.evaluate import deletion_scores, fact_probs, target_probs, target_scores
    from defenses.metrics import mean
    from defenses.retain import retain_prompts
    from probe import load_model
    from probe.facts import load_counterfact
    from probe.jobs import evenly_spaced

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--objectives", default="fact-erasure,empty-response,error-injection,head-projection,max-entropy,"
                                            "input-rephrasing")
    ap.add_argument("--bounds", default="2e-3,5e-3,1e-2")
    ap.add_argument("--lr-ratio", type=float, default=0.5, help="lr = ratio x bound")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--editor", default="constrained-ft")
    ap.add_argument("--facts", default=str(COUNTERFACT), help="CounterFact JSON (default ../shared/data)")
    args = ap.parse_args()
    model = load_model()
    facts = load_counterfact(args.facts)
    hp = attacks.make_attack("head-projection")
    reads = attacks.attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], [hp])
    known = evenly_spaced([f for f, r in zip(facts, reads) if r.rank[-1] <= 1], args.n)
    rows = []
    for name in args.objectives.split(","):
        obj = defenses.make_objective(name)
        for bound in [float(b) for b in args.bounds.split(",")]:
            cfg = {"norm_bound": bound, "lr": args.lr_ratio * bound, "steps": args.steps} \
                if args.editor == "constrained-ft" else {}
            ed = defenses.make_editor(args.editor, **cfg)
            sess = ed.session(model)
            rec = {"objective": name, "bound": bound, "rewrite": [], "target": [], "neigh": [], "hp": [], "sec": [],
                   "steps": []}
            for f in known:
                pre = fact_probs(model, [f], accuracy=False)[0]
                tgt = obj.target_for(f, facts)
                t_pre = target_probs(model, f, tgt) if tgt else None
                t0 = time.time()
                info = ed.edit(sess, obj, obj.request(f, facts, retain_prompts(f, facts, 4, sim_frac=1.0)))
                rec["sec"].append(time.time() - t0)
                rec["steps"].append(info.steps)
                post = fact_probs(sess.model, [f], accuracy=False)[0]
                sc = deletion_scores(pre, post)
                rec["rewrite"].append(sc["rewrite_score"])
                rec["neigh"].append(sc["neighborhood_score"])
                if tgt:
                    rec["target"].append(target_scores(t_pre, target_probs(sess.model, f, tgt))["target_rewrite_score"])
                r = attacks.attack_readout(sess.model, [f.prompt], [f.answer], [hp])[0]
                rec["hp"].append(float(r.attack_ranks[hp.name] <= hp.k))
                sess.restore()
            row = {k: (round(mean(v), 4) if isinstance(v, list) and v else v) for k, v in rec.items()}
            rows.append(row)
            print(f"{name:18s} bound {bound:7.0e}  rewrite {row['rewrite']:.3f}  target {row['target'] or '—'!s:>6}  "
                  f"neigh {row['neigh']:.3f}  HP success {row['hp']:.2f}  steps {row['steps']}  {row['sec']:.1f} s/edit",
                  flush=True)
    print(json.dumps({"n_facts": len(known), "rows": rows}))


if __name__ == "__main__":
    main()
