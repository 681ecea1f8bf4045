"""Fact-erasure rewrite / neighborhood scores of the ``lora`` and ``rome`` editors on SmolLM2 (a
tuning run, not a test).

Deletes N known CounterFact facts one at a time (retain prompts as the pipeline picks them:
``retain_prompts(fact, facts, 4, sim_frac=1.0)``) with each editor setting and prints one JSON
line per setting: mean rewrite score (1 - p_post / p_pre), paraphrase and neighborhood scores
(method.md section 5) and seconds per edit.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/editor_tuning.py --n 10 \\
        --config 'lora:{}' --config 'rome:{"retain_weight": 0}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="facts per setting")
    ap.add_argument("--config", action="append", default=[],
                    help="EDITOR:JSON editor settings, e.g. 'rome:{\"layer\": 4}' (repeatable)")
    ap.add_argument("--retain", type=int, default=4, help="retain prompts per fact")
    args = ap.parse_args()
    configs = args.config or ["lora:{}", "rome:{}"]

    import probe
    from defenses import DeletionRequest, make_editor, make_objective
    from defenses.evaluate import deletion_scores, fact_probs
    from defenses.metrics import mean
    from defenses.retain import retain_prompts
    from probe.facts import load_counterfact
    from probe.readout import lens_readout

    model = probe.load_model()
    facts = load_counterfact(ROOT.parent / "shared" / "data" / "counterfact_filtered.json")[:300]
    reads = lens_readout(model, [f.prompt for f in facts], [f.answer for f in facts])
    known = [f for f, r in zip(facts, reads) if r.rank[-1] <= 1][: args.n]
    pre = fact_probs(model, known, accuracy=False)
    for spec in configs:
        name, _, raw = spec.partition(":")
        kw = json.loads(raw or "{}")
        editor = make_editor(name, **kw)
        session = editor.session(model)
        if name == "rome":  # covariance once, outside the per-edit timing
            editor.covariance(session.model, editor.resolve_layer(model), session.param_name)
        scores, secs, steps = [], [], []
        for f, p in zip(known, pre):
            req = DeletionRequest([f.prompt], [f.answer], retain_prompts(f, facts, args.retain, sim_frac=1.0),
                                  subjects=[f.subject])
            t0 = time.time()
            info = editor.edit(session, make_objective("fact-erasure"), req)
            secs.append(time.time() - t0)
            steps.append(info.steps)
            scores.append(deletion_scores(p, fact_probs(session.model, [f], accuracy=False)[0]))
            session.restore()
        row = {"editor": name, **kw, "layer": editor.resolve_layer(model), "n_facts": len(known),
               "seconds_per_edit": round(mean(secs), 2), "mean_steps": round(mean(steps), 1),
               **{k: round(mean([s[k] for s in scores]), 4) for k in
                  ("rewrite_score", "paraphrase_score", "neighborhood_score")},
               "min_rewrite": round(min(s["rewrite_score"] for s in scores), 3),
               "min_neighborhood": round(min(s["neighborhood_score"] for s in scores), 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
