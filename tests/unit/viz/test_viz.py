"""Tests of :mod:`viz` on hand-built :class:`probe.results.RunResult` objects (no model involved).

The expected per-layer aggregates are recomputed here from the synthetic numbers (and cross-checked
against ``RunResult.per_layer()``), so the tests check the plotted *values*, not just that a figure
exists.
"""

from __future__ import annotations

import math
import os
import re
import stat
import statistics

import plotly.offline
import pytest

import viz
from probe.results import AttackSummary, DeletionScores, FactResult, LayerReadout, RunResult
from viz.figures import LAYER_AXIS_TITLE, MAX_FACT_TRACES

N_LAYERS = 8
N_FACTS = 6
ATTACKS = ("head_projection", "probability_delta", "probability_delta_contrast")
XSS_ID = "<script>alert('xss')</script><img src=x onerror=\"document.documentElement.setAttribute('data-xss','1')\">"


# --------------------------------------------------------------------------------------------
# synthetic result


def _ranks(i: int, phase: str) -> list[int]:
    """Deterministic per-layer ranks: pre falls to 1 at the top, post stays high (deleted)."""
    if phase == "pre":
        return [max(1, int(10 ** (4.5 - 0.6 * layer)) + 3 * i) for layer in range(N_LAYERS)]
    return [int(10 ** (4.5 - 0.25 * layer)) + 7 * i + 2 for layer in range(N_LAYERS)]


def _probs(ranks: list[int], i: int) -> list[float]:
    return [min(1.0, 1.0 / (r + 0.5 * i)) for r in ranks]


def _control_ranks(i: int, phase: str) -> list[int]:
    """Deterministic per-layer ranks of the control answer: a floor in the hundreds, a little lower
    after the edit."""
    return [int(10 ** (3.5 - 0.1 * layer)) + 5 * i + (3 if phase == "pre" else 1) for layer in range(N_LAYERS)]


def _readout(i: int, phase: str, attacks: tuple[str, ...], controls: bool = True) -> LayerReadout:
    rank = _ranks(i, phase)
    prob = _probs(rank, i)
    return LayerReadout(rank=rank, prob=prob, first_token_prob=prob[-1], answer_logprob=math.log(prob[-1]),
                        token_logprobs=[math.log(prob[-1])], exact_match=rank[-1] == 1,
                        attack_ranks={a: min(rank) for a in attacks},
                        control_rank=_control_ranks(i, phase) if controls else None)


def _curve(scale: float) -> list[float]:
    return [min(1.0, scale * x) for x in (0.1, 0.3, 0.5, 0.8)]


