"""The main job: facts -> known-fact filter -> attacks before -> deletion -> attacks and metrics after.

This module (with :mod:`probe.cli`) is where :mod:`attacks` and :mod:`defenses` meet; the rest of
:mod:`probe` knows nothing about either. Results are appended to ``per_fact.jsonl`` as each fact
(or batch) finishes, so an interrupted run loses no finished work and ``resume=True`` continues
without recomputing it; ``results.json`` and ``report.html`` are written atomically at the end.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .images import attach_images
from .atomic import write_text_atomic
from .errors import InputError, ProbeAttackError
from .interrupt import check as check_interrupt
from .facts import Fact, check_lengths
from .readout import auto_batch_size, teacher_forced_inputs
from .results import FactResult, LayerReadout, RunResult

PER_FACT = "per_fact.jsonl"
RUN_STAMP = "run.json"
RESULTS = "results.json"
CAUSAL = "causal_traces.jsonl"
REPORT = "report.html"


@dataclass
class RunConfig:
    """Settings of one run (the CLI flags). Defaults follow the papers where they apply."""

    attacks: list[str] = field(default_factory=lambda: ["head-projection", "probability-delta", "pd2"])
    defense: str = "fact-erasure"
    editor: str = "constrained-ft"
    editor_config: dict = field(default_factory=dict)
    protocol: str = "one-at-a-time"
    known_rank: int = 1
    max_facts: int | None = None
    retain_size: int = 4
    retain_similar: float = 1.0
    acc_tokens: int = 8
    batch_size: int | None = None
    seed: int = 0
    progress: bool = True
    causal_traces: int = 0
    attack_config: dict = field(default_factory=dict)


class RunError(ProbeAttackError):
    """A run cannot start (e.g. an output folder that already holds another run)."""


# ----------------------------------------------------------------------------------------
# output folder


def read_finished(path: Path) -> dict[str, FactResult]:
    """Finished facts from a ``per_fact.jsonl`` (a torn last line from a kill is ignored)."""
    done: dict[str, FactResult] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write
            try:
                rec = FactResult.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError, KeyError):
                break
            done[rec.id] = rec
    return done


class _Appender:
    """Appends records to ``per_fact.jsonl``, fsync'd, after truncating any torn tail."""

    def __init__(self, path: Path, keep: dict[str, FactResult]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # rewrite the intact prefix so a torn line from an earlier kill is dropped
        write_text_atomic(path, "".join(json.dumps(r.to_json()) + "\n" for r in keep.values()))

    def append(self, records: Sequence[FactResult]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _prepare_out(out: Path, stamp: dict, resume: bool) -> dict[str, FactResult]:
    per_fact = out / PER_FACT
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if (out / "units.jsonl").exists() or (out / "grid.json").exists():
        raise RunError(f"{out}: holds a grid (units.jsonl); choose another --out")
    if per_fact.exists() and not resume:
        raise RunError(f"{out}: already holds results ({PER_FACT}); pass --resume to continue that run "
                       "or choose another --out")
    if resume and (out / RUN_STAMP).is_file():
        old = json.loads((out / RUN_STAMP).read_text())
        diff = [k for k in stamp if k != "started" and old.get(k) != stamp[k]]
        if diff:
            raise RunError(f"{out / RUN_STAMP}: cannot resume, settings differ from the earlier run in: "
                           f"{', '.join(diff)}")
    return read_finished(per_fact) if resume else {}


# ----------------------------------------------------------------------------------------
# the jobs


def evenly_spaced(items: list, n: int) -> list:
    """At most ``n`` items spread evenly over ``items`` (keeps order; all of them if ``n >= len``),
    so a subset of a file sorted by relation still covers every relation."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _causal(model, edited, fact: Fact, out: Path) -> None:
    """Causal traces of one fact (Meng et al. 2022, section 2.1) with the unedited and with the
    edited model as the clean run, appended to ``causal_traces.jsonl``. Facts without a subject
    corrupt the first half of the prompt's tokens (documented in the record)."""
    from .causal import causal_trace
    from .tokens import tokenize

    prompt, subject, corrupted = fact.prompt, fact.subject, None
    if text_form(fact) is not None:
        # image facts: the trace runs on the fact's text form, corrupting the named entity (the
        # image itself is not corrupted -- that would need noise on the projector output)
        prompt = text_form(fact)
        entity = getattr(fact, "entity", None)
        subject = entity if entity and entity in prompt else None
        corrupted = (f"entity {entity!r} in the text form (image facts are traced without the image)" if subject
                     else "first half of the text form (image facts are traced without the image)")
    kw: dict = {"subject": subject} if subject else {
        "subject_positions": list(range(max(1, len(tokenize(model.tokenizer, prompt)) // 2)))}
    pre = causal_trace(model, prompt, fact.answer, **kw)
    post = causal_trace(model, prompt, fact.answer, clean_model=edited, **kw)
    rec = {"fact_id": fact.id,
           "corrupted": corrupted or ("subject" if fact.subject else "first half of the prompt"),
           "pre": pre.to_json(), "post": post.to_json()}
    with open(out / CAUSAL, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def text_form(fact) -> str | None:
    """The text-only form of an image fact (its ``text_prompt`` naming the entity, else the
    prompt's text without the image), or None for a text fact."""
    from .images import ImagePrompt, plain_text

    if not isinstance(fact.prompt, ImagePrompt):
        return None
    return getattr(fact, "text_prompt", None) or plain_text(fact.prompt)


def text_readouts(model, facts: Sequence[Fact], lens_attacks, *, batch_size: int | None = None) -> list:
    """Lens readouts of the facts' text-only forms (None for text facts): the same question
    without the image, for the per-layer "with vs without the image" comparison."""
    from attacks import attack_readout

    idx = [i for i, f in enumerate(facts) if text_form(f) is not None]
    out: list = [None] * len(facts)
    if idx:
        reads = attack_readout(model, [text_form(facts[i]) for i in idx], [facts[i].answer for i in idx],
                               lens_attacks, batch_size=batch_size)
        for i, r in zip(idx, reads):
            out[i] = r
    return out


def image_examples(facts: Sequence[Fact], n: int = 4) -> list[dict]:
    """Up to ``n`` image facts as plain data for the report's example images."""
    out = []
    for f in facts:
        if getattr(f, "image", None) and len(out) < n:
            out.append({"fact_id": f.id, "prompt": str(f.prompt), "answer": f.answer, "image": f.image,
                        "image_paraphrases": dict(getattr(f, "image_paraphrases", None) or {}),
                        "neighborhood_images": list(getattr(f, "neighborhood_images", None) or [])})
    return out


def known_facts(model, facts: Sequence[Fact], lens_attacks, known_rank: int, max_facts: int | None, *,
                batch_size: int | None = None, progress: bool = False,
                desc: str = "known-fact filter") -> tuple[list[tuple[Fact, LayerReadout]], int]:
    """The known-fact filter: one lens sweep of the unedited model (scoring ``lens_attacks``),
    keeping facts whose answer's first token is at rank <= ``known_rank`` at the output, then at
    most ``max_facts`` of them, evenly spaced.

    Returns:
        ``([(fact, readout), ...], number of known facts before max_facts)``.

    Raises:
        RunError: no fact is known.
    """
    from attacks import attack_readout

    reads = attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], lens_attacks,
                           batch_size=batch_size, progress=progress, desc=desc)
    known = [(f, r) for f, r in zip(facts, reads) if r.rank[-1] <= known_rank]
    n_known = len(known)
    if max_facts:
        known = evenly_spaced(known, max_facts)
    if not known:
        raise RunError(f"none of the {len(facts)} facts is known by the model (answer's first token at rank "
                       f"<= {known_rank}); nothing to delete")
    return known, n_known


def _attacks(names: Sequence[str], config: dict | None = None):
    """Logit-lens attacks (scored from one lens sweep) and the other registered attacks."""
    from attacks import WHITEBOX_ATTACKS, make_attack

    objs = [make_attack(n, **(config or {}).get(n, {})) for n in names]
    return ([a for n, a in zip(names, objs) if n in WHITEBOX_ATTACKS],
            [a for n, a in zip(names, objs) if n not in WHITEBOX_ATTACKS])


def _other_outcomes(model, facts: Sequence[Fact], others, all_facts, deleted, seed: int,
                    cache: dict | None = None) -> list[dict]:
    """Outcomes of the non-lens attacks on one model state. ``cache`` is that state's scratch
    space (pass the same dict for every call on the same state, e.g. the unedited model, so
    attacker-trained probes are trained once; a fresh one per edited state)."""
    from attacks import AttackContext

    outs: list[dict] = [{} for _ in facts]
    ctx = AttackContext(facts=list(all_facts), deleted=frozenset(deleted), seed=seed,
                        cache={} if cache is None else cache)
    for a in others:
        for i, o in enumerate(a.run(model, list(facts), ctx)):
            outs[i][a.name] = o.to_json()
    return outs


def _summarize_others(others, n_layers: int, facts_results: list[FactResult]) -> dict[str, dict]:
    out = {}
    for a in others:
        pre = [f.outcomes[a.name]["pre"] for f in facts_results if f.outcomes and a.name in f.outcomes]
        post = [f.outcomes[a.name].get("post") for f in facts_results if f.outcomes and a.name in f.outcomes]
        post = [o for o in post if o]
        n_skipped = sum(1 for o in pre if o.get("skipped"))
        pre = [o for o in pre if not o.get("skipped")]
        post = [o for o in post if not o.get("skipped")]
        out[a.name] = {"name": a.name, "kind": getattr(a, "kind", "blackbox"), "budget": a.budget(n_layers),
                       "success_pre": sum(o["success"] for o in pre) / len(pre) if pre else None,
                       "success_post": sum(o["success"] for o in post) / len(post) if post else None,
                       "n_facts": len(pre), "n_skipped": n_skipped}
    return out


def _stamp(model, facts_label: str, cfg: RunConfig, command: str) -> dict:
    d = asdict(cfg)
    d.pop("progress")
    return {"command": command, "model": model.name, "model_fingerprint": model.fingerprint,
            "facts": facts_label, **d}


def _summarize(model, facts_results: list[FactResult], attack_objs, defense: dict | None, meta: dict,
               others=()) -> RunResult:
    from attacks import summarize_attacks

    pre = [f.pre for f in facts_results]
    post = [f.post for f in facts_results] if facts_results and all(f.post for f in facts_results) else None
    summaries = summarize_attacks(attack_objs, model.n_layers, pre, post)
    return RunResult(model=model.name, n_layers=model.n_layers, n_facts=len(facts_results), facts=facts_results,
                     attacks=summaries, defense=defense, meta=meta,
                     other_attacks=_summarize_others(others, model.n_layers, facts_results))


def _finish(result: RunResult, out: Path) -> RunResult:
    from viz.report import write_report

    extra = []
    if (out / CAUSAL).is_file():
        from viz.layers import causal_trace_figure

        for line in (out / CAUSAL).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn last line of an interrupted run
            extra.append((f"Causal trace of fact {rec['fact_id']}: unedited vs edited model as the clean run",
                          causal_trace_figure(rec["pre"], rec["post"])))
    write_text_atomic(out / RESULTS, result.to_json() + "\n")
    write_report(result, out / REPORT, extra_figures=extra)
    return result


def run_attack(model, facts: Sequence[Fact], out: str | Path, cfg: RunConfig, *, facts_label: str = "",
               resume: bool = False) -> RunResult:
    """``probe-attack attack``: whitebox attacks on every fact, no filter, no deletion.

    The model may be one the user already edited, so facts it no longer answers are kept.
    Per-fact results are appended as each batch ends.
    """
    out = Path(out)
    attack_objs, others = _attacks(cfg.attacks, cfg.attack_config)
    facts = attach_images(model, facts)
    all_facts = list(facts)
    facts = evenly_spaced(list(facts), cfg.max_facts) if cfg.max_facts else list(facts)
    check_lengths(model, facts)
    stamp = _stamp(model, facts_label, cfg, "attack")
    done = _prepare_out(out, stamp, resume)
    write_text_atomic(out / RUN_STAMP, json.dumps(stamp, indent=2))
    appender = _Appender(out / PER_FACT, {k: v for k, v in done.items() if k in {f.id for f in facts}})
    todo = [f for f in facts if f.id not in done]
    from attacks import attack_readout

    bs = cfg.batch_size or auto_batch_size(model.n_layers, model.vocab_size)
    for start in tqdm(range(0, len(todo), bs), desc="attacks", disable=not cfg.progress):
        check_interrupt()
        chunk = todo[start:start + bs]
        reads = attack_readout(model, [f.prompt for f in chunk], [f.answer for f in chunk], attack_objs,
                               batch_size=bs)
        _, a_ids, _ = teacher_forced_inputs(model.tokenizer, [f.prompt for f in chunk], [f.answer for f in chunk])
        outs = _other_outcomes(model, chunk, others, all_facts, [f.id for f in facts], cfg.seed) if others else None
        appender.append([FactResult(f.id, str(f.prompt), f.answer, a, r,
                                    outcomes={k: {"pre": v} for k, v in outs[i].items()} if outs else None)
                         for i, (f, a, r) in enumerate(zip(chunk, a_ids, reads))])
    results = read_finished(out / PER_FACT)
    ordered = [results[f.id] for f in facts if f.id in results]
    return _finish(_summarize(model, ordered, attack_objs, None, {"command": "attack", "facts_file": facts_label},
                              others), out)


def run_main(model, facts: Sequence[Fact], out: str | Path, cfg: RunConfig, *, facts_label: str = "",
             resume: bool = False) -> RunResult:
    """``probe-attack run``: the main job.

    1. known-fact filter: keep facts whose answer's first token is at rank <= ``known_rank`` at
       the model's output (before any deletion);
    2. whitebox attacks before deletion (logit-lens readout, every layer);
    3. delete with ``cfg.defense`` through ``cfg.editor`` -- one fact at a time from a fresh copy
       (the papers' protocol) or all facts at once;
    4. attacks and defense metrics after deletion; results appended per fact;
    5. ``results.json`` + ``report.html``.

    Raises:
        RunError: the output folder holds another run; ValueError: unknown defense/attack/editor.
    """
    facts = attach_images(model, facts)
    from attacks import attack_readout
    from defenses import DefenseDiverged, DeletionRequest, make_objective
    from defenses.base import editor_for
    from defenses.evaluate import deletion_scores, fact_probs
    from defenses.metrics import mean
    from defenses.retain import retain_prompts

    out = Path(out)
    if cfg.protocol not in ("one-at-a-time", "all-at-once"):
        raise InputError(f"unknown protocol {cfg.protocol!r}; use one-at-a-time or all-at-once", field="protocol")
    attack_objs, others = _attacks(cfg.attacks, cfg.attack_config)
    objective = make_objective(cfg.defense)
    editor = editor_for(objective, cfg.editor, cfg.editor_config)
    editor.check(model, objective, cfg.protocol)  # edit/defense layers, protocol: before anything is written
    facts = list(facts)
    check_lengths(model, facts)
    stamp = _stamp(model, facts_label, cfg, "run")
    done = _prepare_out(out, stamp, resume)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    # 1-2. known-fact filter and attacks before deletion (one lens sweep)
    known, n_known = known_facts(model, facts, attack_objs, cfg.known_rank, cfg.max_facts, batch_size=cfg.batch_size,
                                 progress=cfg.progress, desc="filter + attacks (pre)")
    write_text_atomic(out / RUN_STAMP, json.dumps(stamp, indent=2))
    appender = _Appender(out / PER_FACT, {k: v for k, v in done.items() if k in {f.id for f, _ in known}})
    todo = [(f, r) for f, r in known if f.id not in done]

    session = editor.session(model)
    known_ids = {f.id for f, _ in known}

    def retain_for(fact: Fact) -> list[str]:
        return retain_prompts(fact, facts, cfg.retain_size, sim_frac=cfg.retain_similar, seed=cfg.seed)

    def record(fact: Fact, pre: LayerReadout, post: LayerReadout, scores: dict, outcomes=None,
               text_pre=None, text_post=None) -> FactResult:
        _, a_ids, _ = teacher_forced_inputs(model.tokenizer, [fact.prompt], [fact.answer])
        modal = None if text_pre is None else {"text_prompt": text_form(fact), "text_pre": asdict(text_pre),
                                               "text_post": asdict(text_post) if text_post else None}
        return FactResult(fact.id, str(fact.prompt), fact.answer, a_ids[0], pre, post, scores, outcomes, modal)

    from defenses.evaluate import target_probs, target_scores

    evaluated = [f.id for f, _ in known]
    n_traced = [sum(1 for _ in open(out / CAUSAL, encoding="utf-8")) if (out / CAUSAL).is_file() and resume else 0]
    pre_cache: dict = {}  # the unedited model's attack scratch space, shared by every fact

    if cfg.protocol == "one-at-a-time":
        for fact, pre in tqdm(todo, desc=f"{cfg.defense} (per fact)", disable=not cfg.progress):
            check_interrupt()
            # measured per fact, batched exactly like the post measurement (resume-invariant)
            probs = fact_probs(model, [fact], max_new_tokens=cfg.acc_tokens)[0]
            pre_out = (_other_outcomes(model, [fact], others, facts, evaluated, cfg.seed, pre_cache)[0]
                       if others else {})
            target = objective.target_for(fact, facts)
            t_pre = target_probs(model, fact, target) if target else None
            text_pre = text_readouts(model, [fact], attack_objs)[0]
            try:
                info = editor.edit(session, objective, objective.request(fact, facts, retain_for(fact)))
            except DefenseDiverged as exc:
                tqdm.write(f"probe-attack: fact {fact.id}: {exc}; skipped")
                continue
            post = attack_readout(session.model, [fact.prompt], [fact.answer], attack_objs)[0]
            text_post = text_readouts(session.model, [fact], attack_objs)[0]
            post_out = _other_outcomes(session.model, [fact], others, facts, evaluated, cfg.seed)[0] if others else {}
            post_probs = fact_probs(session.model, [fact], max_new_tokens=cfg.acc_tokens)[0]
            scores = {**deletion_scores(probs, post_probs), "edit_steps": info.steps,
                      "max_abs_change": info.max_abs_change, "final_loss": info.losses[-1]}
            if target:
                scores.update(target_scores(t_pre, target_probs(session.model, fact, target)), target=target)
            if n_traced[0] < cfg.causal_traces:
                _causal(model, session.model, fact, out)
                n_traced[0] += 1
            session.restore()
            outcomes = {k: {"pre": pre_out[k], "post": post_out.get(k)} for k in pre_out} or None
            appender.append([record(fact, pre, post, scores, outcomes, text_pre, text_post)])
    elif todo:
        req_facts = [f for f, _ in todo]
        pre_probs = fact_probs(model, req_facts, max_new_tokens=cfg.acc_tokens)
        texts_pre = text_readouts(model, req_facts, attack_objs, batch_size=cfg.batch_size)
        pool = sorted({g.prompt for g in facts if g.id not in known_ids})
        rng = random.Random(cfg.seed)
        retain = rng.sample(pool, min(cfg.retain_size, len(pool)))
        reqs = [objective.request(f, facts, []) for f in req_facts]
        info = editor.edit(session, objective, DeletionRequest(
            [p for r in reqs for p in r.prompts], [a for r in reqs for a in r.answers], retain,
            targets=[t for r in reqs for t in r.targets] if reqs[0].targets is not None else None,
            subjects=[s for r in reqs for s in (r.subjects or [None] * len(r.prompts))]))
        posts = attack_readout(session.model, [f.prompt for f in req_facts], [f.answer for f in req_facts],
                               attack_objs, batch_size=cfg.batch_size, progress=cfg.progress, desc="attacks (post)")
        post_probs = fact_probs(session.model, req_facts, max_new_tokens=cfg.acc_tokens)
        texts_post = text_readouts(session.model, req_facts, attack_objs, batch_size=cfg.batch_size)
        session.restore()
        appender.append([record(f, r, p, {**deletion_scores(a, b), "edit_steps": info.steps,
                                          "max_abs_change": info.max_abs_change}, None, tp, tq)
                         for (f, r), p, a, b, tp, tq in zip(todo, posts, pre_probs, post_probs, texts_pre, texts_post)])

    finished = read_finished(out / PER_FACT)
    ordered = [finished[f.id] for f, _ in known if f.id in finished]
    keys = ("rewrite_score", "paraphrase_score", "neighborhood_score", "neighborhood_acc_pre",
            "neighborhood_acc_post", "neighborhood_delta_acc", "target_rewrite_score", "target_paraphrase_score")
    defense = {"name": cfg.defense, "editor": cfg.editor, "editor_config": editor.config(),
               "edit_parameter": editor.param_name(model),
               "protocol": cfg.protocol,
               **{k: mean([r.defense.get(k) for r in ordered if r.defense]) for k in keys},
               "efficacy": mean([float(r.post.rank[-1] > 1) for r in ordered if r.post]),
               "n_deleted": len(ordered)}
    meta = {"command": "run", "facts_file": facts_label, "n_facts_input": len(facts),
            "known_filter": {"max_rank": cfg.known_rank, "n_known": n_known, "n_used": len(known)}, "seed": cfg.seed,
            "seconds": round(time.time() - t0, 1), "files": {"per_fact": PER_FACT, "report": REPORT},
            "image_examples": image_examples([f for f, _ in known])}
    return _finish(_summarize(model, ordered, attack_objs, defense, meta, others), out)
