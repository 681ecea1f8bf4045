"""Plotly figures for layer-wise readouts (logit lens, tuned lens, probes) and causal traces.

Every function takes plain data (dicts of lists, or objects/dicts with a causal trace's fields), so
the HTML report and notebooks can call them without running a model; nothing here imports torch.

Conventions (shared with :mod:`viz.figures`): the layer axis is the 0-based decoder layer ``ℓ``
(the residual stream after block ``ℓ``); ranks are 1-based and drawn on a log axis; "pre" is the
model before the deletion, "post" after it (dashed). A rank that is not a number -- ``None``,
``inf``, or :data:`probe.probes.UNRANKED` (an answer that is not a probe class) -- is drawn as a
gap, never as a huge value.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import LAYER_AXIS_TITLE

__all__ = ["UNRANKED", "clean_ranks", "median_rank_by_layer", "layer_rank_figure",
           "aggregate_layer_rank_figure", "causal_trace_figure", "causal_trace_heatmap"]

#: Same value as :data:`probe.probes.UNRANKED` (kept here so viz does not import probe/torch).
UNRANKED = 2 ** 63 - 1

_READOUT_COLORS = {"logit lens": "#1f77b4", "tuned lens": "#2ca02c", "probe": "#d62728"}
_FALLBACK_COLORS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_PHASE_DASH = {"pre": "solid", "post": "dash"}
_PHASE_LABEL = {"pre": "before deletion", "post": "after deletion"}


def _color(name: str, i: int) -> str:
    return _READOUT_COLORS.get(name.lower(), _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


def clean_ranks(ranks: Sequence[Any]) -> list[float | None]:
    """Ranks as floats, with ``None`` for anything that is not a finite rank >= 1 below
    :data:`UNRANKED` (missing, ``inf``, NaN, the sentinel)."""
    out: list[float | None] = []
    for r in ranks:
        try:
            v = float(r)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(v if math.isfinite(v) and 1 <= v < UNRANKED else None)
    return out


def median_rank_by_layer(rows: Sequence[Sequence[Any]]) -> list[float | None]:
    """Per layer, the median rank over facts (``rows``: one per-layer rank list per fact).

    Unranked entries (see :func:`clean_ranks`) count as +inf -- the answer was not findable -- so
    the median is ``None`` (a gap) only when at least half of the facts are unranked at that layer.
    Rows are truncated to the shortest one. Returns ``[]`` for no rows.
    """
    if not rows:
        return []
    cols = list(zip(*[[math.inf if v is None else v for v in clean_ranks(r)] for r in rows]))
    out: list[float | None] = []
    for c in cols:
        s = sorted(c)
        n = len(s)
        m = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out.append(m if math.isfinite(m) else None)
    return out


def _layout(fig: go.Figure, title: str, n_layers: int) -> go.Figure:
    fig.update_layout(title={"text": title}, template="plotly_white", height=450, hovermode="closest",
                      legend={"orientation": "v", "yanchor": "top", "y": 1, "xanchor": "left", "x": 1.02},
                      margin={"t": 70, "l": 70, "r": 30, "b": 60})
    fig.update_xaxes(title_text=LAYER_AXIS_TITLE, dtick=1 if n_layers <= 40 else None)
    fig.update_yaxes(title_text="answer rank (1 = top, log scale)", type="log", autorange="reversed")
    return fig


def _rank_traces(fig: go.Figure, series: Mapping[str, Sequence[Any]], phase: str, kind: str, extra: str = "") -> int:
    n = 0
    for i, (name, ranks) in enumerate(series.items()):
        ys = clean_ranks(ranks)
        n = max(n, len(ys))
        fig.add_trace(go.Scatter(
            x=list(range(len(ys))), y=ys, mode="lines+markers", connectgaps=False,
            name=f"{name} ({_PHASE_LABEL[phase]}){extra}", legendgroup=name,
            line={"color": _color(name, i), "dash": _PHASE_DASH[phase], "width": 2.5}, marker={"size": 5},
            hovertemplate=f"{name}, {phase}<br>layer %{{x}}<br>rank %{{y:.4g}}<extra></extra>",
            meta={"kind": kind, "readout": name, "phase": phase}))
    return n


def layer_rank_figure(pre: Mapping[str, Sequence[Any]], post: Mapping[str, Sequence[Any]] | None = None, *,
                      title: str | None = None, fact_id: str | None = None) -> go.Figure:
    """Per-layer answer rank of one fact under several readouts, before vs after deletion.

    Args:
        pre: readout name (e.g. ``"logit lens"``, ``"tuned lens"``, ``"probe"``) -> per-layer
            1-based ranks before the deletion (``LayerReadout.rank``,
            ``AttackOutcome.layer_ranks``...). Lists may differ in length.
        post: the same after the deletion (dashed lines), or None.
        title / fact_id: figure title, or a default naming the fact.

    Returns:
        A figure with one line per (readout, phase); trace ``meta`` is
        ``{"kind": "rank", "readout", "phase"}``. The y axis is log-scaled and reversed (rank 1
        on top); unranked values are gaps.
    """
    fig = go.Figure()
    n = _rank_traces(fig, pre, "pre", "rank")
    if post:
        n = max(n, _rank_traces(fig, post, "post", "rank"))
    title = title or ("Answer rank by layer" + (f": {fact_id}" if fact_id else ""))
    return _layout(fig, title, n)


def aggregate_layer_rank_figure(pre: Mapping[str, Sequence[Sequence[Any]]],
                                post: Mapping[str, Sequence[Sequence[Any]]] | None = None, *,
                                title: str = "Median answer rank by layer") -> go.Figure:
    """Median over facts of the per-layer answer rank, per readout, before vs after deletion.

    Args:
        pre: readout name -> one per-layer rank list per fact (before the deletion).
        post: the same after the deletion, or None.

    Returns:
        A figure with one line per (readout, phase) (:func:`median_rank_by_layer`); the legend
        gives the number of facts; trace ``meta`` is ``{"kind": "median", "readout", "phase",
        "n"}``.
    """
    fig = go.Figure()
    n_layers = 0
    for phase, data in (("pre", pre), ("post", post or {})):
        for i, (name, rows) in enumerate(data.items()):
            med = median_rank_by_layer(rows)
            n_layers = max(n_layers, len(med))
            fig.add_trace(go.Scatter(
                x=list(range(len(med))), y=med, mode="lines+markers", connectgaps=False,
                name=f"{name} ({_PHASE_LABEL[phase]}), median of {len(rows)}", legendgroup=name,
                line={"color": _color(name, i), "dash": _PHASE_DASH[phase], "width": 3}, marker={"size": 5},
                hovertemplate=f"{name}, {phase}<br>layer %{{x}}<br>median rank %{{y:.4g}}<extra></extra>",
                meta={"kind": "median", "readout": name, "phase": phase, "n": len(rows)}))
    return _layout(fig, title, n_layers)


# --------------------------------------------------------------------------------------------
# causal traces


def _field(trace: Any, name: str, default: Any = None) -> Any:
    if isinstance(trace, Mapping):
        return trace.get(name, default)
    return getattr(trace, name, default)


def _trace_data(trace: Any) -> dict:
    """The plottable fields of a :class:`probe.causal.CausalTrace` (or its ``to_json()`` dict)."""
    probs = _field(trace, "probs")
    if probs is None:
        raise ValueError("causal trace has no 'probs'")
    probs = probs.tolist() if hasattr(probs, "tolist") else [list(r) for r in probs]
    n_rows = len(probs)
    n_cols = len(probs[0]) if n_rows else 0
    tokens = list(_field(trace, "tokens", None) or [str(i) for i in range(n_cols)])
    layers = list(_field(trace, "layers", None) or range(n_rows))
    if len(tokens) != n_cols or len(layers) != n_rows:
        raise ValueError(f"causal trace: probs is {n_rows}x{n_cols} but there are {len(layers)} layers and "
                         f"{len(tokens)} token labels")
    columns = _field(trace, "columns", None) or [[i] for i in range(n_cols)]
    subject = set(int(p) for p in (_field(trace, "subject_positions", None) or []))
    return {"probs": probs, "tokens": tokens, "layers": [int(x) for x in layers],
            "subject_cols": [any(p in subject for p in c) for c in columns],
            "clean_prob": _field(trace, "clean_prob"), "corrupted_prob": _field(trace, "corrupted_prob"),
            "answer": _field(trace, "answer_token", None) or _field(trace, "answer", "")}


def _tick_labels(d: dict) -> list[str]:
    return [f"{t!r}*" if s else repr(t) for t, s in zip(d["tokens"], d["subject_cols"])]


def _fmt(p: Any) -> str:
    return "n/a" if p is None else f"{float(p):.3f}"


def causal_trace_heatmap(trace: Any, *, zmax: float | None = None, name: str = "",
                         showscale: bool = True) -> go.Heatmap:
    """One layer x token-position heatmap trace of restored answer probabilities (0..1).

    x is the column index (tick labels: the tokens, subject tokens marked ``*``), y the decoder
    layer. ``meta`` holds ``{"kind": "causal-trace", "phase": name, "clean_prob",
    "corrupted_prob"}``.
    """
    d = _trace_data(trace)
    hi = zmax if zmax is not None else max([max(r) for r in d["probs"] if r] + [1e-9])
    labels = _tick_labels(d)
    return go.Heatmap(
        z=d["probs"], x=list(range(len(d["tokens"]))), y=d["layers"], zmin=0.0, zmax=hi, colorscale="Purples",
        showscale=showscale, colorbar={"title": {"text": f"p({d['answer'].strip() or 'answer'})"}},
        customdata=[list(labels) for _ in d["layers"]],
        hovertemplate="layer %{y}, token %{customdata}<br>p = %{z:.4f}<extra>" + (name or "") + "</extra>",
        meta={"kind": "causal-trace", "phase": name, "clean_prob": d["clean_prob"],
              "corrupted_prob": d["corrupted_prob"]})


def causal_trace_figure(pre: Any, post: Any | None = None, *, title: str | None = None) -> go.Figure:
    """Causal-tracing heatmaps (Meng et al. 2022, fig. 1), before vs after deletion side by side.

    Args:
        pre: a :class:`probe.causal.CausalTrace` (or its ``to_json()`` dict, or any object/dict
            with ``probs [n_layers][n_columns]``, ``tokens``, ``layers``, ``subject_positions``,
            ``columns``, ``clean_prob``, ``corrupted_prob``) for the model before the deletion.
        post: the same after the deletion, or None (one panel).
        title: figure title (default names the answer).

    Returns:
        A figure with one heatmap per panel, a shared colour scale (0 to the largest restored or
        clean probability of either panel, so colours compare across panels), the panels' clean
        and corrupted probabilities in their subtitles.

    Raises:
        ValueError: a trace whose ``probs`` shape disagrees with its labels.
    """
    traces = [("pre", pre)] + ([("post", post)] if post is not None else [])
    data = [(phase, _trace_data(t)) for phase, t in traces]
    zmax = max([max((max(r) for r in d["probs"] if r), default=0.0) for _, d in data]
               + [float(d["clean_prob"]) for _, d in data if d["clean_prob"] is not None] + [1e-9])
    subtitles = [f"{_PHASE_LABEL[phase]}: clean p={_fmt(d['clean_prob'])}, corrupted p={_fmt(d['corrupted_prob'])}"
                 for phase, d in data]
    fig = make_subplots(rows=1, cols=len(data), subplot_titles=subtitles, horizontal_spacing=0.08)
    for j, ((phase, d), (_, t)) in enumerate(zip(data, traces), start=1):
        fig.add_trace(causal_trace_heatmap(t, zmax=zmax, name=phase, showscale=j == len(data)), row=1, col=j)
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(d["tokens"]))), ticktext=_tick_labels(d),
                         tickangle=-60, title_text="token position (* = corrupted subject)", row=1, col=j)
        fig.update_yaxes(title_text="decoder layer" if j == 1 else None, row=1, col=j)
    answer = data[0][1]["answer"].strip()
    fig.update_layout(title={"text": title or f"Causal trace: p({answer}) when one hidden state is restored"},
                      template="plotly_white", height=520, width=520 * len(data) + 120,
                      margin={"t": 90, "l": 70, "r": 30, "b": 120})
    return fig
