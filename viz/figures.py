"""Plotly figures for a :class:`probe.results.RunResult`.

Every function here only *reads* a finished result (``results.json`` + ``per_fact.jsonl`` loaded
back into the dataclasses of :mod:`probe.results`); nothing in :mod:`viz` runs a model.

Conventions shared by all figures:

* the layer axis is the 0-based decoder layer index ``ℓ``; the value plotted at ``ℓ`` is the
  logit lens applied to the residual stream *after* block ``ℓ`` (so the last point is the model's
  own output distribution);
* ``rank`` is 1-based (1 = the model's top token) and is always drawn on a log axis;
* "pre" is the model before the deletion/defense, "post" after it. Facts without a ``post``
  readout (attack-only runs) simply contribute no "post" traces;
* aggregates: ranks are summarised by their **geometric mean** per layer
  (``10 ** mean(log10 rank)``, the same quantity as ``RunResult.per_layer()["mean_log10_rank"]``),
  probabilities by their arithmetic **mean** (``per_layer()["mean_prob"]``);
* per-fact traces are thin and translucent and are capped at :data:`MAX_FACT_TRACES` facts (the
  first ones in ``result.facts``) so that reports of large runs stay light; aggregates always use
  every fact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go

from probe.results import DeletionScores

if TYPE_CHECKING:  # viz only reads the dataclasses; importing probe at runtime would pull in torch
    from probe.results import FactResult, LayerReadout, RunResult

__all__ = [
    "LAYER_AXIS_TITLE",
    "MAX_FACT_TRACES",
    "PHASES",
    "phases_available",
    "geo_mean_rank_by_layer",
    "control_rank_by_layer",
    "mean_prob_by_layer",
    "rank_by_layer",
    "prob_by_layer",
    "rank_heatmap",
    "success_vs_budget",
    "defense_scores",
    "all_figures",
]

#: Title of every layer axis.
LAYER_AXIS_TITLE = "decoder layer (residual stream after block ℓ)"
#: At most this many facts get their own thin per-fact line in the layer-wise figures.
MAX_FACT_TRACES = 50
#: The two model states a fact can be read out on, in plotting order.
PHASES = ("pre", "post")
#: Defense metrics drawn by :func:`defense_scores`, in order.
#: the defense metrics drawn and tabulated (one list, from the result type)
DEFENSE_KEYS = DeletionScores.REPORTED
#: the damage measures among them (drawn grey: lower is better)
DAMAGE_KEYS = ("neighborhood_delta_acc", "random_delta_acc", "retention_drop")

_PHASE_COLOR = {"pre": "#1f77b4", "post": "#d62728"}
_PHASE_LABEL = {"pre": "pre (before deletion)", "post": "post (after deletion)"}
_ATTACK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#d62728")


# --------------------------------------------------------------------------------------------
# data helpers


def _readouts(result: RunResult, phase: str) -> list[tuple[FactResult, LayerReadout]]:
    """``(fact, readout)`` for every fact that has a readout for ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return [(f, getattr(f, phase)) for f in result.facts if getattr(f, phase) is not None]


def phases_available(result: RunResult) -> list[str]:
    """The phases (subset of ``("pre", "post")``) for which at least one fact has a readout."""
    return [p for p in PHASES if _readouts(result, p)]


def _columns(rows: Sequence[Sequence[float]]) -> list[tuple]:
    """Transpose per-fact per-layer rows into per-layer columns (truncated to the shortest row)."""
    return list(zip(*rows)) if rows else []


def _geo_mean(rows: Sequence[Sequence[int]]) -> list[float]:
    cols = _columns(rows)
    return [10 ** (sum(math.log10(max(x, 1)) for x in c) / len(c)) for c in cols]


def geo_mean_rank_by_layer(result: RunResult, phase: str = "pre") -> list[float]:
    """Per layer, the geometric mean over facts of the answer rank (``10 ** mean log10 rank``).

    Ranks below 1 (should not happen: ranks are 1-based) are clamped to 1. Returns ``[]`` when no
    fact has a ``phase`` readout.
    """
    return _geo_mean([r.rank for _, r in _readouts(result, phase)])


