"""Print a run's attack table as Markdown, controls included, from its committed result file.

    python scripts/attack_table.py docs/results/cf100_lens/results.json [more results.json ...]

Columns: attack, B, facts scored (skipped), success before / after the edit, the control's success
before / after, the excess (after - control), and for lens attacks the hidden-only success after
the edit (output layer removed; its budget) and the output layer's own top-k. Percentages of the
facts the attack scored. Reads only the file given (numbers in docs come from committed files).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def partial_results(folder: Path) -> dict:
    """The results.json a run stopped early would have written: every attack of its ``run.json``
    summarised (:func:`attacks.summarize`) over the facts finished in its ``per_fact.jsonl``."""
    from attacks import make_attack, summarize
    from probe.results import DeletionScores, FactResult

    stamp = json.loads((folder / "run.json").read_text())
    facts = [FactResult.from_json(json.loads(line)) for line in (folder / "per_fact.jsonl").read_text().splitlines()]
    ok = [f for f in facts if f.error is None]
    n_layers = len(ok[0].pre.rank)
    srcs = {f.control_source for f in ok if f.control_source}
    label = srcs.pop() if len(srcs) == 1 else ("relation (mixed)" if srcs else None)
    attacks = {}
    for name in stamp["attacks"]:
        a = make_attack(name, **stamp.get("attack_config", {}).get(name, {}))
        attacks[name] = summarize(a, n_layers, [f.outcomes[name]["pre"] for f in ok],
                                  [f.outcomes[name]["post"] for f in ok], control=label).__dict__
    defense = {"name": stamp.get("defense"), "editor": stamp.get("editor"),
               **DeletionScores.means([f.scores for f in ok if f.scores])}
    return {"model": stamp["model"], "n_facts": len(ok), "attacks": attacks, "defense": defense,
            "partial": f"{len(ok)} finished facts of a run stopped early (per_fact.jsonl)"}


def table(path: Path) -> str:
    res = json.loads(path.read_text()) if path.name == "results.json" else partial_results(path)
    d = res.get("defense") or {}
    head = (f"{res['model']}, {res['n_facts']} facts{' (' + res['partial'] + ')' if res.get('partial') else ''}; defense {d.get('name', '—')} ({d.get('editor', '—')}); "
            f"controls: {next((a.get('control') for a in res['attacks'].values() if a.get('control')), 'none')}")
    rows = ["| attack | B | facts (skipped) | success pre | success post | control pre | control post | **excess** "
            "| hidden-only post (B) | output-only post |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in res["attacks"].items():
        hidden = "—" if a.get("success_hidden_post") is None else \
            f"{pct(a['success_hidden_post'])} ({a.get('budget_hidden')})"
        extra = f"; taught {pct(a['success_taught'])}" if a.get("success_taught") is not None else ""
        prior = " (prior)" if "prior" in (a.get("control") or "") else ""
        rows.append(f"| {name} | {a['budget']} | {a['n_facts']} ({a['n_skipped']}) | {pct(a['success_pre'])} | "
                    f"{pct(a['success_post'])} | {pct(a.get('success_control_pre'))}{prior} | "
                    f"{pct(a.get('success_control'))}{prior}{extra} | **{pct(a.get('excess'))}** | {hidden} | "
                    f"{pct(a.get('success_output_post'))} |")
    scores = ", ".join(f"{k} {d[k]:.3f}" for k in ("rewrite_score", "paraphrase_score", "neighborhood_score",
                                                   "neighborhood_delta_acc", "random_delta_acc", "efficacy")
                       if isinstance(d.get(k), (int, float)))
    return "\n".join([head, "", *rows, "", scores])


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for p in argv:
        path = Path(p)
        if path.is_dir():
            path = path / "results.json" if (path / "results.json").is_file() else path
        if not path.exists():
            print(f"attack_table: error: {path}: no such file", file=sys.stderr)
            return 2
        print(table(path))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
