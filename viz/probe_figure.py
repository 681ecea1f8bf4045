"""Plotly figure of the per-relation linear probes' cross-validated accuracy against the relation prior.

Input: the JSON dict of :func:`probe.probes.probe_cv_report` (or :func:`probe.probes.relation_cv`);
nothing here runs a model or imports torch. A layer whose probe line lies above the prior's
(dashed, flat: the prior reads no hidden state) decodes more of the answer than the relation's
answer frequencies give away (issue 11 item 5; Belinkov 2022, "Probing Classifiers", on comparing
a probe with a baseline that has no access to the representation). Layer 0 is a lexical baseline
of its own: what one block of attention copies from the prompt's tokens (e.g. a brand in a product
name) to the last token.
"""

from __future__ import annotations

from typing import Any, Mapping

import plotly.graph_objects as go

from .figures import LAYER_AXIS_TITLE

__all__ = ["probe_cv_figure"]

_PROBE = "#d62728"
_PRIOR = "#7f7f7f"


def probe_cv_figure(report: Mapping[str, Any], *, title: str | None = None) -> go.Figure:
    """Per-layer held-out accuracy of the per-relation probes (top-1 solid, top-k dotted) with
    the relation prior's top-1 / top-k as flat dashed lines, pooled over relations.

    Args:
        report: ``{"layers", "accuracy", "accuracy_at_k", "prior", "prior_at_k", "k", "n",
            "n_skipped", "relations"?, "relation_note"?}`` (accuracies are fractions 0..1;
            ``None`` entries are drawn as gaps).
        title: figure title (default names n, the relations and the fold count).

    Returns:
        A ``plotly.graph_objects.Figure``, y axis 0..1.

    Raises:
        KeyError: a required key is missing; ValueError: ``accuracy`` and ``layers`` differ in length.
    """
    layers = list(report["layers"])
    if len(report["accuracy"]) != len(layers) or len(report["accuracy_at_k"]) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(report['accuracy'])} / {len(report['accuracy_at_k'])} "
                         "accuracies")
    k = report["k"]
    fig = go.Figure()
    series = [("probe, top-1", report["accuracy"], _PROBE, "solid"),
              (f"probe, top-{k}", report["accuracy_at_k"], _PROBE, "dot"),
              ("relation prior, top-1", [report["prior"]] * len(layers), _PRIOR, "dash"),
              (f"relation prior, top-{k}", [report["prior_at_k"]] * len(layers), _PRIOR, "dashdot")]
    for name, ys, color, dash in series:
        fig.add_trace(go.Scatter(x=layers, y=ys, mode="lines+markers" if "probe" in name else "lines", name=name,
                                 line={"color": color, "dash": dash},
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>"))
    rels = sorted(report.get("relations") or {})
    if title is None:
        shown = ", ".join(rels[:6]) + (", ..." if len(rels) > 6 else "")
        title = (f"Linear probes per relation vs the relation prior: {report.get('folds', '?')}-fold held-out "
                 f"accuracy, n = {report['n']} ({report['n_skipped']} skipped)" + (f"; relations {shown}" if rels else ""))
    fig.update_layout(title={"text": title}, template="plotly_white", height=450, hovermode="x unified",
                      xaxis_title=LAYER_AXIS_TITLE, yaxis_title="held-out accuracy", yaxis_range=[0, 1.02],
                      legend={"orientation": "h", "y": -0.2})
    if report.get("relation_note"):
        fig.add_annotation(text=report["relation_note"], xref="paper", yref="paper", x=0, y=1.0, showarrow=False,
                           xanchor="left", yanchor="bottom", font={"size": 11})
    return fig
