"""The attack x defense grid (``probe-attack grid``): the papers' central table.

For each known fact, every attack runs on the unedited model (:func:`~.deletion.measure_pre`), then
each selected defense deletes the fact from a fresh copy and every attack and score is measured on
the edited model (:func:`~.deletion.measure_deletion`, the same unit ``probe-attack run`` uses).

Output folder:

* ``pre.jsonl`` -- one :class:`~probe.results.PreMeasure` per fact (the unedited model);
* ``units.jsonl`` -- one :class:`~probe.results.FactResult` per (defense, fact), or the reason the
  edit failed;
* ``grid.json`` -- the :class:`~probe.results.GridResult`: one cell per (defense, attack), rewritten
  after every fact (facts are processed one at a time through every defense, so a grid stopped
  early covers every defense on fewer facts; ``complete`` says whether every planned fact is in);
* ``report.html`` -- defense x attack heatmap, defense scores, per-layer answer rank per defense.

Records are appended (fsync'd) as each unit finishes; ``resume=True`` skips finished facts and
defenses, so a kill mid-cell recomputes only the unit that was in progress.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from attacks import summarize
from viz.grid import write_grid_report

from ..atomic import write_text_atomic
from ..controls import control_label
from ..facts import Fact, check_lengths
from ..images import attach_images
from ..interrupt import check as check_interrupt
from ..results import Cell, DeletionScores, FactResult, GridResult, LayerReadout, PreMeasure, median
from .calibrate import calibration_meta
from .config import GridConfig, resolve_names
from .deletion import (Plan, attack_context, build_plan, check_generation_lengths, image_examples, known_facts,
                       measure_deletion, measure_pre)
from ..jsonl import JsonlLog
from ..pool import extra_facts, pool_summary
from .output import check_output, say_resumed

PRE = "pre.jsonl"
UNITS = "units.jsonl"
GRID = "grid.json"
STAMP = "grid_run.json"
REPORT = "report.html"


def build_cells(plan: Plan, pre: dict[str, PreMeasure], units: Sequence[FactResult], n_layers: int,
                editor: str) -> list[Cell]:
    """Aggregate per-fact records into cells: per defense, one :func:`attacks.summarize` per attack
    over the facts that defense deleted (failed edits counted in ``n_failed``, left out), with the
    defense's mean scores."""

    label = control_label(plan.controls)
    by_def: dict[str, list[FactResult]] = {}
    for u in units:
        by_def.setdefault(u.defense, []).append(u)
    cells = []
    for dfn, us in by_def.items():
        ok = [u for u in us if u.error is None and u.id in pre]
        scores = DeletionScores.means([u.scores for u in ok if u.scores])
        for a in plan.attacks:
            s = summarize(a, n_layers, [pre[u.id].outcomes.get(a.name) for u in ok],
                          [u.outcomes.get(a.name, {}).get("post") for u in ok], control=label)
            cells.append(Cell(**asdict(s), defense=dfn, editor=editor, n_failed=len(us) - len(ok), scores=scores))
    return cells


def per_layer(pre: dict[str, LayerReadout | None], units: Sequence[tuple[str, LayerReadout | None]],
              n_layers: int) -> dict:
    """Median answer rank per layer (:func:`probe.results.median`): unedited, and after each
    defense; the same for the control answers (``pre_control``, ``post_control``) where the
    readouts have them."""
    def med(reads, attr="rank"):
        cols = list(zip(*[getattr(r, attr) for r in reads if getattr(r, attr) is not None]))
        return [median(c) for c in cols] if cols else []

    pres = [r for r in pre.values() if r is not None]
    out = {"layers": list(range(n_layers)), "pre": med(pres)}
    by_def: dict[str, list] = {}
    for d, r in units:
        if r is not None:
            by_def.setdefault(d, []).append(r)
    out["post"] = {d: med(rs) for d, rs in by_def.items()}
    if any(r.control_rank is not None for r in pres):
        out["pre_control"] = med(pres, "control_rank")
        out["post_control"] = {d: med(rs, "control_rank") for d, rs in by_def.items()}
    return out