def control_rank_by_layer(result: RunResult, phase: str = "pre") -> tuple[list[float], int]:
    """Per layer, the geometric mean over facts of the *control* answer's rank
    (:attr:`probe.results.LayerReadout.control_rank`: another answer of the fact's relation that the
    model does not give, :mod:`probe.controls`), and how many facts had one.

    The same aggregate as :func:`geo_mean_rank_by_layer`, so the two lines compare directly: the
    control line is the floor an answer the model was never asked to forget sits at. Returns
    ``([], 0)`` when no fact has a control readout for ``phase`` (e.g. results written before
    controls existed).
    """
    rows = [r.control_rank for _, r in _readouts(result, phase) if getattr(r, "control_rank", None)]
    return _geo_mean(rows), len(rows)


def mean_prob_by_layer(result: RunResult, phase: str = "pre") -> list[float]:
    """Per layer, the arithmetic mean over facts of the lens probability of the answer's first token."""
    cols = _columns([r.prob for _, r in _readouts(result, phase)])
    return [sum(c) / len(c) for c in cols]


# --------------------------------------------------------------------------------------------
# layout helpers

#: Fact ids longer than this are shortened (with an ellipsis) in axis tick labels; hover shows all.
MAX_TICK_LABEL = 32


def _short(label: str, n: int = MAX_TICK_LABEL) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _base_layout(fig: go.Figure, title: str, *, height: int = 450) -> go.Figure:
    fig.update_layout(
        title={"text": title},
        template="plotly_white",
        height=height,
        hovermode="closest",
        legend={"orientation": "v", "yanchor": "top", "y": 1, "xanchor": "left", "x": 1.02},
        margin={"t": 70, "l": 70, "r": 30, "b": 60},
    )
    return fig


def _layer_lines(result: RunResult, *, field: str, aggregate, agg_name: str, per_fact: bool,
                 value_fmt: str, control=None) -> go.Figure:
    """Shared body of :func:`rank_by_layer` / :func:`prob_by_layer` (``control``: a function
    ``(result, phase) -> (per-layer values, n facts)`` drawn as a dashed reference line)."""
    fig = go.Figure()
    for phase in PHASES:
        reads = _readouts(result, phase)
        if not reads:
            continue
        color = _PHASE_COLOR[phase]
        if per_fact:
            for i, (fact, r) in enumerate(reads[:MAX_FACT_TRACES]):
                vals = list(getattr(r, field))
                fig.add_trace(go.Scatter(
                    x=list(range(len(vals))), y=vals, mode="lines",
                    name=f"{phase}: per fact", legendgroup=f"{phase}-facts", showlegend=i == 0,
                    line={"color": color, "width": 1}, opacity=0.25,
                    text=[fact.id] * len(vals),
                    hovertemplate=f"%{{text}} ({phase})<br>layer %{{x}}<br>{field} {value_fmt}<extra></extra>",
                    meta={"kind": "fact", "phase": phase, "fact_id": fact.id},
                ))
        agg = aggregate(result, phase)
        fig.add_trace(go.Scatter(
            x=list(range(len(agg))), y=agg, mode="lines+markers",
            name=f"{_PHASE_LABEL[phase]}: {agg_name} (n={len(reads)})", legendgroup=f"{phase}-agg",
            line={"color": color, "width": 4}, marker={"size": 6},
            hovertemplate=f"{phase} {agg_name}<br>layer %{{x}}<br>{field} {value_fmt}<extra></extra>",
            meta={"kind": "aggregate", "phase": phase, "aggregate": agg_name},
        ))
        if control is not None:
            ctl, n_ctl = control(result, phase)
            if ctl:
                fig.add_trace(go.Scatter(
                    x=list(range(len(ctl))), y=ctl, mode="lines",
                    name=f"{phase}: control answer, {agg_name} (n={n_ctl})", legendgroup=f"{phase}-control",
                    line={"color": color, "width": 2, "dash": "dash"},
                    hovertemplate=f"{phase} control answer {agg_name}<br>layer %{{x}}<br>{field} {value_fmt}"
                                  "<extra></extra>",
                    meta={"kind": "control", "phase": phase, "aggregate": agg_name},
                ))
    fig.update_xaxes(title_text=LAYER_AXIS_TITLE, dtick=1 if result.n_layers <= 40 else None)
    return fig


