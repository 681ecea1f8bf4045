"""The jobs: where attacks and defenses meet.

* :func:`measure_pre` / :func:`measure_deletion` -- the one deletion unit (a fact, or all facts
  at once, deleted by one defense from a fresh copy; every attack and score before and after);
* :func:`run_main` (``probe-attack run``), :func:`run_attack` (``probe-attack attack``) and
  :func:`run_grid` (``probe-attack grid``) -- short loops over that unit;
* :class:`JobConfig` (what they share), :class:`RunConfig`, :class:`GridConfig`;
* :class:`JsonlLog` -- the one append-only, fsync'd, torn-tail-repairing JSONL log.
"""

from .config import ALL_DEFENSES, GRID_ATTACKS, RUN_ATTACKS, GridConfig, JobConfig, RunConfig, resolve_names
from .deletion import (Plan, build_plan, evenly_spaced, image_examples, known_facts, measure_deletion, measure_pre,
                       random_facts_for, text_form, text_readouts)
from .grid import GRID, PRE, UNITS, build_cells, run_grid
from ..jsonl import JsonlLog, read_jsonl
from .output import RunError, check_output
from .run import CAUSAL, PER_FACT, RESULTS, RUN_STAMP, causal_setup, run_attack, run_main, summarize_run

__all__ = ["ALL_DEFENSES", "GRID_ATTACKS", "RUN_ATTACKS", "GridConfig", "JobConfig", "RunConfig", "resolve_names",
           "Plan", "build_plan", "evenly_spaced", "image_examples", "known_facts", "measure_deletion", "measure_pre",
           "random_facts_for", "text_form", "text_readouts", "GRID", "PRE", "UNITS", "build_cells", "run_grid",
           "JsonlLog", "read_jsonl", "RunError", "check_output", "CAUSAL", "PER_FACT", "RESULTS", "RUN_STAMP",
           "causal_setup", "run_attack", "run_main", "summarize_run"]