def run_grid(model, facts: Sequence[Fact], out: str | Path, cfg: GridConfig, *, facts_label: str = "",
             resume: bool = False, workers: int | None = None, ray_address: str | None = None,
             model_factory: Callable[[], Any] | None = None, on_dispatch: Callable | None = None) -> GridResult:
    """``probe-attack grid``: every selected defense x attack on the known facts.

    With ``workers`` or ``ray_address`` the (fact, defense) units run as tasks of Ray workers
    (:func:`.shard.run_sharded`; each worker builds its own model with ``model_factory``, default:
    a copy of ``model``), the known-fact filter and the writing stay here; the output is the same
    as serially (cells are built from the units in fact-major order, whatever order they finish
    in) and ``resume`` works across worker counts.

    Returns:
        The :class:`~probe.results.GridResult` (also written to ``grid.json``).

    Raises:
        RunError: the output folder holds another grid (without ``resume``) or one with other
            settings, or Ray is asked for but not installed; ValueError: unknown defense/attack/editor
            names.
    """
    out = Path(out)
    if workers is not None or ray_address is not None:
        from .shard import check_ray

        check_ray(workers)
    facts = list(attach_images(model, facts))
    defenses = resolve_names(cfg.defenses, "defense")
    attack_names = resolve_names(cfg.attacks, "attack")
    plan = build_plan(model, attack_names, defenses, cfg)
    plan.pool, plan.extra = facts, extra_facts(facts)
    check_lengths(model, facts)
    stamp = {"command": "grid", "model": model.name, "model_fingerprint": model.fingerprint, "facts": facts_label,
             **{k: v for k, v in asdict(cfg).items() if k not in ("progress", "defenses")},
             "editor_config_resolved": {d: e.config() for d, (_, e) in plan.defenses.items()}}
    check_output(out, "grid", stamp, resume, stamp_file=STAMP, ignore=("editor_config_resolved",),
                 defaults=asdict(type(cfg)()))
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    pre_ctx = attack_context(plan, [], cfg)
    known, n_known = known_facts(model, facts, plan, cfg, pre_ctx, progress=cfg.progress)
    check_generation_lengths(model, [f for f, _, _ in known], cfg.gen_tokens)
    # one at a time: each attack leaves out only the fact it attacks (leave-one-out pools)
    owns_ray = None
    if workers is not None or ray_address is not None:
        from .shard import connect_ray

        owns_ray = connect_ray(workers, ray_address)  # an unreachable cluster: one line, nothing written
    try:  # a Ray this call started is shut down if the set-up below fails (run_sharded owns it after)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / STAMP, json.dumps(stamp, indent=2))
        pre_log, unit_log = JsonlLog(out / PRE), JsonlLog(out / UNITS)
        pre_done = {r["fact_id"]: PreMeasure.from_json(r) for r in pre_log.records}
        units = [FactResult.from_json(u) for u in unit_log.records]
    except BaseException:
        if owns_ray:
            from .shard import shutdown_ray

            shutdown_ray()
        raise
    done_units = {(u.defense, u.id) for u in units}
    say_resumed(cfg, len(done_units), len(known) * len(defenses), "(defense, fact) units")

    examples = image_examples([f for f, _, _ in known])
    order = {f.id: i for i, (f, _, _) in enumerate(known)}

    def write() -> GridResult:
        return _write_grid(out, model, plan, pre_done, units, cfg, defenses, attack_names, n_known, len(facts),
                           facts_label, t0, len(known), examples, order)

    def record_pre(pre: PreMeasure) -> None:
        pre_done[pre.fact_id] = pre
        pre_log.append(pre.to_json())

    def record_unit(unit: FactResult) -> None:
        if unit.error:
            tqdm.write(f"probe-attack: {unit.defense}: fact {unit.id}: {unit.error}; skipped")
        unit_log.append(unit.to_json())
        units.append(unit)
        done_units.add((unit.defense, unit.id))

    if workers is not None or ray_address is not None:
        from .shard import run_sharded

        run_sharded(model_factory, plan, cfg, facts, known, defenses, pre_done, done_units, pre_ctx,
                    record_pre=record_pre, record_unit=record_unit, on_fact_done=write, workers=workers,
                    address=ray_address, on_dispatch=on_dispatch, model=model, owns_ray=owns_ray)
        return write()

    units_ctx = UnitContext(plan, cfg)
    result = None
    # Fact-major order, so a grid stopped early still covers every defense (on fewer facts).
    for fact, read, lens_out in tqdm(known, desc="facts (all defenses)", disable=not cfg.progress):
        todo = [d for d in defenses if (d, fact.id) not in done_units]
        if fact.id in pre_done and not todo:
            continue
        check_interrupt()
        if fact.id not in pre_done:
            record_pre(measure_pre(model, fact, read, lens_out, plan, pre_ctx, cfg))
        for dfn in todo:
            check_interrupt()
            record_unit(units_ctx.unit(model, fact, pre_done[fact.id], dfn))
        result = write()
    return result if result is not None else write()  # None: everything was already finished


