"""``probe-attack calibrate``: compare defenses at matched damage.

Each deletion objective reaches its purpose at a different edit size (fact erasure needs a
smaller constrained-FT bound than making "I don't know" likely), so a grid run at one fixed
setting compares edit sizes as much as objectives. Calibration chooses, for each objective and
editor, the *strongest* setting of the editor's :attr:`~defenses.editor.Editor.calibration_ladder`
(weakest first: norm bound and learning rate for constrained FT, rank and steps for LoRA, v* steps
and clamp for ROME) whose **damage** on held-out calibration facts stays within a target:

* the mean neighborhood score (method.md section 5) >= ``min_neighborhood`` (default 0.9), and
* the mean retention drop -- first-token top-1 accuracy lost on every other fact the unedited
  model knows (:attr:`probe.results.DeletionScores.retention_drop`) -- <= ``max_retention_drop``
  (default 0.02).

Rungs are measured weakest first with the one deletion unit of every job
(:func:`probe.jobs.deletion.measure_deletion`: the same retain prompts, edit and scores as ``run``
and ``grid``), and the search stops at the first rung that breaks the target (damage grows with
the rung; the rungs after it are not measured). When even the ladder's weakest rung breaks it,
editors that have weaker settings (:meth:`~defenses.editor.Editor.calibration_weaker`;
constrained FT: bound and lr halved; LoRA: lr halved; ROME: clamp halved; up to 4 times) are measured below the ladder until one meets
the target; if none does, the weakest measured is chosen and marked ``met = False``. Rungs are
listed weakest first.

Calibration facts are known facts with neighborhood prompts of the calibration file (default: the
built-in facts), evenly spaced at the midpoints of ``n_facts`` intervals; ``run`` and ``grid`` leave them out of their
evaluation facts (by prompt and answer), so calibration and evaluation are disjoint.

The result is cached per model fingerprint and editor in ``cache_dir()/calibration/`` (with the
per-unit log, so an interrupted calibration resumes), and the package ships calibrations of the
embedded models in ``probe/data/calibration/``; :func:`load_calibration` finds either, and ``run``
/ ``grid`` use it by default (``--calibration none`` turns it off; explicit editor flags override
it).

This is our addition: the papers tune each defense separately (method.md section 4.2).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from defenses import make_objective
from defenses.base import EDITORS, editor_for
from defenses.metrics import mean

from ..atomic import write_text_atomic
from ..facts import Fact
from ..interrupt import check as check_interrupt
from ..jsonl import JsonlLog
from ..pool import extra_facts
from .config import ALL_DEFENSES, JobConfig
from .deletion import attack_context, build_plan, fact_key, known_facts, measure_deletion, measure_pre

#: Default damage target: mean neighborhood score at least this ...
MIN_NEIGHBORHOOD = 0.9
#: ... and mean retention drop at most this (fraction of the other known facts).
MAX_RETENTION_DROP = 0.02
#: Calibration facts per objective and rung by default.
N_FACTS = 8
#: Calibrations shipped with the package (the embedded models).
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "calibration"


@dataclass
class Rung:
    """One measured setting: the editor settings and the means over the calibration facts.

    Attributes:
        settings: the editor settings of this rung (merged over the objective's defaults).
        n: facts edited without failure; ``n_failed``: edits that failed.
        neighborhood, retention_drop, random_delta_acc: damage (means; see
            :class:`probe.results.DeletionScores`).
        efficacy, rewrite, target_rewrite: purpose (means; target_rewrite for target objectives).
        hp_success: head-projection attack success@B after the edit (fraction of facts).
        rejected_steps: total optimisation steps the editor rejected over the facts.
        met: the rung meets the damage target.
    """

    settings: dict
    n: int = 0
    n_failed: int = 0
    neighborhood: float | None = None
    retention_drop: float | None = None
    random_delta_acc: float | None = None
    efficacy: float | None = None
    rewrite: float | None = None
    target_rewrite: float | None = None
    hp_success: float | None = None
    rejected_steps: int = 0
    met: bool = False


@dataclass
class ObjectiveCalibration:
    """The chosen setting of one objective (``settings``), whether it meets the target, and every
    rung measured (weakest first)."""

    settings: dict
    met: bool
    rungs: list[Rung] = field(default_factory=list)


@dataclass
class Calibration:
    """A calibration of one model and editor (``calibration.json``).

    Attributes:
        model, fingerprint, editor: what was calibrated.
        min_neighborhood, max_retention_drop: the damage target.
        facts: ``[[prompt, answer], ...]`` of the calibration facts (left out of evaluations).
        facts_file: where they came from.
        objectives: objective name -> :class:`ObjectiveCalibration`.
        complete: every objective was calibrated (False while a calibration is interrupted).
    """

    model: str
    fingerprint: str
    editor: str
    min_neighborhood: float
    max_retention_drop: float
    facts: list[list[str]]
    facts_file: str
    objectives: dict[str, ObjectiveCalibration] = field(default_factory=dict)
    complete: bool = False
    created: str = ""

    def settings(self) -> dict[str, dict]:
        """Objective name -> chosen editor settings (what ``run`` and ``grid`` use)."""
        return {k: dict(v.settings) for k, v in self.objectives.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a ``calibration.json``. Raises FileNotFoundError, ValueError (not a calibration)."""
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            objs = {k: ObjectiveCalibration(v["settings"], v["met"], [Rung(**r) for r in v.get("rungs", [])])
                    for k, v in d.pop("objectives").items()}
            return cls(**d, objectives=objs)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a probe-attack calibration ({exc})") from None

    def job_record(self, source: str) -> dict:
        """What a job's config records and uses: source, target, settings, calibration facts."""
        return {"source": source, "editor": self.editor, "min_neighborhood": self.min_neighborhood,
                "max_retention_drop": self.max_retention_drop, "settings": self.settings(),
                "met": {k: v.met for k, v in self.objectives.items()}, "facts": self.facts}


def calibration_meta(cfg, plan) -> dict | None:
    """What a job's results record about its calibration (None: none in use): the
    :meth:`Calibration.job_record` without the fact list, plus how many calibration facts there are
    and how many known facts were left out of the evaluation as calibration facts."""
    cal = cfg.calibration or {}
    if not cal:
        return None
    return {k: v for k, v in cal.items() if k != "facts"} | {"n_facts": len(cal.get("facts", [])),
                                                             "n_excluded": plan.n_calibration_excluded}


def calibration_dir(model, editor: str) -> Path:
    """``cache_dir()/calibration/<fingerprint>-<editor>/`` (calibration.json + units.jsonl)."""
    from ..model import cache_dir

    return cache_dir() / "calibration" / f"{model.fingerprint}-{editor}"


def load_calibration(model, editor: str) -> tuple[Calibration, str] | None:
    """The complete calibration of ``model`` (by fingerprint) and ``editor``: the user's cache
    first, then the package's shipped ones; ``(calibration, path)`` or None."""
    for path in (calibration_dir(model, editor) / "calibration.json",
                 SHIPPED / f"{model.fingerprint}-{editor}.json"):
        if path.is_file():
            cal = Calibration.load(path)
            if cal.complete and cal.fingerprint == model.fingerprint and cal.editor == editor:
                return cal, str(path)
    return None


def calibration_facts(items: Sequence, n: int) -> list:
    """``n`` items at the midpoints of ``n`` equal intervals of ``items`` (all when ``n >= len``):
    disjoint from :func:`~probe.jobs.deletion.evenly_spaced`'s picks whenever ``len(items) >= 2n``."""
    if n >= len(items):
        return list(items)
    return [items[((2 * i + 1) * len(items)) // (2 * n)] for i in range(n)]


@dataclass
class CalibrateConfig(JobConfig):
    """``probe-attack calibrate``: the objectives, the calibration facts and the damage target."""

    objectives: list[str] = field(default_factory=lambda: list(ALL_DEFENSES))
    n_facts: int = N_FACTS
    min_neighborhood: float = MIN_NEIGHBORHOOD
    max_retention_drop: float = MAX_RETENTION_DROP
    attacks: list[str] = field(default_factory=lambda: ["head-projection"])
    random_n: int = 0
    gen_tokens: int = 0


def _rung_summary(settings: dict, units) -> Rung:
    ok = [u for u in units if u.error is None and u.scores is not None]
    hp = [u.outcomes.get("head-projection", {}).get("post") for u in ok]
    hp = [o.success for o in hp if o is not None and o.skipped is None]
    return Rung(settings=settings, n=len(ok), n_failed=len(units) - len(ok),
                neighborhood=mean([u.scores.neighborhood_score for u in ok]),
                retention_drop=mean([getattr(u.scores, "retention_drop", None) for u in ok]),
                random_delta_acc=mean([u.scores.random_delta_acc for u in ok]),
                efficacy=mean([u.scores.efficacy for u in ok]),
                rewrite=mean([u.scores.rewrite_score for u in ok]),
                target_rewrite=mean([u.scores.target_rewrite_score for u in ok]),
                hp_success=mean([float(s) for s in hp]),
                rejected_steps=sum(len((u.edit.extra or {}).get("rejected_steps", [])) for u in ok if u.edit))


def meets(rung: Rung, cfg: CalibrateConfig) -> bool:
    """The damage target: every fact edited, neighborhood >= the minimum, retention drop <= the
    maximum (a metric that could not be measured counts as not met)."""
    return (rung.n > 0 and rung.n_failed == 0 and rung.neighborhood is not None
            and rung.neighborhood >= cfg.min_neighborhood and rung.retention_drop is not None
            and rung.retention_drop <= cfg.max_retention_drop)


def calibrate(model, facts: Sequence[Fact], cfg: CalibrateConfig, *, facts_label: str = "built-in",
              out: str | Path | None = None) -> Calibration:
    """Calibrate every objective of ``cfg.objectives`` for ``cfg.editor`` on ``model`` (see the
    module docstring); writes ``calibration.json`` and the unit log ``units.jsonl`` in ``out``
    (default :func:`calibration_dir`) and resumes from that log.

    Raises:
        ValueError: unknown objective or editor, or an editor without a calibration ladder;
        RunError: no fact of ``facts`` is known by the model.
    """
    from ..results import FactResult
    from .output import RunError

    if cfg.editor not in EDITORS:
        raise ValueError(f"unknown editor {cfg.editor!r}; valid editors: {', '.join(EDITORS)}")
    ladder = list(EDITORS[cfg.editor].calibration_ladder)
    if not ladder:
        raise ValueError(f"editor {cfg.editor} has no calibration ladder")
    out = Path(out) if out is not None else calibration_dir(model, cfg.editor)
    plan = build_plan(model, cfg.attacks, [], cfg)
    plan.pool, plan.extra = list(facts), extra_facts(facts)
    ctx = attack_context(plan, [], cfg)
    known, _ = known_facts(model, facts, plan, cfg, ctx, progress=cfg.progress, desc="known-fact filter")
    chosen = calibration_facts([k for k in known if k[0].neighborhood], cfg.n_facts)
    if not chosen:
        raise RunError(f"none of the {len(known)} known facts has neighborhood prompts to measure damage on")
    ctx.deleted = frozenset(f.id for f, _, _ in chosen)
    cal = Calibration(model.name, model.fingerprint, cfg.editor, cfg.min_neighborhood, cfg.max_retention_drop,
                      [list(fact_key(f)) for f, _, _ in chosen], facts_label, created=time.strftime("%Y-%m-%d %H:%M"))
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "units.jsonl")
    done = {(r["objective"], json.dumps(r["settings"], sort_keys=True), r["unit"]["id"]): FactResult.from_json(r["unit"])
            for r in log.records}
    pres = {}
    for obj_name in cfg.objectives:
        objective = make_objective(obj_name, **cfg.objective_config.get(obj_name, {}))
        rungs: list[Rung] = []

        def measure(rung: dict) -> Rung:
            editor = editor_for(objective, cfg.editor, {**rung, **cfg.editor_config})
            editor.check(model, objective)
            editor.check_facts([f for f, _, _ in chosen])
            settings = {k: getattr(editor, k) for k in sorted({*rung, *cfg.editor_config})}
            key = json.dumps(settings, sort_keys=True)
            rplan = dataclasses.replace(plan, defenses={obj_name: (objective, editor)})
            units = []
            for fact, read, lens_out in tqdm(chosen, desc=f"{obj_name} {settings}", disable=not cfg.progress):
                check_interrupt()
                if (obj_name, key, fact.id) in done:
                    units.append(done[(obj_name, key, fact.id)])
                    continue
                if fact.id not in pres:
                    pres[fact.id] = measure_pre(model, fact, read, lens_out, rplan, ctx, cfg)
                request, pools = rplan.request_for(objective, fact, cfg)
                unit = measure_deletion(model, [fact], [pres[fact.id]], obj_name, rplan, request, cfg,
                                        ctx_for=lambda: attack_context(rplan, ctx.deleted, cfg), pools=pools)[0]
                log.append({"objective": obj_name, "settings": settings, "unit": unit.to_json()})
                units.append(unit)
            r = _rung_summary(settings, units)
            r.met = meets(r, cfg)
            return r

        for rung in ladder:  # weakest up; stop at the first rung that breaks the target
            rungs.append(measure(rung))
            if not rungs[-1].met:
                break
        below, weakest = 0, ladder[0]
        while not rungs[0].met and below < EDITORS[cfg.editor].calibration_max_descent:
            # even the ladder's weakest rung breaks the target: step below it until one meets it
            weakest = EDITORS[cfg.editor].calibration_weaker(weakest)
            if weakest is None:
                break
            rungs.insert(0, measure(weakest))
            below += 1
        passing = [r for r in rungs if r.met]
        best = passing[-1] if passing else rungs[0]
        cal.objectives[obj_name] = ObjectiveCalibration(best.settings, bool(passing), rungs)
        write_text_atomic(out / "calibration.json", cal.to_json() + "\n")
    cal.complete = True
    write_text_atomic(out / "calibration.json", cal.to_json() + "\n")
    return cal


def format_calibration(cal: Calibration) -> str:
    """The calibration table: per objective, every rung measured (chosen one marked ``*``)."""
    lines = [f"calibration of {cal.model} ({cal.fingerprint}), editor {cal.editor}: target neighborhood >= "
             f"{cal.min_neighborhood}, retention drop <= {cal.max_retention_drop}; {len(cal.facts)} calibration facts",
             f"{'objective':<17} {'settings':<44} {'nbhd':>6} {'ret.drop':>8} {'effic.':>6} {'rewrite':>7} "
             f"{'HP post':>7} {'rej':>4}"]

    def f(x, w=6):
        return f"{x:>{w}.3f}" if x is not None else f"{'-':>{w}}"

    for name, oc in cal.objectives.items():
        for r in oc.rungs:
            mark = "*" if r.settings == oc.settings else (" " if r.met else "x")
            rew = r.target_rewrite if r.target_rewrite is not None else r.rewrite
            s = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.settings.items())
            lines.append(f"{name:<17}{mark}{s:<44} {f(r.neighborhood)} {f(r.retention_drop, 8)} {f(r.efficacy)} "
                         f"{f(rew, 7)} {f(r.hp_success, 7)} {r.rejected_steps:>4}")
        if not oc.met:
            lines.append(f"{'':<17} (no setting meets the target: the weakest is used)")
    return "\n".join(lines)
