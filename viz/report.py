"""Self-contained, offline HTML report of a :class:`probe.results.RunResult`.

The report is ONE file: plotly.js is embedded exactly once (a ``<script>`` in ``<head>``, from
:func:`plotly.offline.get_plotlyjs`) and every figure of :func:`viz.figures.all_figures` is added
with ``include_plotlyjs=False``, so it opens without network access. The attack section opens
with the control legend (:mod:`viz.controls`) and shows, per attack, success pre / post next to
the control and the excess (post − control), the facts skipped and why; lens attacks get an
output-only vs hidden-only vs all-layers table, relearning its taught rate. All text taken from the
result (model name, defense name, attack names, meta values) is HTML-escaped; fact ids only
reach the page inside plotly's JSON, which escapes ``<``/``>``/``/``.

:func:`write_report` writes atomically: the HTML goes to a temporary file in the destination
directory which is then ``os.replace``-d onto the target path, so an interrupted run leaves
either the previous report or none, never a truncated one.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.offline

from probe.atomic import write_text_atomic

if TYPE_CHECKING:
    from probe.results import RunResult

from .controls import control_legend_html, hidden_table_html, is_lens, is_relearning, pct, taught_table_html
from .figures import DEFENSE_KEYS, all_figures
from .multimodal import image_examples_html, image_rank_figure, run_modality_table_html

__all__ = ["report_html", "write_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
.figure { margin: 1em 0 2em 0; }
.note { color: #666; font-size: 0.9em; }
.legend { background: #f7f7f2; border-left: 3px solid #999; padding: 0.4em 0.8em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _header(result: RunResult, title: str) -> str:
    dfn = result.defense.get("name") if result.defense else None
    n_post = sum(1 for f in result.facts if f.post is not None)
    items = [
        ("model", result.model),
        ("facts", result.n_facts),
        ("layers", result.n_layers),
        ("defense", dfn if dfn is not None else ("none (attack-only run)" if n_post == 0 else "—")),
        ("facts with post-deletion readout", n_post),
    ]
    for k, v in result.meta.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            items.append((k, v))
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    return f"<h1>{_esc(title)}</h1>\n<dl class=\"meta\" id=\"run-meta\">{rows}</dl>\n"


def skip_reasons(result: RunResult, attack: str) -> Counter:
    """Why ``attack`` skipped facts: reason -> count over the facts' unedited-model outcomes
    (``AttackOutcome.skipped``; a fact skipped before the edit is left out of both phases)."""
    out: Counter = Counter()
    for f in result.facts:
        o = (f.outcomes or {}).get(attack, {}).get("pre")
        reason = _field(o, "skipped")
        if reason:
            out[reason] += 1
    return out


def _skipped_cell(result: RunResult, name: str, n_skipped: int) -> str:
    if not n_skipped:
        return "0"
    reasons = skip_reasons(result, name)
    why = "; ".join(f"{r} ×{n}" for r, n in reasons.most_common())
    return f"{n_skipped}" + (f" ({_esc(why)})" if why else "")


def _attack_table(result: RunResult) -> str:
    if not result.attacks:
        return "<p class=\"note\">No attacks in this run.</p>\n"
    rows = []
    for name, a in result.attacks.items():
        where = ", ".join(str(layer) for layer in a.layers) if a.layers else f"({a.kind})"
        n_ctl = a.n_control or 0
        src = f"{_esc(a.control)} (n={n_ctl})" if a.control else "—"
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{a.budget}</td><td>{a.k if a.k is not None else '—'}</td>"
            f"<td>{_esc(where)}</td><td>{_esc(a.readout or '—')}</td>"
            f"<td>{_pct(a.success_pre)}</td><td>{_pct(a.success_post)}</td><td>{_pct(a.success_control)}</td>"
            f"<td>{pct(a.excess, signed=True)}</td><td>{_pct(a.success_control_pre)}</td><td>{src}</td>"
            f"<td>{_skipped_cell(result, name, a.n_skipped)}</td></tr>")
    return ("<table id=\"attack-table\"><thead><tr><th>attack</th><th>budget B</th><th>k per list</th>"
            "<th>layers</th><th>readout</th><th>success pre</th><th>success post</th>"
            "<th title=\"the same rule on the control answers, on the attacked model\">control</th>"
            "<th title=\"post − control (pre − control without an edit)\">excess</th>"
            "<th title=\"the control on the unedited model\">control pre</th><th>control source</th>"
            "<th>facts skipped</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n")


def _lens_section(result: RunResult) -> str:
    """Output-only vs hidden-only vs all layers for every lens attack (``""`` without one)."""
    edited = result.defense is not None or any(a.success_post is not None for a in result.attacks.values())
    rows = []
    for name, a in result.attacks.items():
        if is_lens(a):
            rows.append(("unedited", name, a, "pre"))
            if edited:
                rows.append(("after edit", name, a, "post"))
    table = hidden_table_html(rows)
    return "<h3>Where the answer leaks: output layer vs hidden layers</h3>\n" + table if table else ""


def _relearning_section(result: RunResult) -> str:
    """Relearning's success next to its control and the taught rate (``""`` without relearning)."""
    table = taught_table_html([("this run", n, a) for n, a in result.attacks.items() if is_relearning(a)])
    return "<h3>Relearning: recovered vs taught</h3>\n" + table if table else ""


