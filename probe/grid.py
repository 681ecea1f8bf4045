"""The attack x defense grid (``probe-attack grid``): the papers' central table.

For each selected defense (deletion objective, optimised by one editor) and each known fact, the
fact is deleted from a fresh copy of the model (one at a time, Patil, Hase & Bansal ICLR 2024
section 5), every selected attack runs on the edited model, and the deletion metrics are measured;
every attack also runs on the unedited model, so each cell shows what the edit removed.

Output folder:

* ``pre.jsonl`` -- one record per fact on the unedited model (lens readout, the other attacks'
  outcomes, probabilities and accuracies the metrics compare against);
* ``units.jsonl`` -- one record per (defense, fact): the edited model's readout, attack outcomes
  and scores (or the reason the defense failed on that fact);
* ``grid.json`` -- one record per cell (defense, attack): budget, success_pre, success_post and the
  defense's rewrite / paraphrase / neighborhood scores, Δ-Acc; rewritten after every fact (facts
  are processed one at a time through every defense, so a grid stopped early covers every
  defense on fewer facts; ``complete`` says whether every planned fact is in);
* ``report.html`` -- defense x attack heatmap, defense scores, per-layer answer rank per defense.

Records are appended (fsync'd) as each fact finishes; ``resume=True`` skips finished facts and
defenses, so a kill mid-cell recomputes only the fact that was in progress.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .facts import Fact, check_lengths
from .interrupt import check as check_interrupt
from .images import attach_images
from .pipeline import RunError, image_examples, known_facts, text_readouts
from .results import LayerReadout
from .seeds import RANDOM_ACC, fact_rng

PRE = "pre.jsonl"
UNITS = "units.jsonl"
GRID = "grid.json"
STAMP = "grid_run.json"
REPORT = "report.html"

ALL_DEFENSES = ["fact-erasure", "empty-response", "error-injection", "head-projection", "max-entropy",
                "input-rephrasing"]
DEFAULT_ATTACKS = ["head-projection", "probability-delta", "pd2", "question-rephrase", "jailbreak", "relearning"]


@dataclass
class GridConfig:
    """Settings of one grid (the CLI flags).

    Attributes:
        defenses: objective names (``all`` = the six of :data:`ALL_DEFENSES`).
        attacks: attack names (``all`` = every registered attack).
        editor, editor_config: the editor every defense uses, and its settings.
        objective_config: per defense name, settings of that objective.
        attack_config: per attack name, settings of that attack (e.g. ``{"question-rephrase":
            {"max_new_tokens": 12}}``).
        known_rank: keep facts whose answer's first token is at rank <= this at the output.
        max_facts: use at most this many known facts (evenly spaced over the file).
        retain_size, retain_similar: KL retain prompts per edit (see :mod:`defenses.retain`).
        random_n: other facts per edit for the random Δ-Acc.
        acc_tokens: greedy tokens for the accuracy metrics.
    """

    defenses: list[str] = field(default_factory=lambda: list(ALL_DEFENSES))
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    editor: str = "constrained-ft"
    editor_config: dict = field(default_factory=dict)
    objective_config: dict = field(default_factory=dict)
    attack_config: dict = field(default_factory=dict)
    known_rank: int = 1
    max_facts: int | None = None
    retain_size: int = 4
    retain_similar: float = 1.0
    random_n: int = 10
    acc_tokens: int = 8
    batch_size: int | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class Cell:
    """One (defense, attack) cell of the grid. Successes are fractions of facts (0..1)."""

    defense: str
    attack: str
    kind: str
    budget: int
    success_pre: float | None
    success_post: float | None
    n_facts: int
    rewrite_score: float | None = None
    paraphrase_score: float | None = None
    neighborhood_score: float | None = None
    neighborhood_delta_acc: float | None = None
    random_delta_acc: float | None = None
    target_rewrite_score: float | None = None
    efficacy: float | None = None
    n_failed: int = 0
    editor: str = ""
    n_skipped: int = 0


class _Log:
    """Append-only JSONL with fsync; a torn last line (kill mid-write) is dropped on open."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)


def _split_attacks(names: Sequence[str], config: dict | None = None):
    from attacks import WHITEBOX_ATTACKS, make_attack

    objs = [make_attack(n, **(config or {}).get(n, {})) for n in names]
    lens = [a for n, a in zip(names, objs) if n in WHITEBOX_ATTACKS]
    other = [a for n, a in zip(names, objs) if n not in WHITEBOX_ATTACKS]
    return lens, other


