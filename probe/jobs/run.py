"""``probe-attack run`` (the main job) and ``probe-attack attack`` (attacks only).

A run: known-fact filter -> attacks before the edit -> delete (one fact at a time from a fresh copy,
the papers' protocol, or all facts in one edit) -> every attack and score after the edit ->
``results.json`` + ``per_fact.jsonl`` + ``report.html``. Each finished fact is appended to
``per_fact.jsonl`` (fsync'd) as it ends, so an interrupted run loses no finished work and
``resume=True`` continues without recomputing it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from attacks import evaluate_attacks, summarize
from defenses import DeletionRequest
from defenses.retain import pool_for
from viz.layers import causal_trace_figure
from viz.report import write_report

from ..atomic import write_text_atomic
from ..causal import trace_fact
from ..controls import control_label
from ..errors import InputError
from ..facts import Fact, check_lengths
from ..images import attach_images
from ..interrupt import check as check_interrupt
from ..results import DeletionScores, FactResult, RunResult
from .calibrate import calibration_meta
from .config import RunConfig
from .deletion import (Plan, attack_context, build_plan, check_generation_lengths, choose_job_controls, evenly_spaced,
                       image_examples, known_facts, measure_deletion, measure_pre, text_readouts)
from ..jsonl import JsonlLog, read_jsonl
from ..pool import draw, extra_facts, pool_summary
from .output import check_output, say_resumed

PER_FACT = "per_fact.jsonl"
RUN_STAMP = "run.json"
RESULTS = "results.json"
CAUSAL = "causal_traces.jsonl"
REPORT = "report.html"
PROBE_CV = "probe_cv.json"


def _stamp(model, facts_label: str, cfg, command: str) -> dict:
    d = asdict(cfg)
    d.pop("progress")
    return {"command": command, "model": model.name, "model_fingerprint": model.fingerprint,
            "facts": facts_label, **d}


def summarize_run(model, results: Sequence[FactResult], plan: Plan, defense: dict | None, meta: dict) -> RunResult:
    """The :class:`RunResult` of finished facts: one :func:`attacks.summarize` per attack (failed
    edits left out), the defense's mean scores."""

    ok = [r for r in results if r.error is None]
    deleted = defense is not None
    label = control_label(plan.controls)
    summaries = {a.name: summarize(a, model.n_layers, [r.outcomes.get(a.name, {}).get("pre") for r in ok],
                                   [r.outcomes.get(a.name, {}).get("post") for r in ok] if deleted else None,
                                   control=label)
                 for a in plan.attacks}
    if defense is not None:
        defense = {**defense, **DeletionScores.means([r.scores for r in ok if r.scores]),
                   "n_deleted": len(ok), "n_failed": len(results) - len(ok)}
    return RunResult(model=model.name, n_layers=model.n_layers, n_facts=len(ok), facts=list(ok), attacks=summaries,
                     defense=defense, meta=meta)


def probe_cv(model, plan: Plan, out: Path, cfg) -> None:
    """With a probe attack in the plan: the per-layer cross-validated accuracy of per-relation
    linear probes vs the relation prior on ``model`` (:func:`probe.probes.probe_cv_report`, at the
    attack's layers and k), written once to ``probe_cv.json`` (kept on resume) for the report."""
    from ..probes import probe_cv_report

    probes = [a for a in plan.attacks if a.readout == "probe"]
    path = out / PROBE_CV
    if not probes or path.is_file():
        return
    a = probes[0]
    try:
        rep = probe_cv_report(model, plan.pool, a.attack_layers(model.n_layers), k=a.k, seed=cfg.seed,
                              progress=cfg.progress)
    except ValueError as exc:  # too few facts per answer for any fold
        rep = {"error": str(exc)}
    write_text_atomic(path, json.dumps(rep) + "\n")