def _defense_table(result: RunResult) -> str:
    d = result.defense
    if not d:
        return ""
    rows = [f"<tr><td>{_esc(k)}</td><td>{float(d[k]):.4f}</td></tr>" for k in DEFENSE_KEYS if _is_num(d.get(k))]
    others = [k for k, v in d.items() if k not in DEFENSE_KEYS and k != "name" and (_is_num(v) or isinstance(v, str))]
    rows += [f"<tr><td>{_esc(k)}</td><td>{_esc(d[k] if not isinstance(d[k], float) else f'{d[k]:.4g}')}</td></tr>"
             for k in others]
    caption = f"<caption>defense: {_esc(d.get('name', '—'))}</caption>"
    return ("<table id=\"defense-table\">" + caption + "<thead><tr><th>metric</th><th>value</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>\n")


def _field(x: Any, name: str) -> Any:
    return x.get(name) if isinstance(x, dict) else getattr(x, name, None)


def _multimodal_section(result: RunResult, config: dict) -> str:
    """``<h2>Multimodal</h2>``: modality attacks (before / after), rank per layer with vs without the
    image, example images. ``""`` for a run without image facts (no ``meta["image_examples"]`` and
    no ``FactResult.modal``)."""
    examples = result.meta.get("image_examples") or []
    modal = [(f, getattr(f, "modal", None)) for f in result.facts]
    modal = [(f, m) for f, m in modal if m]
    if not examples and not modal:
        return ""
    parts = ["<h2>Multimodal</h2>\n"]
    table = run_modality_table_html(result.attacks)
    if table:
        parts += ["<h3>Text-only vs image-only vs multimodal attacks</h3>\n", table]
    text_pre = [_field(_field(m, "text_pre"), "rank") for _, m in modal if _field(m, "text_pre") is not None]
    text_post = [_field(_field(m, "text_post"), "rank") for _, m in modal if _field(m, "text_post") is not None]
    if modal:
        fig = image_rank_figure(
            {"pre": [f.pre.rank for f, _ in modal], "post": [f.post.rank for f, _ in modal if f.post is not None]},
            {"pre": [r for r in text_pre if r is not None], "post": [r for r in text_post if r is not None]},
            result.n_layers)
        div = fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id="multimodal-figure-0")
        parts.append("<section class=\"figure\"><h3>Median answer rank per layer: with the image vs text only "
                     f"(entity named, no image)</h3>\n{div}\n</section>\n")
    if examples:
        parts += ["<h3>Example images</h3>\n", image_examples_html(examples)]
    return "".join(parts)


def report_html(result: RunResult, title: str | None = None, extra_figures=()) -> str:
    """The complete HTML document of the report for ``result`` (see the module docstring).

    ``title`` defaults to ``"probe-attack report: <model>"``.
    """
    title = title or f"probe-attack report: {result.model}"
    figs = all_figures(result) + list(extra_figures)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n",
        # plotly.js, embedded exactly once; figures below use include_plotlyjs=False.
        "<script type=\"text/javascript\">", plotly.offline.get_plotlyjs(), "</script>\n",
        "</head>\n<body>\n",
        _header(result, title),
        "<h2>Results</h2>\n",
        control_legend_html(result.attacks.values(), edited=any(a.success_post is not None
                                                                for a in result.attacks.values()))
        if result.attacks else "",
        _attack_table(result),
        _lens_section(result),
        _relearning_section(result),
        _defense_table(result),
        "<p class=\"note\">Success = fraction of facts whose answer's first token is among the attack's B "
        "candidate tokens. Ranks are 1-based; layer ℓ = logit lens on the residual stream after block ℓ.</p>\n",
        "<h2>Figures</h2>\n",
    ]
    config = {"responsive": True, "displaylogo": False}
    for i, (ftitle, fig) in enumerate(figs):
        div = fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id=f"figure-{i}")
        parts.append(f"<section class=\"figure\"><h3>{_esc(ftitle)}</h3>\n{div}\n</section>\n")
    if not figs:
        parts.append("<p class=\"note\">Nothing to plot.</p>\n")
    parts.append(_multimodal_section(result, config))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def write_report(result: RunResult, path: str | os.PathLike, title: str | None = None, extra_figures=()) -> Path:
    """Write the HTML report of ``result`` to ``path`` atomically and return the path.

    Parent directories are created. The document is written to a temporary file next to
    ``path``, flushed and fsync-ed, then moved into place with :func:`os.replace`; on any error the
    temporary file is removed and an existing report at ``path`` is left untouched.
    """
    return write_text_atomic(path, report_html(result, title=title, extra_figures=extra_figures))