# --------------------------------------------------------------------------------------------
# figures


def rank_by_layer(result: RunResult, per_fact: bool = True) -> go.Figure:
    """Answer rank per layer, before ("pre") vs after ("post") deletion.

    Thick lines: the per-layer geometric mean of the rank over all facts (one per available
    phase). Thin translucent lines: one per fact (first :data:`MAX_FACT_TRACES` facts), only when
    ``per_fact``. The y axis is logarithmic and *reversed* so that rank 1 (the model's top token,
    i.e. the answer is fully decodable) is at the top.

    Dashed lines (one per phase, when the facts have a control answer): the same geometric mean
    of the *control* answer's rank (:func:`control_rank_by_layer`), the floor the deleted answer
    is compared with.

    Every trace carries ``meta = {"kind": "aggregate"|"fact"|"control", "phase": ...}`` so that
    callers and tests can pick traces without relying on their order.
    """
    fig = _layer_lines(result, field="rank", aggregate=geo_mean_rank_by_layer,
                       agg_name="geometric mean", per_fact=per_fact, value_fmt="%{y:.4g}",
                       control=control_rank_by_layer)
    fig.update_yaxes(type="log", autorange="reversed",
                     title_text="rank of answer's first token (log scale, 1 = top token)")
    dashed = any(t.meta and t.meta.get("kind") == "control" for t in fig.data)
    return _base_layout(fig, "Answer rank by layer (logit lens): pre vs post deletion"
                        + (" (dashed: the control answer)" if dashed else ""))


def prob_by_layer(result: RunResult, per_fact: bool = True, log_y: bool = True) -> go.Figure:
    """Logit-lens probability of the answer's first token per layer, pre vs post deletion.

    Same style as :func:`rank_by_layer`: thick lines are the per-layer arithmetic mean over all
    facts, thin translucent lines individual facts (capped at :data:`MAX_FACT_TRACES`). The y
    axis is logarithmic by default (lens probabilities span many orders of magnitude); pass
    ``log_y=False`` for a linear 0..1 axis.
    """
    fig = _layer_lines(result, field="prob", aggregate=mean_prob_by_layer, agg_name="mean",
                       per_fact=per_fact, value_fmt="%{y:.3g}")
    if log_y:
        fig.update_yaxes(type="log", title_text="probability of answer's first token (log scale)")
    else:
        fig.update_yaxes(type="linear", range=[0, 1], title_text="probability of answer's first token (0–1)")
    return _base_layout(fig, "Answer probability by layer (logit lens): pre vs post deletion")