def resolve_names(names: Sequence[str] | str, kind: str) -> list[str]:
    """Expand ``all`` and validate names.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    from attacks import all_attack_names
    from defenses import OBJECTIVES

    valid = list(OBJECTIVES) if kind == "defense" else all_attack_names()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(ALL_DEFENSES) + [n for n in valid if n not in ALL_DEFENSES] if kind == "defense" else valid
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown {kind} {bad[0]!r}; valid {kind}s: {', '.join(valid)}")
    if not names:
        raise ValueError(f"no {kind}s selected; valid {kind}s: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def evaluate_state(model, facts: Sequence[Fact], lens_attacks, other_attacks, ctx) -> tuple[list[LayerReadout], list[dict]]:
    """Every attack on one model state: lens readouts (with the lens attacks' best ranks) and,
    per fact, ``{attack name: AttackOutcome json}`` of the other attacks."""
    from attacks import attack_readout

    reads = attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], lens_attacks)
    outs: list[dict] = [{} for _ in facts]
    for a in other_attacks:
        for i, o in enumerate(a.run(model, list(facts), ctx)):
            outs[i][a.name] = o.to_json()
    return reads, outs


def random_facts_for(fact: Fact, pool: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    """``n`` other facts (never ``fact``), seeded by the fact id, for the random Δ-Acc."""
    others = [g for g in pool if g.id != fact.id]
    rng = fact_rng(seed, RANDOM_ACC, fact.id)
    return rng.sample(others, min(n, len(others)))


def _lens_success(read: dict, attack, n_layers: int) -> bool:
    return read["attack_ranks"][attack.name] <= attack.k


def build_cells(pre: dict[str, dict], units: list[dict], lens_attacks, other_attacks, n_layers: int,
                editor: str) -> list[Cell]:
    """Aggregate per-fact records into cells (see :class:`Cell`)."""
    from defenses.metrics import mean

    cells = []
    by_def: dict[str, list[dict]] = {}
    for u in units:
        by_def.setdefault(u["defense"], []).append(u)
    for dfn, us in by_def.items():
        ok = [u for u in us if "error" not in u and u["fact_id"] in pre]
        sc = [u["scores"] for u in ok]
        common = dict(
            rewrite_score=mean([s.get("rewrite_score") for s in sc]),
            paraphrase_score=mean([s.get("paraphrase_score") for s in sc]),
            neighborhood_score=mean([s.get("neighborhood_score") for s in sc]),
            neighborhood_delta_acc=mean([s.get("neighborhood_delta_acc") for s in sc]),
            random_delta_acc=mean([s.get("random_delta_acc") for s in sc]),
            target_rewrite_score=mean([s.get("target_rewrite_score") for s in sc]),
            efficacy=mean([s.get("efficacy") for s in sc]),
            n_failed=len(us) - len(ok), editor=editor)
        for a in lens_attacks:
            pre_s = [_lens_success(pre[u["fact_id"]]["readout"], a, n_layers) for u in ok]
            post_s = [_lens_success(u["readout"], a, n_layers) for u in ok]
            cells.append(Cell(dfn, a.name, "whitebox", a.budget(n_layers), mean([float(x) for x in pre_s]),
                              mean([float(x) for x in post_s]), len(ok), **common))
        for a in other_attacks:
            pre_s = [pre[u["fact_id"]]["outcomes"].get(a.name) for u in ok]
            post_s = [u["outcomes"].get(a.name) for u in ok]
            skipped = sum(1 for o in pre_s if o and o.get("skipped"))
            pre_s = [o for o in pre_s if o and not o.get("skipped")]
            post_s = [o for o in post_s if o and not o.get("skipped")]
            cells.append(Cell(dfn, a.name, getattr(a, "kind", "blackbox"), a.budget(n_layers),
                              mean([float(o["success"]) for o in pre_s]),
                              mean([float(o["success"]) for o in post_s]), len(pre_s),
                              **dict(common, n_skipped=skipped)))
    return cells


def run_grid(model, facts: Sequence[Fact], out: str | Path, cfg: GridConfig, *, facts_label: str = "",
             resume: bool = False) -> dict:
    """``probe-attack grid``: every selected defense x attack on the known facts.

    Returns:
        The ``grid.json`` content (``{"cells": [...], "per_layer": {...}, ...}``).

    Raises:
        RunError: the output folder holds another grid (without ``resume``) or one with other
            settings; ValueError: unknown defense/attack/editor names.
    """
    facts = attach_images(model, facts)
    from attacks import AttackContext
    from defenses import DefenseDiverged, make_objective
    from defenses.base import editor_for
    from defenses.evaluate import (deletion_scores, fact_probs, random_accuracy, target_probs, target_scores,
                                   FactProbs)
    from defenses.retain import retain_prompts

    out = Path(out)
    defenses = resolve_names(cfg.defenses, "defense")
    attack_names = resolve_names(cfg.attacks, "attack")
    lens_attacks, other_attacks = _split_attacks(attack_names, cfg.attack_config)
    objectives = {d: make_objective(d, **cfg.objective_config.get(d, {})) for d in defenses}
    editors = {d: editor_for(obj, cfg.editor, cfg.editor_config) for d, obj in objectives.items()}
    for d, editor in editors.items():
        editor.check(model, objectives[d])
    for d, obj in objectives.items():  # validate defense layers before anything is written
        obj.layers(model.n_layers)
    facts = list(facts)
    check_lengths(model, facts)
    stamp = {"command": "grid", "model": model.name, "model_fingerprint": model.fingerprint, "facts": facts_label,
             **{k: v for k, v in asdict(cfg).items() if k not in ("progress", "defenses")},
             "editor_config_resolved": {d: e.config() for d, e in editors.items()}}
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if (out / "per_fact.jsonl").exists() or (out / "results.json").exists():
        raise RunError(f"{out}: holds a run (per_fact.jsonl), not a grid; choose another --out")
    if (out / UNITS).exists() and not resume:
        raise RunError(f"{out}: already holds a grid ({UNITS}); pass --resume to continue it or choose another --out")
    if resume and (out / STAMP).is_file():
        old = json.loads((out / STAMP).read_text())
        diff = [k for k in stamp if k != "editor_config_resolved" and old.get(k) != stamp[k]]
        if diff:
            raise RunError(f"{out / STAMP}: cannot resume, settings differ from the earlier grid in: {', '.join(diff)}")
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    # known-fact filter (one lens sweep of the unedited model)
    known, n_known = known_facts(model, facts, lens_attacks, cfg.known_rank, cfg.max_facts,
                                 batch_size=cfg.batch_size, progress=cfg.progress)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / STAMP, json.dumps(stamp, indent=2))
    evaluated = frozenset(f.id for f, _ in known)
    pre_log = _Log(out / PRE)
    unit_log = _Log(out / UNITS)
    pre_done = {r["fact_id"]: r for r in pre_log.records}

    pre_cache: dict = {}  # the unedited model's attack scratch space (e.g. attacker probes), shared

    def ctx(cache: dict | None = None) -> AttackContext:
        return AttackContext(facts=facts, deleted=evaluated, seed=cfg.seed, cache={} if cache is None else cache)

    # One fact at a time: every attack on the unedited model, then each defense from a fresh copy.
    # Fact-major order, so a grid stopped early still covers every defense (on fewer facts).
    by_id = {f.id: f for f in facts}
    done_units = {(u["defense"], u["fact_id"]) for u in unit_log.records}
    sessions: dict = {}
    result = None
    for fact, read in tqdm(known, desc="facts (all defenses)", disable=not cfg.progress):
        todo = [d for d in defenses if (d, fact.id) not in done_units]
        if fact.id in pre_done and not todo:
            continue
        check_interrupt()
        if fact.id not in pre_done:
            _, outs = evaluate_state(model, [fact], [], other_attacks, ctx(pre_cache))
            probs = fact_probs(model, [fact], max_new_tokens=cfg.acc_tokens)[0]
            rand = random_facts_for(fact, facts, cfg.random_n, cfg.seed)
            rec = {"fact_id": fact.id, "readout": asdict(read), "outcomes": outs[0], "probs": asdict(probs),
                   "random_ids": [g.id for g in rand],
                   "random_acc": random_accuracy(model, rand, max_new_tokens=cfg.acc_tokens)}
            text_read = text_readouts(model, [fact], lens_attacks)[0]
            if text_read is not None:
                rec["text_readout"] = asdict(text_read)
            pre_log.append(rec)
            pre_done[fact.id] = rec
        pre = pre_done[fact.id]
        for dfn in todo:
            check_interrupt()
            objective, editor = objectives[dfn], editors[dfn]
            if dfn not in sessions:
                sessions[dfn] = editor.session(model)
            session = sessions[dfn]
            retain = retain_prompts(fact, facts, cfg.retain_size, sim_frac=cfg.retain_similar, seed=cfg.seed)
            target = objective.target_for(fact, facts)
            t_pre = target_probs(model, fact, target) if target else None
            t_edit = time.time()
            try:
                info = editor.edit(session, objective, objective.request(fact, facts, retain))
            except (DefenseDiverged, ValueError) as exc:
                session.restore()
                tqdm.write(f"probe-attack: {dfn}: fact {fact.id}: {exc}; skipped")
                unit_log.append({"defense": dfn, "fact_id": fact.id, "error": str(exc)})
                continue
            edit_s = time.time() - t_edit
            post_reads, outs = evaluate_state(session.model, [fact], lens_attacks, other_attacks, ctx())
            text_post = text_readouts(session.model, [fact], lens_attacks)[0]
            post_probs = fact_probs(session.model, [fact], max_new_tokens=cfg.acc_tokens)[0]
            rand = [by_id[i] for i in pre["random_ids"]]
            rand_post = random_accuracy(session.model, rand, max_new_tokens=cfg.acc_tokens)
            scores = deletion_scores(FactProbs(**pre["probs"]), post_probs)
            if rand:
                scores["random_delta_acc"] = (sum(pre["random_acc"]) - sum(rand_post)) / len(rand)
            if target:
                scores.update(target_scores(t_pre, target_probs(session.model, fact, target)))
                scores["target"] = target
            scores["efficacy"] = float(post_reads[0].rank[-1] > 1)
            session.restore()
            unit = {"defense": dfn, "fact_id": fact.id, "readout": asdict(post_reads[0]), "outcomes": outs[0],
                    "scores": scores, "edit": {"steps": info.steps, "final_loss": info.losses[-1],
                                               "max_abs_change": info.max_abs_change, "seconds": round(edit_s, 2)}}
            if text_post is not None:
                unit["text_readout"] = asdict(text_post)
            unit_log.append(unit)
        result = _write_grid(out, model, pre_done, unit_log.records, lens_attacks, other_attacks, cfg, defenses,
                             attack_names, n_known, len(facts), facts_label, t0, len(known),
                             image_examples([f for f, _ in known]))
    if result is None:  # everything was already finished
        result = _write_grid(out, model, pre_done, unit_log.records, lens_attacks, other_attacks, cfg, defenses,
                             attack_names, n_known, len(facts), facts_label, t0, len(known),
                             image_examples([f for f, _ in known]))
    return result


def _per_layer(pre: dict[str, dict], units: list[dict], n_layers: int, key: str = "readout") -> dict:
    """Median answer rank per layer: unedited, and after each defense (``key="text_readout"``:
    the image facts' text-only forms)."""
    def med(reads):
        cols = list(zip(*[r["rank"] for r in reads]))
        return [sorted(c)[len(c) // 2] for c in cols] if cols else []

    out = {"layers": list(range(n_layers)), "pre": med([p[key] for p in pre.values() if key in p])}
    by_def: dict[str, list] = {}
    for u in units:
        if "error" not in u and key in u:
            by_def.setdefault(u["defense"], []).append(u[key])
    out["post"] = {d: med(rs) for d, rs in by_def.items()}
    return out


def _write_grid(out: Path, model, pre, units, lens_attacks, other_attacks, cfg: GridConfig, defenses, attack_names,
                n_known: int, n_input: int, facts_label: str, t0: float, n_facts_planned: int = 0,
                examples: list | None = None) -> dict:
    from viz.grid import write_grid_report

    cells = build_cells(pre, units, lens_attacks, other_attacks, model.n_layers, cfg.editor)
    finished = sorted({u["defense"] for u in units})
    edit_s = [u["edit"]["seconds"] for u in units if "edit" in u]
    res = {"model": model.name, "n_layers": model.n_layers, "editor": cfg.editor, "defenses": defenses,
           "attacks": attack_names, "facts_file": facts_label, "n_facts_input": n_input, "n_known": n_known,
           "n_facts": len(pre), "n_facts_planned": n_facts_planned, "defenses_started": finished,
           "complete": all((d, f) in {(u["defense"], u["fact_id"]) for u in units} for d in defenses for f in pre)
                       and len(pre) == n_facts_planned,
           "cells": [asdict(c) for c in cells], "per_layer": _per_layer(pre, units, model.n_layers),
           "mean_edit_seconds": round(sum(edit_s) / len(edit_s), 2) if edit_s else None,
           "seconds_this_session": round(time.time() - t0, 1), "seed": cfg.seed}
    if any("text_readout" in p for p in pre.values()):
        res["per_layer_text"] = _per_layer(pre, units, model.n_layers, "text_readout")
    if examples:
        res["image_examples"] = examples
    write_text_atomic(out / GRID, json.dumps(res, indent=2) + "\n")
    write_grid_report(res, out / REPORT)
    return res

