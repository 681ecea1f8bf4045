"""viz.probe_figure: the per-relation probes' CV accuracy vs the relation prior, from a hand-built
report dict (the shape of probe.probes.probe_cv_report)."""

from __future__ import annotations

import pytest

from viz.probe_figure import probe_cv_figure

REPORT = {"layers": [0, 5, 10], "accuracy": [0.4, None, 0.9], "accuracy_at_k": [0.7, 0.8, 1.0], "prior": 0.55,
          "prior_at_k": 0.85, "k": 4, "folds": 5, "n": 120, "n_skipped": 7,
          "relations": {"P103": {}, "P178": {}}, "relation_note": None}


def test_probe_cv_figure_plots_the_report_values():
    fig = probe_cv_figure(REPORT)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name) == ["probe, top-1", "probe, top-4", "relation prior, top-1", "relation prior, top-4"]
    assert list(by_name["probe, top-1"].x) == [0, 5, 10] and list(by_name["probe, top-1"].y) == [0.4, None, 0.9]
    assert list(by_name["probe, top-4"].y) == [0.7, 0.8, 1.0]
    assert list(by_name["relation prior, top-1"].y) == [0.55] * 3  # flat: the prior reads no hidden state
    assert list(by_name["relation prior, top-4"].y) == [0.85] * 3
    title = fig.layout.title.text
    assert "n = 120 (7 skipped)" in title and "P103, P178" in title and "5-fold" in title
    assert not fig.layout.annotations


def test_probe_cv_figure_notes_the_any_relation_and_rejects_ragged_input():
    fig = probe_cv_figure({**REPORT, "relation_note": "the facts carry no relation"}, title="t")
    assert fig.layout.title.text == "t" and fig.layout.annotations[0].text == "the facts carry no relation"
    with pytest.raises(ValueError, match="3 layers but 2"):
        probe_cv_figure({**REPORT, "accuracy": [0.1, 0.2]})