class UnitContext:
    """What one (fact, defense) unit of the grid needs besides the model: the plan (after the
    known-fact filter) and the settings.
    The serial loop and every Ray worker (:mod:`.shard`) run units through :meth:`unit`, so a unit's
    result does not depend on where it runs."""

    def __init__(self, plan: Plan, cfg: GridConfig):
        self.plan, self.cfg = plan, cfg
        self.by_id = plan.by_id

    def unit(self, model, fact: Fact, pre: PreMeasure, defense: str) -> FactResult:
        """Delete ``fact`` with ``defense`` from a fresh copy of ``model`` and measure every attack
        and score (:func:`~.deletion.measure_deletion`); a failed edit comes back with ``error``."""
        cfg, plan = self.cfg, self.plan
        objective, _ = plan.defenses[defense]
        request, pools = plan.request_for(objective, fact, cfg)
        return measure_deletion(model, [fact], [pre], defense, plan, request, cfg,
                                ctx_for=lambda: attack_context(plan, [fact.id], cfg), by_id=self.by_id,
                                pools=pools)[0]


def _write_grid(out: Path, model, plan: Plan, pre: dict[str, PreMeasure], units: list[FactResult], cfg: GridConfig,
                defenses, attack_names, n_known: int, n_input: int, facts_label: str, t0: float,
                n_facts_planned: int, examples: list, order: dict[str, int]) -> GridResult:
    # fact-major, defenses in row order: the cells do not depend on the order units finished in
    row = {d: i for i, d in enumerate(defenses)}
    units = sorted(units, key=lambda u: (order.get(u.id, len(order)), row.get(u.defense, len(row))))
    ok = [u for u in units if u.error is None]
    edit_s = [u.edit.seconds for u in ok if u.edit is not None]
    done = {(u.defense, u.id) for u in units}
    res = GridResult(
        model=model.name, n_layers=model.n_layers, editor=cfg.editor, defenses=list(defenses),
        attacks=list(attack_names), cells=build_cells(plan, pre, units, model.n_layers, cfg.editor),
        per_layer=per_layer({k: p.readout for k, p in pre.items()}, [(u.defense, u.post) for u in ok],
                            model.n_layers),
        facts_file=facts_label, n_facts_input=n_input, n_known=n_known, n_facts=len(pre),
        n_facts_planned=n_facts_planned, defenses_started=sorted({u.defense for u in units}),
        complete=all((d, f) in done for d in defenses for f in pre) and len(pre) == n_facts_planned,
        mean_edit_seconds=round(sum(edit_s) / len(edit_s), 2) if edit_s else None,
        seconds_this_session=round(time.time() - t0, 1), seed=cfg.seed, image_examples=examples or None,
        calibration=calibration_meta(cfg, plan), pools=pool_summary(ok))
    if any(p.text_readout is not None for p in pre.values()):
        res.per_layer_text = per_layer({k: p.text_readout for k, p in pre.items()},
                                       [(u.defense, u.modal.text_post if u.modal else None) for u in ok],
                                       model.n_layers)
    write_text_atomic(out / GRID, res.to_json() + "\n")
    write_grid_report(res, out / REPORT)
    return res
