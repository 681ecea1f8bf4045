"""Figures and the offline HTML report of an attack x defense grid (``probe-attack grid``).

* :func:`grid_heatmap` -- defenses x attacks, the excess attack success@B (post − control, %;
  :mod:`viz.controls`) with post and control in the hover text, the unedited model's pre −
  control as a first row (grids without controls: success after the edit, as before);
* :func:`grid_rank_curves` -- per layer, the median logit-lens rank of the answer's first token on
  the unedited model and after each defense: where each defense leaves the answer decodable;
* :func:`write_grid_report` -- one self-contained HTML file (plotly.js embedded once), written
  atomically.

Every function takes a :class:`probe.results.GridResult` (what :func:`probe.jobs.run_grid` returns and
:meth:`~probe.results.GridResult.load` reads back) or its plain ``grid.json`` dictionary.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline

from probe.atomic import write_text_atomic
from probe.results import DeletionScores

from .controls import (control_legend_html, hidden_table_html, is_lens, is_relearning, pct, taught_table_html,
                       unedited_excess)
from .multimodal import grid_image_rank_figure, image_examples_html, modality_figure, modality_table_html

SCORE_KEYS = DeletionScores.REPORTED + DeletionScores.DENOMINATORS + ("n_facts", "n_failed")
_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def as_grid_dict(grid) -> dict:
    """The ``grid.json`` dictionary of a :class:`probe.results.GridResult` (a dict passes through)."""
    return grid.to_dict() if hasattr(grid, "to_dict") else grid


def _matrix(grid: dict):
    defenses = [d for d in grid["defenses"] if any(c["defense"] == d for c in grid["cells"])]
    attacks = list(grid["attacks"])
    cell = {(c["defense"], c["attack"]): c for c in grid["cells"]}
    return defenses, attacks, cell


def _has_controls(grid: dict) -> bool:
    return any(c.get("excess") is not None for c in grid.get("cells", []))


def _hover_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def grid_heatmap(grid: dict) -> go.Figure:
    """Heatmap of the headline per (defense, attack) cell: the EXCESS success
    ``success_post - success_control`` (%, :mod:`viz.controls`), post and control in the hover
    text; row "unedited" = ``success_pre - success_control_pre`` (the mean over defenses, which
    differ only by the facts a defense failed on). A grid written before controls existed (no
    cell has ``excess``) shows attack success@B after each defense instead, as before."""
    grid = as_grid_dict(grid)
    defenses, attacks, cell = _matrix(grid)
    controls = _has_controls(grid)
    z, text, hover = [], [], []

    def fmt(v):
        return "—" if v is None else (f"{v:+.0f}%" if controls else f"{v:.0f}%")

    pre_row, pre_hover = [], []
    for a in attacks:
        cs = [cell[(d, a)] for d in defenses if (d, a) in cell]
        if controls:
            v = unedited_excess(cs)
        else:
            vals = [c["success_pre"] for c in cs if c.get("success_pre") is not None]
            v = sum(vals) / len(vals) if vals else None
        pre_row.append(None if v is None else 100 * v)
        pres = [c["success_pre"] for c in cs if c.get("success_pre") is not None]
        ctls = [c["success_control_pre"] for c in cs if c.get("success_control_pre") is not None]
        pre_hover.append(f"unedited model × {html.escape(a)}<br>"
                         + (f"excess (pre − control): {_hover_pct(v)}<br>" if controls else "")
                         + f"success pre: {_hover_pct(sum(pres) / len(pres) if pres else None)}<br>"
                         f"control pre: {_hover_pct(sum(ctls) / len(ctls) if ctls else None)}")
    z.append(pre_row)
    text.append([fmt(v) for v in pre_row])
    hover.append(pre_hover)
    for d in defenses:
        row, hrow = [], []
        for a in attacks:
            c = cell.get((d, a))
            key = "excess" if controls else "success_post"
            v = None if c is None or c.get(key) is None else 100 * c[key]
            row.append(v)
            hrow.append(f"{html.escape(d)} × {html.escape(a)} (B={c['budget'] if c else '?'})<br>"
                        + (f"excess (post − control): {_hover_pct(c and c.get('excess'))}<br>" if controls else "")
                        + f"after edit: {_hover_pct(c and c.get('success_post'))}<br>"
                        f"control after edit: {_hover_pct(c and c.get('success_control'))}<br>"
                        f"before edit: {_hover_pct(c and c.get('success_pre'))}")
        z.append(row)
        text.append([fmt(v) for v in row])
        hover.append(hrow)
    ylabels = ["unedited"] + defenses
    if controls:
        scale = {"colorscale": "RdBu", "reversescale": True, "zmin": -100, "zmax": 100, "zmid": 0,
                 "colorbar": {"title": "excess %"}}
        title = (f"Excess attack success@B (post − control, %) after each defense ({grid.get('editor', '')}, "
                 f"{grid.get('n_facts')} facts)")
    else:
        scale = {"colorscale": "Reds", "zmin": 0, "zmax": 100, "colorbar": {"title": "success %"}}
        title = (f"Attack success@B after each defense ({grid.get('editor', '')}, {grid.get('n_facts')} facts; "
                 "no controls in this grid)")
    fig = go.Figure(go.Heatmap(z=z, x=attacks, y=ylabels, text=text, texttemplate="%{text}", hovertext=hover,
                               hoverinfo="text", meta={"kind": "excess" if controls else "success_post"}, **scale))
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, height=120 + 60 * len(ylabels),
                      template="plotly_white")
    return fig


def grid_rank_curves(grid: dict) -> go.Figure:
    """Median answer rank per layer (log scale): unedited vs after each defense. When
    ``per_layer`` also holds the control answers' median ranks (``pre_control``: a list;
    ``post_control``: defense -> list), each is drawn as a dashed line in its state's colour: the
    floor the deleted answer is compared with."""
    grid = as_grid_dict(grid)
    pl = grid["per_layer"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=pl["layers"], y=pl["pre"], mode="lines+markers", name="unedited",
                             line={"color": "black", "width": 3}, legendgroup="unedited",
                             meta={"kind": "answer", "state": "unedited"}))
    if pl.get("pre_control"):
        fig.add_trace(go.Scatter(x=pl["layers"], y=pl["pre_control"], mode="lines", name="unedited: control answer",
                                 line={"color": "black", "width": 2, "dash": "dash"}, legendgroup="unedited",
                                 meta={"kind": "control", "state": "unedited"}))
    post_control = pl.get("post_control") or {}
    for i, (d, ranks) in enumerate(pl.get("post", {}).items()):
        color = _COLORS[i % len(_COLORS)]
        fig.add_trace(go.Scatter(x=pl["layers"], y=ranks, mode="lines+markers", name=d, line={"color": color},
                                 legendgroup=d, meta={"kind": "answer", "state": d}))
        if post_control.get(d):
            fig.add_trace(go.Scatter(x=pl["layers"], y=post_control[d], mode="lines", name=f"{d}: control answer",
                                     line={"color": color, "dash": "dash"}, legendgroup=d,
                                     meta={"kind": "control", "state": d}))
    dashed = " (dashed: the control answer)" if pl.get("pre_control") or post_control else ""
    fig.update_layout(title="Where each defense leaves the answer decodable: median logit-lens rank per layer" + dashed,
                      xaxis_title="layer (residual stream after block ℓ)", yaxis_title="median rank (1 = top)",
                      yaxis_type="log", template="plotly_white", height=480)
    return fig


def _scores_table(grid: dict) -> str:
    defenses, attacks, cell = _matrix(grid)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in SCORE_KEYS)
    rows = []
    for d in defenses:
        c = next((cell[(d, a)] for a in attacks if (d, a) in cell), None)
        if c is None:
            continue
        vals = []
        for k in SCORE_KEYS:
            v = c.get(k)
            vals.append("—" if v is None else (str(v) if isinstance(v, int) else
                                               f"{v:.0f}" if k == "retention_n" else f"{v:.3f}"))
        rows.append(f"<tr><td>{html.escape(d)}</td>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>")
    return (f"<table id=\"defense-scores\"><thead><tr><th>defense</th>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


def _budget(cell: dict, defenses, a) -> str:
    return str(next((cell[(d, a)]["budget"] for d in defenses if (d, a) in cell), "?"))


def _excess_table(grid: dict) -> str:
    """The headline table: excess success (post − control, %) per defense × attack, the unedited
    model's pre − control first; each cell's title shows post and control."""
    defenses, attacks, cell = _matrix(grid)
    head = "".join(f"<th>{html.escape(a)} (B={_budget(cell, defenses, a)})</th>" for a in attacks)
    tds = []
    for a in attacks:
        cs = [cell[(d, a)] for d in defenses if (d, a) in cell]
        tds.append(f"<td>{pct(unedited_excess(cs), signed=True)}</td>")
    rows = [f"<tr><td>unedited (pre − control)</td>{''.join(tds)}</tr>"]
    for d in defenses:
        tds = []
        for a in attacks:
            c = cell.get((d, a))
            if c is None:
                tds.append("<td>—</td>")
                continue
            title = f"post {pct(c.get('success_post'))}, control {pct(c.get('success_control'))}"
            tds.append(f"<td title=\"{title}\">{pct(c.get('excess'), signed=True)}</td>")
        rows.append(f"<tr><td>{html.escape(d)}</td>{''.join(tds)}</tr>")
    return (f"<table id=\"excess-table\"><thead><tr><th>defense</th>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


def _cells_table(grid: dict) -> str:
    """Success pre → post per defense × attack, with the control on the edited model ``(c …)``."""
    defenses, attacks, cell = _matrix(grid)
    head = "".join(f"<th>{html.escape(a)} (B={_budget(cell, defenses, a)})</th>" for a in attacks)
    rows = []
    for d in defenses:
        tds = []
        for a in attacks:
            c = cell.get((d, a))
            if c is None or c.get("success_post") is None:
                tds.append("<td>—</td>")
            else:
                pre = "—" if c.get("success_pre") is None else f"{100 * c['success_pre']:.1f}"
                ctl = "" if c.get("success_control") is None else f" (c {100 * c['success_control']:.1f})"
                skip = f" [{c['n_skipped']} skipped]" if c.get("n_skipped") else ""
                tds.append(f"<td>{pre} → {100 * c['success_post']:.1f}{ctl}{skip}</td>")
        rows.append(f"<tr><td>{html.escape(d)}</td>{''.join(tds)}</tr>")
    return (f"<table id=\"grid-table\"><thead><tr><th>defense</th>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


def _lens_section(grid: dict) -> str:
    """Per defense, every lens attack's output-only vs hidden-only vs all-layers success (``""``
    when the grid has no lens attack with these fields)."""
    defenses, attacks, cell = _matrix(grid)
    lens = [a for a in attacks if any(is_lens(cell[(d, a)]) for d in defenses if (d, a) in cell)]
    rows = []
    for a in lens:
        first = next(cell[(d, a)] for d in defenses if (d, a) in cell)
        rows.append(("unedited", a, first, "pre"))
        rows += [(d, a, cell[(d, a)], "post") for d in defenses if (d, a) in cell]
    table = hidden_table_html(rows)
    return "<h2>Where the answer leaks: output layer vs hidden layers (%)</h2>\n" + table if table else ""


def _relearning_section(grid: dict) -> str:
    defenses, attacks, cell = _matrix(grid)
    rows = [(d, a, cell[(d, a)]) for a in attacks for d in defenses
            if (d, a) in cell and is_relearning(cell[(d, a)])]
    table = taught_table_html(rows)
    return "<h2>Relearning: recovered vs taught (%)</h2>\n" + table if table else ""


def _multimodal_section(grid: dict, config: dict) -> str:
    """Modality attacks (table + bars), rank per layer with vs without the image, example images;
    each only when the grid has the data (``""`` for a text-only grid)."""
    parts = []
    fig = modality_figure(grid) if grid.get("cells") else None
    if fig is not None:
        parts += ["<h2>Text-only vs image-only vs multimodal attacks</h2>\n", modality_table_html(grid),
                  fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id="grid-modality-figure")]
    if grid.get("per_layer_text") and grid.get("per_layer"):
        fig = grid_image_rank_figure(grid["per_layer"], grid["per_layer_text"])
        parts += ["<h2>Median answer rank per layer with and without the image</h2>\n",
                  fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id="grid-image-rank-figure")]
    if grid.get("image_examples"):
        parts += ["<h2>Example images</h2>\n", image_examples_html(grid["image_examples"])]
    return "".join(parts)


def grid_report_html(grid: dict) -> str:
    """The complete offline HTML document for a grid."""
    grid = as_grid_dict(grid)
    title = f"probe-attack grid: {grid.get('model', '')}"
    meta = {k: grid.get(k) for k in ("model", "editor", "facts_file", "n_facts_input", "n_known", "n_facts",
                                     "complete", "mean_edit_seconds", "seed")}
    dl = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in meta.items())
    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
             f"<title>{html.escape(title)}</title>\n",
             "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}dt{font-weight:600}dd{margin:0}"
             ".note{color:#666;font-size:.9em}.legend{background:#f7f7f2;border-left:3px solid #999;padding:.4em .8em}"
             "</style>\n",
             "<script type=\"text/javascript\">", plotly.offline.get_plotlyjs(), "</script>\n</head>\n<body>\n",
             f"<h1>{html.escape(title)}</h1>\n<dl id=\"grid-meta\">{dl}</dl>\n",
             "<h2>Attack success@B</h2>\n", control_legend_html(grid.get("cells", [])),
             "<h3>Excess success (post − control, %): the headline</h3>\n", _excess_table(grid),
             "<h3>Before → after the edit (c = control after the edit, %)</h3>\n", _cells_table(grid),
             _lens_section(grid), _relearning_section(grid),
             "<h2>What each defense cost</h2>\n", _scores_table(grid),
             "<p class=\"note\">Success = fraction of facts whose answer is in the attack's candidate set of size B "
             "(whitebox: the answer's first token; blackbox: the answer string in any sample). Scores: method.md §5 "
             "(rewrite/paraphrase in erasure form; target_rewrite_score for empty response / error injection).</p>\n"]
    config = {"responsive": True, "displaylogo": False}
    if grid.get("cells"):
        for i, fig in enumerate((grid_heatmap(grid), grid_rank_curves(grid))):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id=f"grid-figure-{i}"))
    else:
        parts.append("<p class=\"note\">No finished cells yet.</p>\n")
    parts.append(_multimodal_section(grid, config))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def write_grid_report(grid: dict, path: str | os.PathLike) -> Path:
    """Write :func:`grid_report_html` to ``path`` atomically."""
    grid = as_grid_dict(grid)
    return write_text_atomic(path, grid_report_html(grid))