def finish(result: RunResult, out: Path) -> RunResult:
    """Write ``results.json`` and ``report.html`` (with the causal traces and the probes' CV
    accuracy, if any) atomically."""
    from viz.probe_figure import probe_cv_figure

    extra = [(f"Causal trace of fact {rec['fact_id']}: unedited vs edited model as the clean run",
              causal_trace_figure(rec["pre"], rec["post"])) for rec in read_jsonl(out / CAUSAL)]
    if (out / PROBE_CV).is_file():
        rep = json.loads((out / PROBE_CV).read_text())
        if "error" not in rep:
            extra.append(("Linear probes per relation: cross-validated accuracy per layer vs the relation prior "
                          "(the probe's control)", probe_cv_figure(rep)))
    write_text_atomic(out / RESULTS, result.to_json() + "\n")
    write_report(result, out / REPORT, extra_figures=extra)
    return result


def _load_finished(log: JsonlLog, keep: set[str]) -> dict[str, FactResult]:
    done = {}
    for rec in log.records:
        try:
            r = FactResult.from_json(rec)
        except (KeyError, TypeError):
            break
        if r.id in keep:
            done[r.id] = r
    return done


def run_attack(model, facts: Sequence[Fact], out: str | Path, cfg: RunConfig, *, facts_label: str = "",
               resume: bool = False) -> RunResult:
    """``probe-attack attack``: every selected attack on every fact, no filter, no deletion.

    The model may be one the user already edited, so facts it no longer answers are kept.
    Per-fact results are appended as each batch ends.
    """

    from ..readout import auto_batch_size
    from ..tokens import answer_ids

    out = Path(out)
    facts = attach_images(model, facts)
    plan = build_plan(model, cfg.attacks, [], cfg)
    plan.pool = list(facts)
    plan.extra = extra_facts(plan.pool)  # the model may have had every fact deleted: attackers train on none
    facts = evenly_spaced(list(facts), cfg.max_facts) if cfg.max_facts else list(facts)
    check_lengths(model, facts)
    for a in plan.attacks:
        a.check_facts(model, facts)
    choose_job_controls(model, plan, facts, None, cfg)
    stamp = _stamp(model, facts_label, cfg, "attack")
    check_output(out, "run", stamp, resume, stamp_file=RUN_STAMP, ignore=("started",),
                 defaults=asdict(type(cfg)()))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RUN_STAMP, json.dumps(stamp, indent=2))
    log = JsonlLog(out / PER_FACT)
    done = _load_finished(log, {f.id for f in facts})
    todo = [f for f in facts if f.id not in done]
    say_resumed(cfg, len(done), len(facts), "facts")
    ctx = attack_context(plan, [f.id for f in facts], cfg)
    bs = cfg.batch_size or auto_batch_size(model.n_layers, model.vocab_size)
    for start in tqdm(range(0, len(todo), bs), desc="attacks", disable=not cfg.progress):
        check_interrupt()
        chunk = todo[start:start + bs]
        reads, outs = evaluate_attacks(model, chunk, plan.attacks, ctx)
        log.append(*[FactResult(f.id, str(f.prompt), f.answer, answer_ids(model.tokenizer, f.prompt, f.answer),
                                reads["logit"][i], outcomes={a: {"pre": o[i]} for a, o in outs.items()},
                                control=_ctl(plan, f.id, "answer"), control_source=_ctl(plan, f.id, "source"),
                                relation=f.relation).to_json()
                     for i, f in enumerate(chunk)])
    finished = _load_finished(log, {f.id for f in facts})
    ordered = [finished[f.id] for f in facts if f.id in finished]
    probe_cv(model, plan, out, cfg)
    return finish(summarize_run(model, ordered, plan, None, {"command": "attack", "facts_file": facts_label}), out)


def _ctl(plan: Plan, fact_id: str, attr: str):
    c = plan.controls.get(fact_id)
    return getattr(c, attr) if c else None


