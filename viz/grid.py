"""Figures and the offline HTML report of an attack x defense grid (``probe-attack grid``).

* :func:`grid_heatmap` -- defenses x attacks, attack success@B after the edit (%), the
  unedited model's success in the hover text and as a first row;
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

from .multimodal import grid_image_rank_figure, image_examples_html, modality_figure, modality_table_html

SCORE_KEYS = DeletionScores.REPORTED + ("n_facts", "n_failed")


def as_grid_dict(grid) -> dict:
    """The ``grid.json`` dictionary of a :class:`probe.results.GridResult` (a dict passes through)."""
    return grid.to_dict() if hasattr(grid, "to_dict") else grid


def _matrix(grid: dict):
    defenses = [d for d in grid["defenses"] if any(c["defense"] == d for c in grid["cells"])]
    attacks = list(grid["attacks"])
    cell = {(c["defense"], c["attack"]): c for c in grid["cells"]}
    return defenses, attacks, cell


def grid_heatmap(grid: dict) -> go.Figure:
    """Heatmap of attack success@B (%) after each defense; row "unedited" = before any edit
    (the mean over defenses of the pre-edit success, which differs only by the facts a defense
    failed on)."""
    grid = as_grid_dict(grid)
    defenses, attacks, cell = _matrix(grid)
    z, text, hover = [], [], []
    pre_row = []
    for a in attacks:
        vals = [cell[(d, a)]["success_pre"] for d in defenses if (d, a) in cell and cell[(d, a)]["success_pre"] is not None]
        pre_row.append(100 * sum(vals) / len(vals) if vals else None)
    z.append(pre_row)
    text.append(["—" if v is None else f"{v:.0f}%" for v in pre_row])
    hover.append([f"unedited model<br>{html.escape(a)}: {'—' if v is None else f'{v:.1f}%'}"
                  for a, v in zip(attacks, pre_row)])
    for d in defenses:
        row, trow, hrow = [], [], []
        for a in attacks:
            c = cell.get((d, a))
            v = None if c is None or c["success_post"] is None else 100 * c["success_post"]
            row.append(v)
            trow.append("—" if v is None else f"{v:.0f}%")
            pre = None if c is None or c["success_pre"] is None else 100 * c["success_pre"]
            hrow.append(f"{html.escape(d)} × {html.escape(a)} (B={c['budget'] if c else '?'})<br>"
                        f"after edit: {'—' if v is None else f'{v:.1f}%'}<br>"
                        f"before edit: {'—' if pre is None else f'{pre:.1f}%'}")
        z.append(row)
        text.append(trow)
        hover.append(hrow)
    ylabels = ["unedited"] + defenses
    fig = go.Figure(go.Heatmap(z=z, x=attacks, y=ylabels, text=text, texttemplate="%{text}", hovertext=hover,
                               hoverinfo="text", colorscale="Reds", zmin=0, zmax=100,
                               colorbar={"title": "success %"}))
    fig.update_layout(title=f"Attack success@B after each defense ({grid.get('editor', '')}, {grid.get('n_facts')} facts)",
                      yaxis={"autorange": "reversed"}, height=120 + 60 * len(ylabels), template="plotly_white")
    return fig


def grid_rank_curves(grid: dict) -> go.Figure:
    """Median answer rank per layer (log scale): unedited vs after each defense."""
    grid = as_grid_dict(grid)
    pl = grid["per_layer"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=pl["layers"], y=pl["pre"], mode="lines+markers", name="unedited",
                             line={"color": "black", "width": 3}))
    for d, ranks in pl.get("post", {}).items():
        fig.add_trace(go.Scatter(x=pl["layers"], y=ranks, mode="lines+markers", name=d))
    fig.update_layout(title="Where each defense leaves the answer decodable: median logit-lens rank per layer",
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
            vals.append("—" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}"))
        rows.append(f"<tr><td>{html.escape(d)}</td>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>")
    return (f"<table id=\"defense-scores\"><thead><tr><th>defense</th>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


def _cells_table(grid: dict) -> str:
    defenses, attacks, cell = _matrix(grid)
    head = "".join(f"<th>{html.escape(a)} (B={next((cell[(d, a)]['budget'] for d in defenses if (d, a) in cell), '?')})</th>"
                   for a in attacks)
    rows = []
    for d in defenses:
        tds = []
        for a in attacks:
            c = cell.get((d, a))
            if c is None or c["success_post"] is None:
                tds.append("<td>—</td>")
            else:
                pre = "—" if c["success_pre"] is None else f"{100 * c['success_pre']:.1f}"
                tds.append(f"<td>{pre} → {100 * c['success_post']:.1f}</td>")
        rows.append(f"<tr><td>{html.escape(d)}</td>{''.join(tds)}</tr>")
    return (f"<table id=\"grid-table\"><thead><tr><th>defense</th>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


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
             ".note{color:#666;font-size:.9em}</style>\n",
             "<script type=\"text/javascript\">", plotly.offline.get_plotlyjs(), "</script>\n</head>\n<body>\n",
             f"<h1>{html.escape(title)}</h1>\n<dl id=\"grid-meta\">{dl}</dl>\n",
             "<h2>Attack success@B: before → after the edit (%)</h2>\n", _cells_table(grid),
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
