"""Fact-erasure rewrite vs neighborhood trade-off on SmolLM2 (a sweep, not a test).

For each editor setting (edit layer, element-wise norm bound, learning rate, retain set) it
deletes N CounterFact known facts one at a time and measures the mean rewrite score and
neighborhood score (method.md section 5). Writes ``DIR/tradeoff.json`` and ``DIR/tradeoff.html``
(a plotly scatter); the README's figure is that page rendered to PNG.

    .venv/bin/python tests/benchmarks/fe_tradeoff.py --n 12 --out docs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GRID = [
    # (layer_frac, norm_bound, lr, retain_size)
    (0.3, 5e-4, 1e-3, 4), (0.3, 1e-3, 1e-3, 4), (0.3, 2e-3, 1e-3, 4), (0.3, 4e-3, 1e-3, 4),
    (0.3, 2e-3, 1e-3, 0), (0.6, 2e-3, 1e-3, 4), (0.6, 4e-3, 1e-3, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="facts per setting")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import plotly.graph_objects as go

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
    known = [f for f, r in zip(facts, reads) if r.rank[-1] == 1][: args.n]
    pre = fact_probs(model, known)
    rows = []
    for layer_frac, bound, lr, retain in GRID:
        editor = make_editor("constrained-ft", layer_frac=layer_frac, norm_bound=bound, lr=lr, steps=args.steps,
                             retain_weight=1.0 if retain else 0.0)
        session = editor.session(model)
        scores, t0 = [], time.time()
        for f, p in zip(known, pre):
            req = DeletionRequest([f.prompt], [f.answer], retain_prompts(f, facts, retain, sim_frac=1.0))
            editor.edit(session, make_objective("fact-erasure"), req)
            scores.append(deletion_scores(p, fact_probs(session.model, [f])[0]))
            session.restore()
        row = {"layer": editor.resolve_layer(model), "norm_bound": bound, "lr": lr, "retain_size": retain,
               "steps": args.steps, "seconds_per_fact": round((time.time() - t0) / len(known), 2),
               **{k: round(mean([s[k] for s in scores]), 4) for k in
                  ("rewrite_score", "paraphrase_score", "neighborhood_score", "neighborhood_delta_acc")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps({"n_facts": len(known), "rows": rows}, indent=2))
    fig = go.Figure()
    for retain in sorted({r["retain_size"] for r in rows}):
        for layer in sorted({r["layer"] for r in rows}):
            sel = [r for r in rows if r["layer"] == layer and r["retain_size"] == retain]
            if sel:
                fig.add_trace(go.Scatter(
                    x=[r["neighborhood_score"] for r in sel], y=[r["rewrite_score"] for r in sel],
                    mode="markers+lines+text", text=[f"bound {r['norm_bound']:g}" for r in sel],
                    textposition="top center", name=f"layer {layer}, retain {retain}"))
    fig.add_shape(type="rect", x0=0.9, x1=1.0, y0=0.9, y1=1.0, line=dict(dash="dot"))
    fig.update_layout(title=f"Fact erasure (constrained FT, {args.steps} steps) on SmolLM2-135M, "
                            f"{len(known)} CounterFact facts", xaxis_title="neighborhood score (1 = untouched)",
                      yaxis_title="rewrite score (1 = erased)", width=900, height=600)
    fig.write_html(out / "tradeoff.html", include_plotlyjs=True)


if __name__ == "__main__":
    main()
