"""Controls in the run and grid reports (:mod:`viz.controls`): success next to the control, the
excess as the grid's headline, hidden-only vs output-only lens success, relearning's taught rate,
the control answer's rank per layer; results written before controls still render with "—"."""

from __future__ import annotations

import json
import re
import statistics

import pytest

import viz
from probe.results import AttackOutcome, AttackSummary, Cell, GridResult, RunResult
from viz.controls import HIDDEN_NOTE, TAUGHT_NOTE, unedited_excess
from viz.grid import grid_heatmap, grid_rank_curves, grid_report_html

from test_viz import N_FACTS, N_LAYERS, _control_ranks, _traces, make_result


def _row(text: str, first: str) -> str:
    """The ``<tr>`` of a table whose first cell is ``first``."""
    m = re.search(r"<tr><td>" + re.escape(first) + r"</td>.*?</tr>", text)
    assert m, f"no row {first!r}"
    return m.group(0)


def _cells(row: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


# --------------------------------------------------------------------------------------------
# run report


def test_run_attack_table_control_excess_and_skip_reasons():
    res = make_result()
    a = res.attacks["head_projection"]
    a.success_pre, a.success_post, a.success_control, a.success_control_pre = 0.8, 0.5, 0.2, 0.1
    a.excess, a.control, a.n_control, a.n_skipped = 0.3, "relation (2 any-relation)", 5, 2
    for f, reason in zip(res.facts[:2], ("answer in input", "answer in input")):
        f.outcomes["head_projection"] = {"pre": AttackOutcome.skip(40, reason), "post": None}
    text = viz.report_html(res)
    cells = _cells(_row(text, "head_projection"))
    assert cells[5:] == ["80.0%", "50.0%", "20.0%", "+30.0%", "10.0%", "relation (2 any-relation) (n=5)",
                         "2 (answer in input ×2)"]
    legend = re.search(r'<p class="legend" id="control-legend">(.*?)</p>', text).group(1)
    assert "another answer of the fact's relation that the model does not give for this prompt" in legend
    assert "excess = post − control" in legend
    assert "Control answers here: relation (2 any-relation), relation." in legend and "any-relation</i>" in legend
    # the legend opens the attack section, before the table
    assert text.index('id="control-legend"') < text.index('id="attack-table"')


def test_attack_only_run_excess_is_pre_minus_control():
    res = make_result(post=False)
    text = viz.report_html(res)
    a = res.attacks["probability_delta"]  # pre 45%, control 10% -> excess +35%
    assert _cells(_row(text, "probability_delta"))[5:10] == ["45.0%", "—", "10.0%", "+35.0%", "10.0%"]
    assert "excess = pre − control (no edit in this run)" in text
    assert a.excess == pytest.approx(0.35)


def test_old_run_without_control_fields_renders_dashes(tmp_path):
    """A results.json / per_fact.jsonl written before controls: no control fields anywhere."""
    res = make_result(controls=False)
    summary = res.summary_json()
    for a in summary["attacks"].values():
        for k in ("control", "n_control", "success_control_pre", "success_control", "excess", "success_hidden_pre",
                  "success_hidden_post", "success_hidden_control", "budget_hidden", "success_output_pre",
                  "success_output_post", "success_taught"):
            del a[k]
    (tmp_path / "results.json").write_text(json.dumps(summary))
    lines = []
    for f in res.facts:
        d = f.to_json()
        for k in ("control", "control_source", "relation"):
            del d[k]
        for ph in ("pre", "post"):
            del d[ph]["control_rank"], d[ph]["top_token"]
        lines.append(json.dumps(d))
    (tmp_path / "per_fact.jsonl").write_text("\n".join(lines) + "\n")
    old = RunResult.load(tmp_path)
    text = viz.report_html(old)
    assert _cells(_row(text, "head_projection"))[5:] == ["50.0%", "25.0%", "—", "—", "—", "—", "0"]
    assert "These results have no control answers" in text
    assert 'id="hidden-table"' not in text and 'id="taught-table"' not in text
    assert not _traces(viz.rank_by_layer(old), kind="control")
    assert text.count('class="plotly-graph-div"') == len(viz.all_figures(old)) == 6


def test_run_lens_table_output_vs_hidden_vs_all_layers():
    res = make_result()
    a = res.attacks["probability_delta"]  # pre 45% / post 20%, control 10% pre / 20% post
    a.success_output_pre, a.success_output_post = 0.6, 0.05
    a.success_hidden_pre, a.success_hidden_post, a.success_hidden_control, a.budget_hidden = 0.7, 0.4, 0.1, 36
    text = viz.report_html(res)
    table = re.search(r'<table id="hidden-table">.*?</table>', text, re.DOTALL).group(0)
    rows = [_cells(r) for r in re.findall(r"<tr><td>.*?</tr>", table)]
    assert rows == [["unedited", "probability_delta", "60.0%", "70.0%", "—", "36", "45.0%", "10.0%", "60"],
                    ["after edit", "probability_delta", "5.0%", "40.0%", "10.0%", "36", "20.0%", "20.0%", "60"]]
    assert HIDDEN_NOTE in text
    assert "<h3>Where the answer leaks: output layer vs hidden layers</h3>" in text


def test_run_relearning_shows_taught_next_to_success_and_control():
    res = make_result()
    res.attacks["relearning"] = AttackSummary(
        name="relearning", kind="relearning", budget=5, success_pre=0.9, success_post=0.35, n_facts=N_FACTS,
        control="relation", n_control=N_FACTS, success_control_pre=0.05, success_control=0.1, excess=0.25,
        success_taught=0.15)
    text = viz.report_html(res)
    table = re.search(r'<table id="taught-table">.*?</table>', text, re.DOTALL).group(0)
    assert _cells(_row(table, "this run")) == ["this run", "relearning", "5", "90.0%", "35.0%", "10.0%", "15.0%",
                                               "+25.0%"]
    assert TAUGHT_NOTE in text and "facts the model never knew" in TAUGHT_NOTE
    # a relearning result written before taught existed still gets the row, with —
    res.attacks["relearning"].success_taught = None
    table = re.search(r'<table id="taught-table">.*?</table>', viz.report_html(res), re.DOTALL).group(0)
    assert _cells(_row(table, "this run"))[6] == "—"


def test_rank_by_layer_control_line_is_geometric_mean_of_control_ranks():
    res = make_result()
    res.facts[1].post.control_rank = None  # a fact without a control answer is left out
    fig = viz.rank_by_layer(res)
    for phase in ("pre", "post"):
        (ctl,) = _traces(fig, kind="control", phase=phase)
        ids = [i for i, f in enumerate(res.facts) if getattr(f, phase).control_rank is not None]
        expected = [statistics.geometric_mean([_control_ranks(i, phase)[layer] for i in ids])
                    for layer in range(N_LAYERS)]
        assert list(ctl.y) == pytest.approx(expected, rel=1e-9)
        assert ctl.line.dash == "dash" and f"(n={len(ids)})" in ctl.name
        (agg,) = _traces(fig, kind="aggregate", phase=phase)
        assert ctl.line.color == agg.line.color
    assert "dashed: the control answer" in fig.layout.title.text
    # the control floor sits far below the unedited answer at the output
    floor, answer = _traces(fig, kind="control", phase="pre")[0].y, _traces(fig, kind="aggregate", phase="pre")[0].y
    assert floor[-1] > 100 * answer[-1]


# --------------------------------------------------------------------------------------------
# grid report


def _gcell(defense, attack, pre, post, ctl_pre, ctl, **kw) -> Cell:
    return Cell(name=attack, kind=kw.pop("kind", "whitebox"), budget=kw.pop("budget", 40), success_pre=pre,
                success_post=post, n_facts=10, control="relation" if ctl is not None else None,
                n_control=10 if ctl is not None else 0, success_control_pre=ctl_pre, success_control=ctl,
                excess=None if ctl is None else post - ctl, defense=defense, editor="rome",
                scores={"rewrite_score": 0.9}, **kw)


def make_grid() -> GridResult:
    cells = [
        _gcell("rome", "head-projection", 0.8, 0.5, 0.1, 0.2,
               success_output_pre=0.6, success_output_post=0.05, success_hidden_pre=0.7, success_hidden_post=0.4,
               success_hidden_control=0.1, budget_hidden=30),
        _gcell("memit", "head-projection", 0.7, 0.3, 0.2, 0.25,
               success_output_pre=0.5, success_output_post=0.0, success_hidden_pre=0.65, success_hidden_post=0.2,
               success_hidden_control=0.15, budget_hidden=30),
        _gcell("rome", "relearning", 0.9, 0.6, 0.05, 0.1, kind="relearning", budget=5, success_taught=0.3),
        _gcell("memit", "relearning", 0.9, 0.4, 0.05, 0.2, kind="relearning", budget=5, success_taught=0.25),
    ]
    return GridResult(model="synthetic/llm", n_layers=4, editor="rome", defenses=["rome", "memit"],
                      attacks=["head-projection", "relearning"], cells=cells, n_facts=10, complete=True,
                      per_layer={"layers": [0, 1, 2, 3], "pre": [900, 100, 10, 1],
                                 "post": {"rome": [900, 500, 300, 200], "memit": [800, 400, 200, 100]}})


def test_grid_heatmap_headline_is_excess():
    grid = make_grid()
    (hm,) = grid_heatmap(grid).data
    assert hm.meta["kind"] == "excess" and hm.zmid == 0
    assert list(hm.y) == ["unedited", "rome", "memit"]
    # unedited: mean over defenses of pre - control_pre; then post - control per defense
    expected = [[100 * ((0.8 - 0.1) + (0.7 - 0.2)) / 2, 100 * (0.85 + 0.85) / 2],
                [100 * (0.5 - 0.2), 100 * (0.6 - 0.1)], [100 * (0.3 - 0.25), 100 * (0.4 - 0.2)]]
    assert [v for row in hm.z for v in row] == pytest.approx([v for row in expected for v in row])
    assert [list(r) for r in hm.text] == [["+60%", "+85%"], ["+30%", "+50%"], ["+5%", "+20%"]]
    hover = hm.hovertext[1][0]
    assert "excess (post − control): 30.0%" in hover and "after edit: 50.0%" in hover
    assert "control after edit: 20.0%" in hover and "before edit: 80.0%" in hover
    assert "control pre: 15.0%" in hm.hovertext[0][0]
    assert unedited_excess(grid.cells[:2]) == pytest.approx(0.6)


def test_grid_report_excess_table_pre_post_control_lens_and_taught():
    text = grid_report_html(make_grid())
    assert text.index('id="control-legend"') < text.index('id="excess-table"') < text.index('id="grid-table"')
    excess = re.search(r'<table id="excess-table">.*?</table>', text, re.DOTALL).group(0)
    assert _cells(_row(excess, "unedited (pre − control)"))[1:] == ["+60.0%", "+85.0%"]
    assert re.search(r'<tr><td>rome</td><td title="post 50.0%, control 20.0%">\+30.0%</td>'
                     r'<td title="post 60.0%, control 10.0%">\+50.0%</td></tr>', excess)
    cells = re.search(r'<table id="grid-table">.*?</table>', text, re.DOTALL).group(0)
    assert _cells(_row(cells, "memit"))[1:] == ["70.0 → 30.0 (c 25.0)", "90.0 → 40.0 (c 20.0)"]
    hidden = re.search(r'<table id="hidden-table">.*?</table>', text, re.DOTALL).group(0)
    rows = [_cells(r) for r in re.findall(r"<tr><td>.*?</tr>", hidden)]
    assert rows == [["unedited", "head-projection", "60.0%", "70.0%", "—", "30", "80.0%", "10.0%", "40"],
                    ["rome", "head-projection", "5.0%", "40.0%", "10.0%", "30", "50.0%", "20.0%", "40"],
                    ["memit", "head-projection", "0.0%", "20.0%", "15.0%", "30", "30.0%", "25.0%", "40"]]
    taught = re.search(r'<table id="taught-table">.*?</table>', text, re.DOTALL).group(0)
    assert _cells(_row(taught, "memit")) == ["memit", "relearning", "5", "90.0%", "40.0%", "20.0%", "25.0%",
                                             "+20.0%"]
    assert HIDDEN_NOTE in text and TAUGHT_NOTE in text


def test_old_grid_without_control_fields_renders():
    """A grid.json written before controls: cells lack every control field."""
    d = make_grid().to_dict()
    new = {"control", "n_control", "success_control_pre", "success_control", "excess", "success_hidden_pre",
           "success_hidden_post", "success_hidden_control", "budget_hidden", "success_output_pre",
           "success_output_post", "success_taught"}
    d["cells"] = [{k: v for k, v in c.items() if k not in new} for c in d["cells"]]
    d["cells"] = [{**c, "kind": "whitebox"} for c in d["cells"]]
    for g in (d, GridResult.from_dict(d)):
        text = grid_report_html(g)
        (hm,) = grid_heatmap(g).data
        assert hm.meta["kind"] == "success_post"  # falls back to success after the edit
        assert [list(r) for r in hm.text] == [["75%", "90%"], ["50%", "60%"], ["30%", "40%"]]
        excess = re.search(r'<table id="excess-table">.*?</table>', text, re.DOTALL).group(0)
        assert _cells(_row(excess, "rome"))[1:] == ["—", "—"]
        assert _cells(_row(re.search(r'<table id="grid-table">.*?</table>', text, re.DOTALL).group(0),
                           "rome"))[1:] == ["80.0 → 50.0", "90.0 → 60.0"]
        assert "These results have no control answers" in text
        assert 'id="hidden-table"' not in text and 'id="taught-table"' not in text
        assert text.count('class="plotly-graph-div"') == 2


def test_grid_rank_curves_draw_control_answers_dashed():
    g = make_grid().to_dict()
    assert not _traces(grid_rank_curves(g), kind="control")
    g["per_layer"]["pre_control"] = [1000, 900, 800, 700]
    g["per_layer"]["post_control"] = {"rome": [1000, 800, 600, 500]}
    fig = grid_rank_curves(g)
    (pre,) = _traces(fig, kind="control", state="unedited")
    (rome,) = _traces(fig, kind="control", state="rome")
    assert list(pre.y) == [1000, 900, 800, 700] and list(rome.y) == [1000, 800, 600, 500]
    assert pre.line.dash == rome.line.dash == "dash"
    assert rome.line.color == _traces(fig, kind="answer", state="rome")[0].line.color
    assert not _traces(fig, kind="control", state="memit")
