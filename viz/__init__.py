"""Plots and the offline HTML report of a :class:`probe.results.RunResult` (no model is run here)."""

from .figures import (
    LAYER_AXIS_TITLE,
    MAX_FACT_TRACES,
    all_figures,
    control_rank_by_layer,
    defense_scores,
    geo_mean_rank_by_layer,
    mean_prob_by_layer,
    phases_available,
    prob_by_layer,
    rank_by_layer,
    rank_heatmap,
    success_vs_budget,
)
from .report import report_html, write_report

__all__ = [
    "LAYER_AXIS_TITLE",
    "MAX_FACT_TRACES",
    "all_figures",
    "control_rank_by_layer",
    "defense_scores",
    "geo_mean_rank_by_layer",
    "mean_prob_by_layer",
    "phases_available",
    "prob_by_layer",
    "rank_by_layer",
    "rank_heatmap",
    "success_vs_budget",
    "report_html",
    "write_report",
]