def rank_heatmap(result: RunResult, phase: str = "pre") -> go.Figure:
    """Facts × layers heatmap of ``log10`` answer rank for one phase.

    Rows are facts (their ``id`` on the y axis, in ``result.facts`` order, first fact on top),
    columns are layers. Colour 0 = rank 1 (answer decodable); the colour range is shared by the
    "pre" and "post" heatmaps of one result (0 .. log10 of the largest rank in either). Raises ``ValueError`` if no fact
    has a readout for ``phase`` (e.g. ``phase="post"`` on an attack-only run).
    """
    reads = _readouts(result, phase)
    if not reads:
        raise ValueError(f"no fact has a {phase!r} readout; cannot draw a {phase} rank heatmap")
    z = [[math.log10(max(x, 1)) for x in r.rank] for _, r in reads]
    ranks = [list(r.rank) for _, r in reads]
    ids = [f.id for f, _ in reads]
    n_cols = max(len(row) for row in z)
    # one colour scale for every phase, so the pre and post heatmaps can be compared by eye
    zmax = max(math.log10(max(x, 1)) for p in PHASES for _, r in _readouts(result, p) for x in r.rank)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_cols)), y=ids, customdata=ranks,
        colorscale="Viridis", reversescale=True, zmin=0, zmax=max(zmax, 1.0),
        colorbar={"title": {"text": "log10 rank"}},
        hovertemplate="%{y}<br>layer %{x}<br>rank %{customdata}<br>log10 rank %{z:.2f}<extra></extra>",
        meta={"kind": "heatmap", "phase": phase},
    ))
    fig.update_xaxes(title_text=LAYER_AXIS_TITLE, dtick=1 if n_cols <= 40 else None)
    fig.update_yaxes(title_text="fact id", autorange="reversed", type="category", automargin=True,
                     tickmode="array", tickvals=ids, ticktext=[_short(i) for i in ids])
    height = min(1400, max(350, 150 + 18 * len(ids)))
    return _base_layout(fig, f"log10 answer rank per fact and layer ({_PHASE_LABEL[phase]})", height=height)


def success_vs_budget(result: RunResult) -> go.Figure:
    """Attack success (% of facts) vs candidate budget B, one colour per attack.

    Dashed lines: before deletion ("pre"); solid lines: after deletion ("post", only when the
    attack has ``curve_post``). Data come from ``AttackSummary.curve_budget``/``curve_pre``/
    ``curve_post`` (fractions, drawn as percentages). An attack without a curve is drawn as a
    single marker at its operating point ``(budget, success_pre/post)``. The x axis is
    logarithmic when the budgets span at least a factor of 10.
    """
    fig = go.Figure()
    budgets: list[float] = []
    for i, (name, a) in enumerate(result.attacks.items()):
        color = _ATTACK_COLORS[i % len(_ATTACK_COLORS)]
        if a.success_pre is None and not a.curve_budget:
            continue  # every fact skipped (e.g. linear-probe answers with < 2 training examples): nothing to draw
        if a.curve_budget:
            xs = list(a.curve_budget)
            pre = [100 * v for v in a.curve_pre]
            post = None if a.curve_post is None else [100 * v for v in a.curve_post]
            custom = list(a.curve_k) if len(a.curve_k) == len(xs) else None
        else:
            xs = [a.budget]
            pre = [100 * a.success_pre]
            post = None if a.success_post is None else [100 * a.success_post]
            custom = [a.k]
        budgets.extend(xs)
        hover = "%{y:.1f}% at B=%{x}" + ("<br>k=%{customdata}" if custom else "")
        fig.add_trace(go.Scatter(
            x=xs, y=pre, customdata=custom, mode="lines+markers", name=f"{name} (pre)",
            legendgroup=name, line={"color": color, "dash": "dash", "width": 2},
            hovertemplate=f"{name} pre<br>{hover}<extra></extra>",
            meta={"kind": "attack", "attack": name, "phase": "pre"},
        ))
        if post is not None:
            fig.add_trace(go.Scatter(
                x=xs, y=post, customdata=custom, mode="lines+markers", name=f"{name} (post)",
                legendgroup=name, line={"color": color, "dash": "solid", "width": 3},
                hovertemplate=f"{name} post<br>{hover}<extra></extra>",
                meta={"kind": "attack", "attack": name, "phase": "post"},
            ))
    positive = [b for b in budgets if b and b > 0]
    log_x = bool(positive) and len(positive) == len(budgets) and max(positive) / min(positive) >= 10
    fig.update_xaxes(type="log" if log_x else "linear",
                     title_text="budget B (candidate tokens per fact" + (", log scale)" if log_x else ")"))
    fig.update_yaxes(title_text="attack success (% of facts)", range=[0, 105])
    return _base_layout(fig, "Attack success vs budget (dashed = pre, solid = post deletion)")