def make_result(n_facts: int = N_FACTS, *, post: bool = True, defense: bool = True,
                fact_ids: list[str] | None = None, model: str = "synthetic/llm-8L",
                controls: bool = True) -> RunResult:
    """A small hand-built RunResult: ``n_facts`` facts x 8 layers, 3 attacks.

    ``post=False`` gives an attack-only run (no post readouts, no ``success_post``/``curve_post``),
    ``defense=False`` drops the defense dict, ``controls=False`` gives a result written before
    controls existed (no control ranks, no control fields in the summaries).
    """
    ids = fact_ids or [f"fact-{i:02d}" for i in range(n_facts)]
    facts = [
        FactResult(id=ids[i], prompt=f"prompt {i}", answer=f" answer{i}", answer_ids=[100 + i],
                   pre=_readout(i, "pre", ATTACKS, controls),
                   post=_readout(i, "post", ATTACKS, controls) if post else None,
                   scores=DeletionScores(rewrite_score=1.0) if post and defense else None,
                   control=f" other{i}" if controls else None, control_source="relation" if controls else None)
        for i in range(n_facts)
    ]
    attacks = {}
    for j, name in enumerate(ATTACKS):
        ks = [1, 2, 5, 10]
        budgets = [k * (j + 2) * 4 for k in ks]
        attacks[name] = AttackSummary(
            name=name, kind="whitebox", layers=list(range(N_LAYERS // 2, N_LAYERS)), k=5, budget=budgets[2],
            success_pre=_curve(1.0 - 0.1 * j)[2], success_post=_curve(0.5 - 0.1 * j)[2] if post else None,
            curve_k=ks, curve_budget=budgets, curve_pre=_curve(1.0 - 0.1 * j),
            curve_post=_curve(0.5 - 0.1 * j) if post else None)
        if controls:  # control 5% / 10% / 15% unedited, 10% / 20% / 30% after the edit
            a = attacks[name]
            a.control, a.n_control = "relation", n_facts
            a.success_control_pre = 0.05 * (j + 1)
            a.success_control = 0.1 * (j + 1) if post else a.success_control_pre
            a.excess = (a.success_post if post else a.success_pre) - a.success_control
    dfn = None
    if post and defense:
        dfn = {"name": "max-entropy", "rewrite_score": 0.97, "paraphrase_score": 0.81,
               "neighborhood_score": 0.64, "neighborhood_delta_acc": -0.05}
    return RunResult(model=model, n_layers=N_LAYERS, n_facts=n_facts, facts=facts, attacks=attacks,
                     defense=dfn, meta={"seed": 0})


def _traces(fig, **meta):
    return [t for t in fig.data if t.meta and all(t.meta.get(k) == v for k, v in meta.items())]


def _expected_geo_mean(result: RunResult, phase: str) -> list[float]:
    reads = [getattr(f, phase) for f in result.facts if getattr(f, phase) is not None]
    return [statistics.geometric_mean([r.rank[layer] for r in reads]) for layer in range(N_LAYERS)]


def _expected_mean_prob(result: RunResult, phase: str) -> list[float]:
    reads = [getattr(f, phase) for f in result.facts if getattr(f, phase) is not None]
    return [statistics.fmean([r.prob[layer] for r in reads]) for layer in range(N_LAYERS)]


# --------------------------------------------------------------------------------------------
# figures


def test_rank_by_layer_values_and_axes():
    res = make_result()
    fig = viz.rank_by_layer(res)
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.autorange == "reversed"  # rank 1 at the top
    assert fig.layout.xaxis.title.text == LAYER_AXIS_TITLE
    assert "log scale" in fig.layout.yaxis.title.text
    per_layer = res.per_layer()
    for phase in ("pre", "post"):
        (agg,) = _traces(fig, kind="aggregate", phase=phase)
        assert list(agg.x) == list(range(N_LAYERS))
        assert list(agg.y) == pytest.approx(_expected_geo_mean(res, phase), rel=1e-9)
        assert list(agg.y) == pytest.approx([10 ** v for v in per_layer[phase]["mean_log10_rank"]], rel=1e-9)
        assert agg.line.width >= 3 and "geometric mean" in agg.name
        facts = _traces(fig, kind="fact", phase=phase)
        assert [t.meta["fact_id"] for t in facts] == [f.id for f in res.facts]
        for t, f in zip(facts, res.facts):
            assert list(t.y) == getattr(f, phase).rank
            assert t.line.width <= 1.5 and t.opacity < 0.5
        assert sum(bool(t.showlegend) for t in facts) == 1  # one legend entry per phase
    # the pre geometric mean really falls towards rank 1 while post stays high
    pre = _traces(fig, kind="aggregate", phase="pre")[0].y
    post = _traces(fig, kind="aggregate", phase="post")[0].y
    assert pre[-1] < 20 < post[-1]


def test_rank_by_layer_without_per_fact():
    fig = viz.rank_by_layer(make_result(), per_fact=False)
    assert len(fig.data) == 4  # answer and control answer, pre and post
    assert {(t.meta["kind"], t.meta["phase"]) for t in fig.data} == {
        (k, p) for k in ("aggregate", "control") for p in ("pre", "post")}
    assert len(viz.rank_by_layer(make_result(controls=False), per_fact=False).data) == 2


def test_prob_by_layer_values():
    res = make_result()
    fig = viz.prob_by_layer(res)
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text == LAYER_AXIS_TITLE
    per_layer = res.per_layer()
    for phase in ("pre", "post"):
        (agg,) = _traces(fig, kind="aggregate", phase=phase)
        assert list(agg.y) == pytest.approx(_expected_mean_prob(res, phase), rel=1e-12)
        assert list(agg.y) == pytest.approx(per_layer[phase]["mean_prob"], rel=1e-12)
        facts = _traces(fig, kind="fact", phase=phase)
        assert [list(t.y) for t in facts] == [getattr(f, phase).prob for f in res.facts]
    lin = viz.prob_by_layer(res, per_fact=False, log_y=False)
    assert lin.layout.yaxis.type == "linear" and list(lin.layout.yaxis.range) == [0, 1]


def test_per_fact_traces_are_capped_but_aggregate_uses_all_facts():
    res = make_result(n_facts=MAX_FACT_TRACES + 10)
    fig = viz.rank_by_layer(res)
    for phase in ("pre", "post"):
        assert len(_traces(fig, kind="fact", phase=phase)) == MAX_FACT_TRACES
        (agg,) = _traces(fig, kind="aggregate", phase=phase)
        assert list(agg.y) == pytest.approx(_expected_geo_mean(res, phase), rel=1e-9)
        assert f"n={MAX_FACT_TRACES + 10}" in agg.name


def test_rank_heatmap_values():
    res = make_result()
    for phase in ("pre", "post"):
        fig = viz.rank_heatmap(res, phase)
        (hm,) = fig.data
        assert hm.type == "heatmap"
        assert list(hm.y) == [f.id for f in res.facts]
        assert list(hm.x) == list(range(N_LAYERS))
        expected = [[math.log10(r) for r in getattr(f, phase).rank] for f in res.facts]
        assert [v for row in hm.z for v in row] == pytest.approx([v for row in expected for v in row])
        assert [len(row) for row in hm.z] == [N_LAYERS] * N_FACTS
        assert [list(row) for row in hm.customdata] == [getattr(f, phase).rank for f in res.facts]
        assert fig.layout.xaxis.title.text == LAYER_AXIS_TITLE
        assert fig.layout.yaxis.title.text == "fact id"
        assert list(fig.layout.yaxis.ticktext) == [f.id for f in res.facts]  # short ids are not shortened
        assert phase in fig.layout.title.text
        assert hm.zmin == 0
        assert hm.zmax == pytest.approx(max(math.log10(r) for f in res.facts for p in ("pre", "post")
                                            for r in getattr(f, p).rank))  # shared colour scale


def test_success_vs_budget_values_and_styles():
    res = make_result()
    fig = viz.success_vs_budget(res)
    assert len(fig.data) == 2 * len(ATTACKS)
    assert fig.layout.yaxis.title.text == "attack success (% of facts)"
    assert "budget B" in fig.layout.xaxis.title.text
    assert fig.layout.xaxis.type == "log"  # budgets 8..200 span more than a factor of 10
    for name, a in res.attacks.items():
        (pre,) = _traces(fig, attack=name, phase="pre")
        (post,) = _traces(fig, attack=name, phase="post")
        assert list(pre.x) == a.curve_budget == list(post.x)
        assert list(pre.y) == pytest.approx([100 * v for v in a.curve_pre])
        assert list(post.y) == pytest.approx([100 * v for v in a.curve_post])
        assert pre.line.dash == "dash" and post.line.dash == "solid"
        assert pre.line.color == post.line.color
        assert list(pre.customdata) == a.curve_k


def test_success_vs_budget_without_curve_uses_operating_point():
    res = make_result()
    a = res.attacks[ATTACKS[0]]
    a.curve_k, a.curve_budget, a.curve_pre, a.curve_post = [], [], [], None
    fig = viz.success_vs_budget(res)
    (pre,) = _traces(fig, attack=ATTACKS[0], phase="pre")
    (post,) = _traces(fig, attack=ATTACKS[0], phase="post")
    assert list(pre.x) == [a.budget] and list(pre.y) == pytest.approx([100 * a.success_pre])
    assert list(post.y) == pytest.approx([100 * a.success_post])


def test_defense_scores():
    res = make_result()
    fig = viz.defense_scores(res)
    (bar,) = fig.data
    assert list(bar.x) == ["rewrite_score", "paraphrase_score", "neighborhood_score", "neighborhood_delta_acc"]
    assert list(bar.y) == pytest.approx([0.97, 0.81, 0.64, -0.05])
    assert "max-entropy" in fig.layout.title.text
    assert fig.layout.yaxis.range[0] < -0.05  # the negative delta is visible
    res.defense.pop("neighborhood_delta_acc")
    assert list(viz.defense_scores(res).data[0].x) == ["rewrite_score", "paraphrase_score", "neighborhood_score"]
    assert viz.defense_scores(make_result(defense=False)) is None
    assert viz.defense_scores(make_result(post=False)) is None


def test_all_figures_full_run():
    figs = viz.all_figures(make_result())
    assert [t for t, _ in figs] == ["Answer rank by layer", "Answer probability by layer", "Rank heatmap (pre)",
                                    "Rank heatmap (post)", "Attack success vs budget", "Defense scores"]
    assert len(viz.all_figures(make_result(defense=False))) == 5


def test_all_figures_attack_only_run_has_no_post_traces():
    res = make_result(post=False)
    assert viz.phases_available(res) == ["pre"]
    figs = viz.all_figures(res)
    assert [t for t, _ in figs] == ["Answer rank by layer", "Answer probability by layer", "Rank heatmap (pre)",
                                    "Attack success vs budget"]
    for _, fig in figs:
        for t in fig.data:
            assert t.meta.get("phase") != "post"
            assert "post" not in (t.name or "")
    rank_fig = figs[0][1]
    (agg,) = _traces(rank_fig, kind="aggregate", phase="pre")
    assert list(agg.y) == pytest.approx(_expected_geo_mean(res, "pre"), rel=1e-9)
    with pytest.raises(ValueError, match="post"):
        viz.rank_heatmap(res, "post")


def test_partial_post_uses_only_facts_with_post():
    res = make_result()
    res.facts[0].post = None
    res.facts[3].post = None
    fig = viz.rank_by_layer(res)
    assert len(_traces(fig, kind="fact", phase="post")) == N_FACTS - 2
    (agg,) = _traces(fig, kind="aggregate", phase="post")
    assert list(agg.y) == pytest.approx(_expected_geo_mean(res, "post"), rel=1e-9)
    assert list(viz.rank_heatmap(res, "post").data[0].y) == [res.facts[i].id for i in (1, 2, 4, 5)]


# --------------------------------------------------------------------------------------------
# report


PLOTLY_BANNER = "* plotly.js v"  # first line of the bundled library, appears once per embedded copy


def test_report_html_embeds_plotly_once_and_all_figures():
    res = make_result()
    text = viz.report_html(res)
    assert plotly.offline.get_plotlyjs().count(PLOTLY_BANNER) == 1  # the marker is distinctive
    assert text.count(PLOTLY_BANNER) == 1
    assert text.count('class="plotly-graph-div"') == len(viz.all_figures(res)) == 6
    assert not re.search(r"<script[^>]*\bsrc\s*=", text)  # offline: nothing loaded from elsewhere
    assert not re.search(r"<link[^>]*\bhref\s*=", text)
    # header: model / n_facts / defense name
    assert "<h1>probe-attack report: synthetic/llm-8L</h1>" in text
    assert "<dt>facts</dt><dd>6</dd>" in text
    assert "<dt>defense</dt><dd>max-entropy</dd>" in text
    # results table: attack, budget B, success pre/post, control, excess, control pre, source, skipped
    for name, a in res.attacks.items():
        row = (f"<tr><td>{name}</td><td>{a.budget}</td><td>{a.k}</td><td>4, 5, 6, 7</td><td>—</td>"
               f"<td>{100 * a.success_pre:.1f}%</td><td>{100 * a.success_post:.1f}%</td>"
               f"<td>{100 * a.success_control:.1f}%</td><td>{100 * a.excess:+.1f}%</td>"
               f"<td>{100 * a.success_control_pre:.1f}%</td><td>relation (n=6)</td><td>0</td></tr>")
        assert row in text
    assert "<tr><td>rewrite_score</td><td>0.9700</td></tr>" in text
    assert "<tr><td>neighborhood_delta_acc</td><td>-0.0500</td></tr>" in text
    assert viz.report_html(res, title="My run").count("<h1>My run</h1>") == 1


def test_report_attack_only():
    res = make_result(post=False)
    text = viz.report_html(res)
    assert text.count(PLOTLY_BANNER) == 1
    assert text.count('class="plotly-graph-div"') == 4
    assert "<dt>defense</dt><dd>none (attack-only run)</dd>" in text
    assert 'id="defense-table"' not in text
    assert f"<td>{100 * res.attacks[ATTACKS[0]].success_pre:.1f}%</td><td>—</td>" in text


def test_write_report_is_atomic(tmp_path):
    out = tmp_path / "sub" / "report.html"
    got = viz.write_report(make_result(), out)
    assert got == out and out.is_file()
    assert os.listdir(out.parent) == ["report.html"]  # no temp file left behind
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count(PLOTLY_BANNER) == 1
    mode = stat.S_IMODE(out.stat().st_mode)
    # mkstemp creates 0600; the report gets ordinary permissions (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_write_report_failure_keeps_old_report_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("OLD REPORT", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # fails after the temp file was partly written
    with pytest.raises(OSError, match="disk full"):
        viz.write_report(make_result(), out)
    assert out.read_text(encoding="utf-8") == "OLD REPORT"
    assert os.listdir(tmp_path) == ["report.html"]

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        viz.write_report(make_result(), out)
    assert out.read_text(encoding="utf-8") == "OLD REPORT"
    assert os.listdir(tmp_path) == ["report.html"]


def test_report_escapes_untrusted_strings():
    ids = [f"fact-{i}" for i in range(N_FACTS)]
    ids[2] = XSS_ID
    res = make_result(fact_ids=ids, model="<b>evil&model</b>")
    res.defense["name"] = "<script>alert(2)</script>"
    res.attacks["<img src=y onerror=alert(3)>"] = res.attacks.pop(ATTACKS[0])
    text = viz.report_html(res)
    for raw in (XSS_ID, "<script>alert", "<img src=x", "<img src=y", "<b>evil"):
        assert raw not in text
    assert "&lt;b&gt;evil&amp;model&lt;/b&gt;" in text
    assert "<dd>&lt;script&gt;alert(2)&lt;/script&gt;</dd>" in text
    assert "<td>&lt;img src=y onerror=alert(3)&gt;</td>" in text
    # the fact id still reaches the heatmap, JSON-escaped inside the figure data
    assert "\\u003cscript\\u003ealert('xss')\\u003c\\u002fscript\\u003e" in text
    # only our own script tags: plotly.js + one per figure
    assert text.count("<script") == 1 + len(viz.all_figures(res))
    (hm,) = viz.rank_heatmap(res, "pre").data
    assert list(hm.y)[2] == XSS_ID  # escaping happens at serialisation, the data are untouched
    tick = list(viz.rank_heatmap(res, "pre").layout.yaxis.ticktext)[2]
    assert len(tick) == 32 and tick.endswith("…") and XSS_ID.startswith(tick[:-1])  # long ids shortened


def test_empty_run_renders_a_report_without_figures(tmp_path):
    res = RunResult(model="m", n_layers=N_LAYERS, n_facts=0, facts=[], attacks={})
    assert viz.all_figures(res) == []
    text = viz.write_report(res, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Nothing to plot" in text and "No attacks in this run" in text
    assert text.count(PLOTLY_BANNER) == 1
