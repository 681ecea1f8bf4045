"""Every generated results table in README.md and docs/results.md, from the committed result files.

    python scripts/results_tables.py            # check: exit 1 naming each table that differs from its files
    python scripts/results_tables.py --write    # rewrite those tables from their files

A generated table sits between two HTML comments (invisible in rendered Markdown)::

    <!-- table: KIND PATH -->
    ...generated Markdown...
    <!-- /table -->

PATH is relative to the repository root; KIND is one of:

attacks
    a run's attack table with controls (``scripts/attack_table.py``): PATH is a run folder with
    ``results.json``, or a run stopped early (its ``per_fact.jsonl`` is summarised).
calibration
    a matched-damage calibration (``probe.jobs.calibrate.format_calibration``): PATH is the folder
    of ``calibration.json``.
grid-defenses
    a grid's defenses at a glance: per defense, the facts deleted, the first attack's success after
    the edit, its control and excess, and the damage / deletion scores (teacher-forced rewrite and
    paraphrase, generation efficacy, neighbourhood, neighbourhood Δ-Acc, random Δ-Acc, retention
    drop): PATH is the folder of ``grid.json``. A grid stopped early says so (facts done of planned).

So no number in a generated table can drift from its data: ``tests/unit/test_results_tables.py``
runs the check.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from attack_table import pct, table  # noqa: E402  (scripts/ is on the path above)

DOCS = ("README.md", "docs/results.md")
BLOCK = re.compile(r"(<!-- table: (?P<kind>[\w-]+) (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def num(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def attacks_table(path: Path) -> str:
    res = path / "results.json"
    return table(res if res.is_file() else path)


def calibration_table(path: Path) -> str:
    from probe.jobs.calibrate import Calibration, format_calibration

    return "```\n" + format_calibration(Calibration.load(path / "calibration.json")).rstrip() + "\n```"


GRID_SCORES = (("rewrite_score", "rewrite"), ("paraphrase_score", "paraphrase"),
               ("generation_efficacy", "gen. efficacy"), ("generation_paraphrase_efficacy", "gen. para. eff."),
               ("neighborhood_score", "nbhd"), ("neighborhood_delta_acc", "nbhd Δ-Acc"),
               ("random_delta_acc", "random Δ-Acc"), ("retention_drop", "retention drop"),
               ("target_rewrite_score", "target rewrite"))


def _grid(path: Path) -> tuple[dict, str]:
    """A grid's ``grid.json`` and how far it got (``complete`` / ``stopped early: ...``)."""
    g = json.loads((path / "grid.json").read_text(encoding="utf-8"))
    return g, ("complete" if g["complete"] else f"stopped early: {g['n_facts']} of {g['n_facts_planned']} planned facts")


def grid_defenses_table(path: Path) -> str:
    g, done = _grid(path)
    attack = g["attacks"][0]
    cells = {c["defense"]: c for c in g["cells"] if c["attack"] == attack}
    cal = g.get("calibration") or {}
    setting = (f"calibrated settings (neighborhood >= {cal['min_neighborhood']}, retention drop <= "
               f"{cal['max_retention_drop']} on {cal['n_facts']} calibration facts)" if cal.get("settings")
               else "each defense's built-in settings")
    head = (f"{g['model']}, editor {g['editor']}, {setting}; {g['n_facts']} facts ({done}); "
            f"{attack} success@{next(iter(cells.values()))['budget'] if cells else '—'} after the edit")
    rows = ["| defense | facts | " + attack + " post | control | excess | "
            + " | ".join(label for _, label in GRID_SCORES) + " |",
            "|---" * (5 + len(GRID_SCORES)) + "|"]
    for d in g["defenses"]:
        c = cells.get(d)
        if c is None:
            continue
        rows.append(f"| {d} | {c['n_facts']}{' (' + str(c['n_failed']) + ' failed)' if c.get('n_failed') else ''} | "
                    f"{pct(c['success_post'])} | {pct(c.get('success_control'))} | **{pct(c.get('excess'))}** | "
                    + " | ".join(num(c.get(k)) for k, _ in GRID_SCORES) + " |")
    return "\n".join([head, "", *rows])


def grid_attacks_table(path: Path) -> str:
    """Every attack of a grid after every defense: success after the edit, its control, and the
    excess (post - control) per cell; each attack's budget in the header row."""
    g, done = _grid(path)
    cells = {(c["defense"], c["attack"]): c for c in g["cells"]}
    head = (f"{g['model']}, editor {g['editor']}, {g['n_facts']} facts ({done}); each cell: success after the "
            "edit / control (**excess**)")
    rows = ["| defense | " + " | ".join(f"{a} (B={next((c['budget'] for (d, x), c in cells.items() if x == a), '—')})"
                                         for a in g["attacks"]) + " |",
            "|---" * (1 + len(g["attacks"])) + "|"]
    for d in g["defenses"]:
        row = []
        for a in g["attacks"]:
            c = cells.get((d, a))
            row.append("—" if c is None else f"{pct(c['success_post'])} / {pct(c.get('success_control'))} "
                                             f"(**{pct(c.get('excess'))}**)")
        rows.append(f"| {d} | " + " | ".join(row) + " |")
    return "\n".join([head, "", *rows])


KINDS = {"attacks": attacks_table, "calibration": calibration_table, "grid-defenses": grid_defenses_table,
         "grid-attacks": grid_attacks_table}


def render(kind: str, path: str) -> str:
    """The Markdown of one block (no trailing newline).

    Raises:
        ValueError: unknown kind; FileNotFoundError: the result files are missing.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown table kind {kind!r}; valid: {', '.join(KINDS)}")
    folder = ROOT / path
    if not folder.exists():
        raise FileNotFoundError(f"{path}: no such result folder")
    return KINDS[kind](folder).rstrip("\n")


def blocks(text: str):
    """(kind, path, current body, match) of each generated block of a document."""
    for m in BLOCK.finditer(text):
        yield m.group("kind"), m.group("path"), m.group("body"), m


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("kind"), m.group("path")) + "\n" + m.group(5), text)


def stale() -> list[str]:
    """``"FILE: KIND PATH"`` for each block whose text differs from its files."""
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for kind, path, body, _ in blocks(text):
            if body.rstrip("\n") != render(kind, path):
                out.append(f"{doc}: {kind} {path}")
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] not in ("--write",):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    if argv:
        for doc in DOCS:
            p = ROOT / doc
            text = p.read_text(encoding="utf-8")
            new = regenerate(text)
            if new != text:
                p.write_text(new, encoding="utf-8")
                print(f"rewrote {doc}")
        return 0
    bad = stale()
    for b in bad:
        print(f"stale table: {b} (python scripts/results_tables.py --write)")
    n = sum(1 for doc in DOCS for _ in blocks((ROOT / doc).read_text(encoding="utf-8")))
    print(f"{n - len(bad)} of {n} generated tables match their files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