def defense_scores(result: RunResult) -> go.Figure | None:
    """Bar chart of the defense metrics in ``result.defense``; ``None`` without a defense.

    Draws the numeric values among ``rewrite_score``, ``paraphrase_score``,
    ``neighborhood_score`` and (optional) ``neighborhood_delta_acc``, as stored (fractions; the
    delta may be negative). Returns ``None`` when ``result.defense`` is missing or holds none of
    these keys.
    """
    d = result.defense
    if not d:
        return None
    keys = [k for k in DEFENSE_KEYS if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)]
    if not keys:
        return None
    vals = [float(d[k]) for k in keys]
    fig = go.Figure(go.Bar(
        x=keys, y=vals, text=[f"{v:.3f}" for v in vals], textposition="outside",
        marker={"color": ["#7f7f7f" if k in DAMAGE_KEYS else "#2ca02c" for k in keys]},
        hovertemplate="%{x}: %{y:.4f}<extra></extra>",
        meta={"kind": "defense"},
    ))
    lo = min(0.0, min(vals))
    hi = max(1.0, max(vals))
    fig.update_yaxes(title_text="score (fraction of facts, 0–1; Δacc may be negative)",
                     range=[lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)])
    fig.update_xaxes(title_text="metric")
    name = d.get("name")
    title = "Defense scores" + (f": {name}" if name else "")
    return _base_layout(fig, title)


def all_figures(result: RunResult) -> list[tuple[str, go.Figure]]:
    """Every figure that applies to ``result``, as ``(title, figure)`` pairs in report order.

    Order: rank by layer, probability by layer, one rank heatmap per available phase ("pre",
    then "post"), success vs budget (if any attack), defense scores (if a defense). Attack-only
    runs (no ``post`` readouts) therefore get no post heatmap, and the layer figures contain
    only "pre" traces. A run without facts gets only the attack/defense figures.
    """
    out: list[tuple[str, go.Figure]] = []
    phases = phases_available(result)
    if phases:
        out.append(("Answer rank by layer", rank_by_layer(result)))
        out.append(("Answer probability by layer", prob_by_layer(result)))
        for phase in phases:
            out.append((f"Rank heatmap ({phase})", rank_heatmap(result, phase)))
    if result.attacks:
        out.append(("Attack success vs budget", success_vs_budget(result)))
    dfig = defense_scores(result)
    if dfig is not None:
        out.append(("Defense scores", dfig))
    pfig = persistence_figure(result)
    if pfig is not None:
        out.append(("Where the deleted knowledge persists: logit lens vs tuned lens vs probe", pfig))
    return out


def persistence_figure(result: RunResult) -> go.Figure | None:
    """Median answer rank per layer under the logit lens and under every other readout of the
    run's attacks that reports per-layer ranks (``AttackSummary.readout``: tuned lens, probe),
    before vs after the deletion; None when no such attack ran."""
    from .layers import aggregate_layer_rank_figure

    names = [n for n, a in result.attacks.items() if a.readout not in (None, "logit lens")
             and any(_layer_ranks(f, n, "pre") for f in result.facts)]
    if not names:
        return None
    pre: dict = {"logit lens": [f.pre.rank for f in result.facts]}
    post: dict = {"logit lens": [f.post.rank for f in result.facts if f.post is not None]}
    for n in names:
        label = result.attacks[n].readout
        pre[label] = [r for f in result.facts if (r := _layer_ranks(f, n, "pre"))]
        post[label] = [r for f in result.facts if (r := _layer_ranks(f, n, "post"))]
    return aggregate_layer_rank_figure(pre, {k: v for k, v in post.items() if v} or None,
                                       title="Median answer rank by layer: logit lens, tuned lens, probe")


def _layer_ranks(fact, attack: str, phase: str):
    o = (fact.outcomes or {}).get(attack, {}).get(phase)
    if o is None:
        return None
    return o.get("layer_ranks") if isinstance(o, dict) else o.layer_ranks