def run_main(model, facts: Sequence[Fact], out: str | Path, cfg: RunConfig, *, facts_label: str = "",
             resume: bool = False) -> RunResult:
    """``probe-attack run``: the main job.

    1. known-fact filter (``cfg.known``: rank or the text paper's reference rule) on the unedited
       model, the kept facts' control answers (:mod:`probe.controls`), the lens attacks on both;
    2. every attack and the reference measurements on the unedited model (:func:`measure_pre`);
    3. delete with ``cfg.defense`` through ``cfg.editor`` -- one fact at a time from a fresh copy
       (the papers' protocol) or all facts at once -- and measure every attack and score on the
       edited model (:func:`measure_deletion`); results appended per fact;
    4. ``results.json`` + ``report.html``.

    Raises:
        RunError: the output folder holds another run; ValueError: unknown defense/attack/editor;
        InputError: a setting that does not fit the model.
    """
    out = Path(out)
    if cfg.protocol not in ("one-at-a-time", "all-at-once"):
        raise InputError(f"unknown protocol {cfg.protocol!r}; use one-at-a-time or all-at-once", field="protocol")
    facts = list(attach_images(model, facts))
    plan = build_plan(model, cfg.attacks, [cfg.defense], cfg, protocol=cfg.protocol)
    plan.pool, plan.extra = facts, extra_facts(facts)
    check_lengths(model, facts)
    stamp = _stamp(model, facts_label, cfg, "run")
    check_output(out, "run", stamp, resume, stamp_file=RUN_STAMP, ignore=("started",),
                 defaults=asdict(type(cfg)()))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    pre_ctx = attack_context(plan, [], cfg)
    known, n_known = known_facts(model, facts, plan, cfg, pre_ctx, progress=cfg.progress,
                                 desc="known-fact filter")
    evaluated = [f.id for f, _, _ in known]
    check_generation_lengths(model, [f for f, _, _ in known], cfg.gen_tokens)
    # The unedited model's scratch space, shared by every fact. One at a time, a fact's attackers may
    # train on every other fact of the file (leave-one-out: each attack leaves out the fact it
    # attacks); all at once, never on a fact the edit deletes.
    one = cfg.protocol == "one-at-a-time"
    pre_ctx.deleted = frozenset() if one else frozenset(evaluated)
    embed_std = causal_setup(model, [f for f, _, _ in known], cfg.causal_traces)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RUN_STAMP, json.dumps(stamp, indent=2))
    log = JsonlLog(out / PER_FACT)
    done = _load_finished(log, set(evaluated))
    todo = [k for k in known if k[0].id not in done]
    say_resumed(cfg, len(done), len(known), "facts")
    causal_log = JsonlLog(out / CAUSAL) if cfg.causal_traces else None
    n_traced = [len(causal_log.records) if causal_log and resume else 0]

    def trace(edited, fact):
        if causal_log is not None and n_traced[0] < cfg.causal_traces:
            causal_log.append(trace_fact(model, edited, fact, embed_std, seed=cfg.seed))
            n_traced[0] += 1

    def ctx_post(fact=None):
        return attack_context(plan, [fact.id] if fact is not None else evaluated, cfg)

    objective, _ = plan.defenses[cfg.defense]
    if one:
        for fact, read, lens_out in tqdm(todo, desc=f"{cfg.defense} (per fact)", disable=not cfg.progress):
            check_interrupt()
            pre = measure_pre(model, fact, read, lens_out, plan, pre_ctx, cfg)
            request, pools = plan.request_for(objective, fact, cfg)
            res = measure_deletion(model, [fact], [pre], cfg.defense, plan, request, cfg,
                                   ctx_for=lambda: ctx_post(fact), during_edit=trace, pools=pools)[0]
            if res.error:
                tqdm.write(f"probe-attack: fact {fact.id}: {res.error}; recorded as failed")
            log.append(res.to_json())
    elif todo:
        pres = [measure_pre(model, f, r, lo, plan, pre_ctx, cfg) for f, r, lo in todo]
        req_facts = [f for f, _, _ in todo]
        request = all_at_once_request(objective, req_facts, plan, set(evaluated), cfg)
        log.append(*[r.to_json() for r in measure_deletion(model, req_facts, pres, cfg.defense, plan, request, cfg,
                                                          ctx_for=ctx_post, during_edit=trace)])

    finished = _load_finished(log, set(evaluated))
    ordered = [finished[i] for i in evaluated if i in finished]
    probe_cv(model, plan, out, cfg)
    _, editor = plan.defenses[cfg.defense]
    defense = {"name": cfg.defense, "editor": cfg.editor, "editor_config": editor.config(),
               "edit_parameter": editor.param_name(model), "protocol": cfg.protocol}
    meta = {"command": "run", "facts_file": facts_label, "n_facts_input": len(facts),
            "known_filter": {"rule": cfg.known, "max_rank": cfg.known_rank, "n_known": n_known, "n_used": len(known),
                             "n_never_known": len(plan.unknown)},
            "controls": control_label(plan.controls), "seed": cfg.seed,
            "calibration": calibration_meta(cfg, plan), "pools": pool_summary(ordered),
            "seconds": round(time.time() - t0, 1), "files": {"per_fact": PER_FACT, "report": REPORT},
            "image_examples": image_examples([f for f, _, _ in known])}
    return finish(summarize_run(model, ordered, plan, defense, meta), out)


