"""The generated results tables of README.md and docs/results.md equal what
``scripts/results_tables.py`` renders from the committed result files (issue 13 item 6): no number
in those tables can drift from its data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_generated_table_matches_its_result_files(tables):
    n = sum(1 for doc in tables.DOCS for _ in tables.blocks((ROOT / doc).read_text(encoding="utf-8")))
    assert n >= 5  # the README's default job, the calibration and the 100-fact attack tables at least
    assert tables.stale() == []


def test_a_changed_number_is_caught(tables, tmp_path):
    doc = (ROOT / "docs/results.md").read_text(encoding="utf-8")
    kind, path, body, m = next(b for b in tables.blocks(doc) if b[0] == "attacks")
    assert "| head-projection |" in body
    changed = body.replace("| head-projection | 20 |", "| head-projection | 21 |", 1)
    assert changed != body and changed.rstrip("\n") != tables.render(kind, path)
    assert body.rstrip("\n") == tables.render(kind, path)


def test_unknown_kinds_and_missing_folders_are_refused(tables):
    with pytest.raises(ValueError, match="unknown table kind 'nope'"):
        tables.render("nope", "docs/results/cf100_all")
    with pytest.raises(FileNotFoundError, match="docs/results/missing: no such result folder"):
        tables.render("attacks", "docs/results/missing")
