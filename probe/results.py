"""Result objects: dataclasses that serialise to JSON, load back, and render in Jupyter.

The jobs (:mod:`probe.jobs`) write them (``results.json`` + ``per_fact.jsonl`` for a run;
``grid.json`` + ``pre.jsonl`` + ``units.jsonl`` for a grid), :mod:`viz` reads them, and a
notebook user sees the same numbers through ``_repr_html_``; :meth:`RunResult.load` and
:meth:`GridResult.load` read a finished (or interrupted) output folder back.

Units: ``rank`` is 1-based (1 = the model's top token) over the whole vocabulary; ``prob`` is a
probability (0..1) of the answer's *first* token under the lens; ``answer_logprob`` is the
teacher-forced log-probability (nats) of the *full* answer at the model's output. Attack successes
and scores are fractions (0..1).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence


def median(xs: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count; nan for none): the one median
    of every per-layer summary."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def mean(xs: Sequence[float | None]) -> float | None:
    """Mean of the defined values; None (JSON ``null``) when there are none, never NaN."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _from_dict(cls, d: dict):
    """``cls(**d)`` keeping only ``cls``'s fields (records written by other versions load too)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LayerReadout:
    """What a lens decodes for one fact on one model state (before or after deletion).

    Attributes:
        rank: per layer, 1-based rank of the answer's first token (length ``n_layers``).
        prob: per layer, lens probability of the answer's first token.
        first_token_prob: the model's own probability of the first answer token (= ``prob[-1]``
            under the logit lens).
        answer_logprob: teacher-forced log p(full answer | prompt), nats, sum over answer tokens.
        token_logprobs: per answer token log-probabilities (nats).
        exact_match: greedy decoding reproduces every answer token.
        token_acc: fraction of answer tokens that are the greedy choice under teacher forcing.
        attack_ranks: scratch space of :func:`probe.readout.lens_readout`'s scorers (the lens
            attacks' best ranks; ``"<name>@control"`` for the fact's control answer); the jobs move
            them into :class:`AttackOutcome` records.
        top_token: the model's own top-1 next-token id at the output (what it "gives").
        control_rank: per layer, 1-based rank of the control answer's first token (None when the
            sweep had no control answer).
    """

    rank: list[int]
    prob: list[float]
    first_token_prob: float
    answer_logprob: float
    token_logprobs: list[float]
    exact_match: bool
    token_acc: float = 0.0
    attack_ranks: dict[str, int] = field(default_factory=dict)
    top_token: int | None = None
    control_rank: list[int] | None = None

    @classmethod
    def from_json(cls, d: dict | None) -> "LayerReadout | None":
        return None if d is None else _from_dict(cls, d)


@dataclass
class AttackOutcome:
    """The result of one attack on one fact (see :class:`attacks.base.Attack`).

    Attributes:
        success: the answer is in the attack's candidate set of size ``budget``.
        budget: the candidate-set size B this outcome was judged at.
        best_rank: for rank-based attacks, the best (smallest, 1-based) rank of the answer's
            first token over the candidate lists (``success == best_rank <= k``); else None.
        layer_ranks: per decoder layer, the answer's rank under this attack's readout (tuned lens,
            probe), or None.
        samples: blackbox attacks: the sampled continuations (text), or None.
        hits: blackbox attacks: how many samples contain the answer.
        details: anything else worth keeping (JSON-serialisable).
        skipped: why the attack could not run on this fact (e.g. an image fact without
            paraphrase images for ``image-rephrase``, or ``"answer in input"``), else None.
            Skipped outcomes are left out of attack success and counted separately.
        control: the same rule scored on the fact's control answer (:mod:`probe.controls`) on the
            same candidate set, samples or relearned weights (for the linear probe: the relation
            prior's top-k); None when the fact has no control.
        control_rank: rank-based attacks: the control's best rank over the same candidate lists.
        hidden, hidden_rank: lens attacks: success / best rank with the output layer removed from
            the attack's layers (hidden-state-only leakage); None for other attacks.
        hidden_control: lens attacks: the control under the hidden-only rule.
        output: lens attacks: the answer's first token is in the top-k of the lens at the output
            layer alone (what the output distribution gives away).
        taught: relearning: fraction of facts the unedited model never knew (rank > 100) whose
            answer the same relearned weights put in the candidate set -- what relearning
            teaches rather than recovers; None for other attacks.
    """

    success: bool
    budget: int
    best_rank: int | None = None
    layer_ranks: list[int] | None = None
    samples: list[str] | None = None
    hits: int | None = None
    details: dict = field(default_factory=dict)
    skipped: str | None = None
    control: bool | None = None
    control_rank: int | None = None
    hidden: bool | None = None
    hidden_rank: int | None = None
    hidden_control: bool | None = None
    output: bool | None = None
    taught: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> "AttackOutcome | None":
        return None if d is None else _from_dict(cls, d)

    @classmethod
    def skip(cls, budget: int, reason: str, details: dict | None = None) -> "AttackOutcome":
        """An outcome for a fact the attack cannot run on (not a failure of the attack); ``details``
        may say why (e.g. the pool it had, :mod:`probe.pool`)."""
        return cls(success=False, budget=budget, skipped=reason, details=dict(details or {}))


@dataclass
class FactProbs:
    """Full-answer probabilities (0..1) of one fact on one model state (teacher-forced).

    Attributes:
        prompt: p(answer | prompt).
        paraphrases: p(answer | paraphrase) for each paraphrase.
        neighbors: p(neighbour answer | neighbour prompt) for each neighbour.
        neighbor_acc: greedy-generation correctness per neighbour (None if not measured).
    """

    prompt: float
    paraphrases: list[float]
    neighbors: list[float]
    neighbor_acc: list[bool] | None = None

    @classmethod
    def from_json(cls, d: dict) -> "FactProbs":
        return _from_dict(cls, d)


@dataclass
class EditInfo:
    """What one edit did (every editor returns it; JSON via :func:`dataclasses.asdict`).

    Attributes:
        steps: accepted states measured (= ``len(losses)``: the unedited model, then every
            accepted update; forward passes = ``steps + len(extra["rejected_steps"])``).
        losses: the total loss of every accepted state (objective + the editor's regularisers).
        max_abs_change: largest absolute change of the edited weight.
        parameter: the edited weight's fully-qualified name.
        seconds: wall-clock time of the edit.
        extra: the editor loop's ``rejected_steps``, ``rejected_losses``, ``lr_scale``,
            ``retain_kl`` (:meth:`defenses.editor.Editor.edit`) and editor-specific numbers (ROME:
            ``delta_norm``, ``v_init_norm``).
        final_loss: the final (accepted) state's loss (None when no step ran).
    """

    steps: int
    losses: list[float]
    max_abs_change: float
    parameter: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    final_loss: float | None = field(init=False)

    def __post_init__(self):
        self.final_loss = self.losses[-1] if self.losses else None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> "EditInfo | None":
        return None if d is None else _from_dict(cls, d)


@dataclass
class DeletionScores:
    """Per-fact scores of one deletion (formulas in :mod:`defenses.metrics`; method.md section 5).

    Probabilities ``p_*`` are 0..1; scores are 0..1 (rewrite / paraphrase: how much of the
    answer's probability the edit removed; neighborhood: how much of the neighbours' it kept);
    accuracies are fractions of greedy generations containing the label; Δ-Accs are pre − post.
    ``efficacy`` is 1 when the answer's first token is no longer the model's top-1 output.
    Target fields are set for target objectives (empty response, error injection) only.

    Retention (every other fact the unedited model knows, issue 12 item 4): ``retention_acc_pre``
    / ``retention_acc_post`` are the fractions of those facts whose answer's first token is the
    model's top-1 output (rank 1) before / after the edit, ``retention_drop`` = pre − post (the
    damage; > 0 = facts lost), over ``retention_n`` facts: the job's known facts (``Plan.known``,
    before ``max_facts``) minus every fact deleted by the same edit. None when not measured.

    Generation (greedy ``gen_tokens``-token continuations, the answer found by
    :func:`probe.matching.answer_matches`; issue 12 item 5): ``generation_acc_pre`` is 1 when the
    unedited model's continuation of the prompt contains the answer; ``generation_efficacy`` is 1
    when the edited model's no longer does, and is defined only for facts whose unedited
    continuation contained it (None otherwise: a fact the model never generated is not a
    success). ``generation_paraphrase_acc_pre`` is the fraction of paraphrases whose unedited
    continuation contains the answer; ``generation_paraphrase_efficacy`` the fraction of *those*
    paraphrases whose edited continuation no longer does (None when none did).
    """

    p_pre: float | None = None
    p_post: float | None = None
    rewrite_score: float | None = None
    paraphrase_score: float | None = None
    neighborhood_score: float | None = None
    neighborhood_acc_pre: float | None = None
    neighborhood_acc_post: float | None = None
    neighborhood_delta_acc: float | None = None
    random_delta_acc: float | None = None
    retention_acc_pre: float | None = None
    retention_acc_post: float | None = None
    retention_drop: float | None = None
    retention_n: int | None = None
    efficacy: float | None = None
    generation_acc_pre: float | None = None
    generation_efficacy: float | None = None
    generation_paraphrase_acc_pre: float | None = None
    generation_paraphrase_efficacy: float | None = None
    target: str | None = None
    target_p_pre: float | None = None
    target_p_post: float | None = None
    target_rewrite_score: float | None = None
    target_paraphrase_score: float | None = None

    #: the metrics averaged over facts in every summary (derived from the fields)
    METRICS: ClassVar[tuple[str, ...]] = ()
    #: the metrics every table and report shows, in this order (the rest stay in the files)
    REPORTED: ClassVar[tuple[str, ...]] = ("rewrite_score", "paraphrase_score", "generation_efficacy",
                                           "generation_paraphrase_efficacy", "neighborhood_score",
                                           "neighborhood_delta_acc", "random_delta_acc", "retention_drop",
                                           "efficacy", "target_rewrite_score")
    #: the denominators shown next to :attr:`REPORTED` (how many facts the retention covers; how
    #: many facts / paraphrases the unedited model generated the answer for)
    DENOMINATORS: ClassVar[tuple[str, ...]] = ("retention_n", "generation_acc_pre", "generation_paraphrase_acc_pre")

    @classmethod
    def from_json(cls, d: dict | None) -> "DeletionScores | None":
        return None if d is None else _from_dict(cls, d)

    @classmethod
    def means(cls, scores: Sequence["DeletionScores"]) -> dict[str, float | None]:
        """Mean of every metric over facts (None where no fact has it)."""
        return {k: mean([getattr(s, k) for s in scores]) for k in cls.METRICS}


DeletionScores.METRICS = tuple(f.name for f in dataclasses.fields(DeletionScores) if f.name != "target")


@dataclass
class ModalReadout:
    """Image facts on a multimodal model: the same question without the image (``text_prompt``: the
    fact's text form naming the entity, else the prompt's text), read out by the logit lens."""

    text_prompt: str
    text_pre: LayerReadout
    text_post: LayerReadout | None = None

    @classmethod
    def from_json(cls, d: dict | None) -> "ModalReadout | None":
        if d is None:
            return None
        return cls(d["text_prompt"], LayerReadout.from_json(d["text_pre"]), LayerReadout.from_json(d.get("text_post")))


@dataclass
class PreMeasure:
    """The unedited model's measurements of one fact, shared by every defense (``pre.jsonl``).

    Attributes:
        fact_id: the fact.
        readout: logit-lens readout of the fact's prompt (every layer).
        outcomes: every attack's outcome on the unedited model.
        probs: full-answer probabilities of prompt, paraphrases and neighbours.
        random_ids, random_acc: the other facts drawn for the random Δ-Acc and whether the
            unedited model answers each (greedy generation).
        text_readout: image facts: the readout of the fact's text form, else None.
        generation: whether the unedited model's greedy continuation (``gen_tokens`` tokens) of
            the prompt, then of each paraphrase, contains the answer
            (:func:`defenses.evaluate.generation_hits`); None when not measured (``gen_tokens=0``).
        random_pool: where the random Δ-Acc facts came from (:class:`probe.pool.PoolUse` as JSON:
            ``{"source": "file" | "file + built-in", "size": n}``).
    """

    fact_id: str
    readout: LayerReadout
    outcomes: dict[str, AttackOutcome]
    probs: FactProbs
    random_ids: list[str] = field(default_factory=list)
    random_acc: list[bool] = field(default_factory=list)
    text_readout: LayerReadout | None = None
    generation: list[bool] | None = None
    random_pool: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PreMeasure":
        gen = d.get("generation")
        return cls(d["fact_id"], LayerReadout.from_json(d["readout"]),
                   {k: AttackOutcome.from_json(v) for k, v in d.get("outcomes", {}).items()},
                   FactProbs.from_json(d["probs"]), list(d.get("random_ids", [])), list(d.get("random_acc", [])),
                   LayerReadout.from_json(d.get("text_readout")), None if gen is None else [bool(x) for x in gen],
                   d.get("random_pool"))


@dataclass
class FactResult:
    """Everything measured for one fact (one deletion unit of a run or grid).

    ``post``, ``scores`` and ``edit`` are None without a deletion (``probe-attack attack``) or when
    the edit failed (``error`` says why; the fact is counted in ``n_failed`` and left out of every
    score). ``outcomes[attack] = {"pre": AttackOutcome, "post": AttackOutcome | None}``.
    ``control`` is the fact's control answer (scored by every attack next to ``answer``) and
    ``control_source`` where it was drawn from (``"relation"``, ``"any-relation"``, or
    ``"built-in"``: a built-in fact's answer, the file having none that qualifies).
    ``pools`` says which pool of other facts each metric of the unit drew from
    (:mod:`probe.pool`): ``{"control" | "retain" | "target" | "random" | "retention": {"source":
    "file" | "file + built-in", "size": n}}``.
    """

    id: str
    prompt: str
    answer: str
    answer_ids: list[int]
    pre: LayerReadout
    post: LayerReadout | None = None
    scores: DeletionScores | None = None
    edit: EditInfo | None = None
    outcomes: dict[str, dict[str, AttackOutcome | None]] = field(default_factory=dict)
    modal: ModalReadout | None = None
    defense: str | None = None
    error: str | None = None
    control: str | None = None
    control_source: str | None = None
    relation: str | None = None
    pools: dict[str, dict] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.edit is not None:
            d["edit"] = self.edit.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FactResult":
        return cls(id=d["id"], prompt=d["prompt"], answer=d["answer"], answer_ids=list(d["answer_ids"]),
                   pre=LayerReadout.from_json(d["pre"]), post=LayerReadout.from_json(d.get("post")),
                   scores=DeletionScores.from_json(d.get("scores")), edit=EditInfo.from_json(d.get("edit")),
                   outcomes={k: {ph: AttackOutcome.from_json(o) for ph, o in v.items()}
                             for k, v in (d.get("outcomes") or {}).items()},
                   modal=ModalReadout.from_json(d.get("modal")), defense=d.get("defense"), error=d.get("error"),
                   control=d.get("control"), control_source=d.get("control_source"), relation=d.get("relation"),
                   pools=d.get("pools"))


@dataclass
class AttackSummary:
    """Attack success@B of one attack over facts (Patil, Hase & Bansal, ICLR 2024, section 3):
    the one summary type of every attack, in runs and grid cells.

    Attributes:
        success_pre, success_post: fractions (0..1) of the non-skipped facts whose answer is in the
            candidate set of size ``budget``, before / after the edit (None: not measured).
        n_facts, n_skipped: facts scored / skipped by the attack (skipped ones are not scored).
        readout: ``"logit lens"``, ``"tuned lens"``, ``"probe"`` or None; ``modality``:
            ``"text-only"``, ``"image-only"``, ``"multimodal"`` or None.
        layers, k: the layers read and the candidates per list (rank-based attacks), else None.
        curve_*: success for each per-list size ``curve_k`` with budgets ``curve_budget``.
        control: where the controls came from (``"relation"``: another answer of the fact's
            relation; ``"any-relation"``: the facts file has no relations; ``"relation prior"``: the
            linear probe's answer-frequency baseline), None without controls.
        n_control: facts with a control (the denominators of the ``*_control`` fields).
        success_control_pre, success_control: the same rule on the control answers on the unedited
            / the attacked (edited, if any) model -- the floor an attack reaches without the fact.
        excess: ``success_post - success_control`` (``success_pre - success_control_pre`` without
            an edit): the headline number.
        success_hidden_pre, success_hidden_post, success_hidden_control, budget_hidden: lens
            attacks with the output layer removed from their layers (hidden-state-only leakage).
        success_output_pre, success_output_post: lens attacks: the answer in the top-k of the
            output distribution alone (what the output layer gives away).
        success_taught: relearning: mean fraction of never-known facts (rank > 100) the relearned
            weights put in the candidate set (teaching, not remembering).
    """

    name: str
    kind: str = "whitebox"  # a default so that result files written before ``kind`` existed load
    budget: int = 0
    success_pre: float | None = None
    success_post: float | None = None
    n_facts: int = 0
    n_skipped: int = 0
    readout: str | None = None
    modality: str | None = None
    layers: list[int] | None = None
    k: int | None = None
    curve_k: list[int] = field(default_factory=list)
    curve_budget: list[int] = field(default_factory=list)
    curve_pre: list[float] = field(default_factory=list)
    curve_post: list[float] | None = None
    control: str | None = None
    n_control: int = 0
    success_control_pre: float | None = None
    success_control: float | None = None
    excess: float | None = None
    success_hidden_pre: float | None = None
    success_hidden_post: float | None = None
    success_hidden_control: float | None = None
    budget_hidden: int | None = None
    success_output_pre: float | None = None
    success_output_post: float | None = None
    success_taught: float | None = None

    @classmethod
    def from_json(cls, d: dict) -> "AttackSummary":
        return _from_dict(cls, d)


def per_layer_ranks(readouts: Sequence[LayerReadout]) -> dict[str, list[float]]:
    """Per-layer aggregates of readouts: median rank, mean log10 rank, mean probability."""
    cols = list(zip(*[r.rank for r in readouts]))
    pcols = list(zip(*[r.prob for r in readouts]))
    return {"median_rank": [median(c) for c in cols],
            "mean_log10_rank": [sum(math.log10(x) for x in c) / len(c) for c in cols],
            "mean_prob": [sum(c) / len(c) for c in pcols]}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


@dataclass
class RunResult:
    """One run of the main job (``probe-attack run``), of ``probe-attack attack`` or of an audit.

    Attributes:
        facts: per-fact results (``per_fact.jsonl``).
        attacks: attack name -> :class:`AttackSummary`.
        defense: the defense's settings and mean scores (``name``, ``editor``, ``editor_config``,
            ``edit_parameter``, ``protocol``, ``n_deleted``, ``n_failed`` and every
            :attr:`DeletionScores.METRICS` mean); None without a deletion.
        meta: the command, facts file, known-fact filter counts, seed, timing, files.
    """

    model: str
    n_layers: int
    n_facts: int
    facts: list[FactResult]
    attacks: dict[str, AttackSummary]
    defense: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def summary_json(self) -> dict:
        """The ``results.json`` content (per-fact data lives in ``per_fact.jsonl``)."""
        out = {"model": self.model, "n_layers": self.n_layers, "n_facts": self.n_facts,
               "attacks": {k: asdict(a) for k, a in self.attacks.items()}}
        if self.defense is not None:
            out["defense"] = self.defense
        out["per_layer"] = self.per_layer()
        out.update(self.meta)
        return out

    def per_layer(self) -> dict:
        """Per-layer aggregates (:func:`per_layer_ranks`), before and after the edit."""
        out: dict[str, Any] = {"layers": list(range(self.n_layers))}
        for phase in ("pre", "post"):
            reads = [getattr(f, phase) for f in self.facts if getattr(f, phase) is not None]
            if reads:
                out[phase] = per_layer_ranks(reads)
        return out

    def to_json(self) -> str:
        return json.dumps(self.summary_json(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "RunResult":
        """Read a run's output folder (``results.json`` + ``per_fact.jsonl``) back.

        Raises:
            FileNotFoundError: no ``results.json`` in ``path``.
        """
        path = Path(path)
        summary = json.loads((path / "results.json").read_text(encoding="utf-8"))
        from .jsonl import read_jsonl  # the log's own reader: a torn last line is dropped

        per_fact = path / summary.get("files", {}).get("per_fact", "per_fact.jsonl")
        facts = [FactResult.from_json(r) for r in read_jsonl(per_fact)]
        known = {"model", "n_layers", "n_facts", "attacks", "defense", "per_layer"}
        return cls(model=summary["model"], n_layers=summary["n_layers"], n_facts=summary["n_facts"], facts=facts,
                   attacks={k: AttackSummary.from_json(v) for k, v in summary["attacks"].items()},
                   defense=summary.get("defense"), meta={k: v for k, v in summary.items() if k not in known})

    def _repr_html_(self) -> str:
        rows = [f"<tr><td>{html.escape(name)}</td><td>{a.budget}</td><td>{_pct(a.success_pre)}</td>"
                f"<td>{_pct(a.success_post)}</td><td>{_pct(a.success_control)}</td><td>{_pct(a.excess)}</td></tr>"
                for name, a in self.attacks.items()]
        dfn = ""
        if self.defense:
            keys = DeletionScores.REPORTED
            dfn = "<p>" + html.escape(str(self.defense.get("name"))) + ": " + ", ".join(
                f"{k} {self.defense[k]:.3f}" for k in keys if isinstance(self.defense.get(k), (int, float))) + "</p>"
        return (f"<p><b>{html.escape(self.model)}</b>, {self.n_facts} facts</p>"
                "<table><tr><th>attack</th><th>B</th><th>success pre</th><th>success post</th><th>control</th>"
                "<th>excess</th></tr>"
                + "".join(rows) + "</table>" + dfn)


@dataclass
class Cell(AttackSummary):
    """One (defense, attack) cell of a grid: the attack's summary over the facts that defense
    deleted, plus the defense's mean scores (:attr:`DeletionScores.METRICS`) and failure count."""

    defense: str = ""
    editor: str = ""
    n_failed: int = 0
    scores: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("scores"))
        d["attack"] = d["name"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Cell":
        base = _from_dict(cls, {**d, "name": d.get("name", d.get("attack"))})
        base.scores = {k: d.get(k) for k in DeletionScores.METRICS}
        return base


@dataclass
class GridResult:
    """An attack × defense grid (``probe-attack grid``): ``grid.json`` + its per-fact records.

    Attributes:
        cells: one :class:`Cell` per (defense, attack) with facts.
        per_layer: median logit-lens rank per layer, unedited (``pre``) and after each defense
            (``post[defense]``); ``per_layer_text`` the same for image facts' text forms.
        complete: every planned (defense, fact) unit is finished.
        calibration: the matched-damage calibration in use (:func:`probe.jobs.calibrate.calibration_meta`),
            None when each defense ran at its built-in settings.
        pools: which pool of other facts each metric and attack drew from, counted over the units
            (:func:`probe.pool.pool_summary`).
    """

    model: str
    n_layers: int
    editor: str
    defenses: list[str]
    attacks: list[str]
    cells: list[Cell]
    per_layer: dict
    facts_file: str = ""
    n_facts_input: int = 0
    n_known: int = 0
    n_facts: int = 0
    n_facts_planned: int = 0
    defenses_started: list[str] = field(default_factory=list)
    complete: bool = False
    mean_edit_seconds: float | None = None
    seconds_this_session: float = 0.0
    seed: int = 0
    per_layer_text: dict | None = None
    image_examples: list | None = None
    calibration: dict | None = None
    pools: dict | None = None

    def to_dict(self) -> dict:
        """The ``grid.json`` content."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["cells"] = [c.to_json() for c in self.cells]
        for k in ("per_layer_text", "image_examples"):
            if d[k] is None:
                d.pop(k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def cell(self, defense: str, attack: str) -> Cell | None:
        return next((c for c in self.cells if c.defense == defense and c.name == attack), None)

    @classmethod
    def from_dict(cls, d: dict) -> "GridResult":
        d = dict(d)
        d["cells"] = [Cell.from_json(c) for c in d.get("cells", [])]
        return _from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> "GridResult":
        """Read ``grid.json`` from a grid's output folder (or the file itself).

        Raises:
            FileNotFoundError: no ``grid.json``.
        """
        path = Path(path)
        path = path / "grid.json" if path.is_dir() else path
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(a)}</th>" for a in self.attacks)
        rows = []
        for dfn in self.defenses:
            cells = [self.cell(dfn, a) for a in self.attacks]
            if not any(cells):
                continue
            tds = "".join("<td>—</td>" if c is None or c.success_post is None
                          else f"<td>{_pct(c.success_pre)} → {_pct(c.success_post)} (c {_pct(c.success_control)})</td>"
                          for c in cells)
            rows.append(f"<tr><td>{html.escape(dfn)}</td>{tds}</tr>")
        return (f"<p><b>{html.escape(self.model)}</b>, editor {html.escape(self.editor)}: {self.n_facts} known facts "
                f"({'complete' if self.complete else 'partial'})</p>"
                f"<table><tr><th>defense</th>{head}</tr>" + "".join(rows) + "</table>")