def all_at_once_request(objective, req_facts: Sequence[Fact], plan: Plan, evaluated: set[str], cfg):
    """One :class:`~defenses.base.DeletionRequest` deleting every fact of ``req_facts`` in one edit;
    retain prompts: ``retain_size`` prompts of facts that are not evaluated and leak none of the
    deleted facts (:meth:`defenses.retain.RetainPool.leak_free_all`), drawn with the run's seed
    from the file's facts, topped up from the built-in facts (``plan.extra``) when the file has
    too few; targets from each fact's pool (:meth:`~.deletion.Plan.target_pool`)."""

    rng = random.Random(cfg.seed)
    facts = [*plan.pool, *plan.extra]
    free = set(pool_for(facts).leak_free_all(req_facts))
    file_p = sorted({g.prompt for g in plan.pool if g.id not in evaluated} & free)
    extra_p = sorted({g.prompt for g in plan.extra} & free - set(file_p))
    retain, _ = draw(file_p, extra_p, cfg.retain_size, rng)
    reqs = [objective.request(f, plan.target_pool(f)[0], []) for f in req_facts]
    return DeletionRequest(
        [p for r in reqs for p in r.prompts], [a for r in reqs for a in r.answers], retain,
        targets=[t for r in reqs for t in r.targets] if reqs[0].targets is not None else None,
        subjects=[s for r in reqs for s in (r.subjects or [None] * len(r.prompts))])


def causal_setup(model, known: Sequence[Fact], n: int) -> float | None:
    """Before anything is written: check that the first ``n`` facts to delete can be traced (each
    has a ``subject``, or an image fact an ``entity`` in its text form) and return the noise unit,
    the std of the subject-token embeddings over every known fact that has one (ROME, section
    2.1); None when ``n == 0``.

    Raises:
        InputError: a fact to trace has no subject (file, line, field ``subject``).
    """
    from ..causal import subject_embedding_std, trace_input

    if not n:
        return None
    traceable = []
    for i, f in enumerate(known):
        try:
            trace_input(f)
        except InputError:
            if i < n:
                raise
            continue
        traceable.append(f)
    return subject_embedding_std(model, traceable)


__all__ = ["run_main", "run_attack", "summarize_run", "finish", "causal_setup", "text_readouts", "PER_FACT",
           "RUN_STAMP", "RESULTS", "CAUSAL", "REPORT"]
