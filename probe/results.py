"""Result objects: plain dataclasses that serialise to JSON and render in Jupyter.

The CLI writes them (``results.json`` + the per-fact companion ``per_fact.jsonl``), :mod:`viz`
reads them, and a notebook user sees the same numbers through ``_repr_html_``.

Units: ``rank`` is 1-based (1 = the model's top token) over the whole vocabulary; ``prob`` is a
probability (0..1) of the answer's *first* token under the logit lens; ``answer_logprob`` is the
teacher-forced log-probability (nats) of the *full* answer at the model's output.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReadout:
    """What the logit lens decodes for one fact on one model state (before or after deletion).

    Attributes:
        rank: per layer, 1-based rank of the answer's first token (length ``n_layers``).
        prob: per layer, lens probability of the answer's first token.
        first_token_prob: the model's own probability of the first answer token (= ``prob[-1]``).
        answer_logprob: teacher-forced log p(full answer | prompt), nats, sum over answer tokens.
        token_logprobs: per answer token log-probabilities (nats).
        exact_match: greedy decoding reproduces every answer token.
        token_acc: fraction of answer tokens that are the greedy choice under teacher forcing.
        attack_ranks: per whitebox attack, the best (smallest) rank of the answer over that
            attack's candidate lists; the attack succeeds at per-list size ``k`` iff ``<= k``.
    """

    rank: list[int]
    prob: list[float]
    first_token_prob: float
    answer_logprob: float
    token_logprobs: list[float]
    exact_match: bool
    token_acc: float = 0.0
    attack_ranks: dict[str, int] = field(default_factory=dict)


@dataclass
class FactResult:
    """Everything measured for one fact. ``post`` and ``defense`` are None without a deletion."""

    id: str
    prompt: str
    answer: str
    answer_ids: list[int]
    pre: LayerReadout
    post: LayerReadout | None = None
    defense: dict[str, Any] | None = None
    outcomes: dict[str, dict] | None = None  # non-lens attacks: {name: {"pre": outcome, "post": outcome}}
    #: image facts on a multimodal model: the same question without the image ("text_prompt": the
    #: fact's text form naming the entity, else the prompt's text), read out by the same lens:
    #: {"text_prompt": str, "text_pre": LayerReadout dict, "text_post": LayerReadout dict | None}
    modal: dict[str, Any] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FactResult":
        d = dict(d)
        d["pre"] = LayerReadout(**d["pre"])
        d["post"] = LayerReadout(**d["post"]) if d.get("post") else None
        return cls(**d)


@dataclass
class AttackSummary:
    """Attack success@B of one whitebox attack (Patil et al. ICLR 2024 section 3).

    ``success_pre``/``success_post`` are fractions of facts (0..1) whose answer's first token is
    in the candidate set of size ``budget``; ``curve_*`` give success for each per-list size
    ``k`` in ``curve_k`` with budgets ``curve_budget``.
    """

    name: str
    layers: list[int]
    k: int
    budget: int
    success_pre: float
    success_post: float | None = None
    curve_k: list[int] = field(default_factory=list)
    curve_budget: list[int] = field(default_factory=list)
    curve_pre: list[float] = field(default_factory=list)
    curve_post: list[float] | None = None


@dataclass
class RunResult:
    """One run of the main job (``probe-attack run``) or of ``probe-attack attack``."""

    model: str
    n_layers: int
    n_facts: int
    facts: list[FactResult]
    attacks: dict[str, AttackSummary]
    defense: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    other_attacks: dict[str, dict] = field(default_factory=dict)

    def summary_json(self) -> dict:
        """The ``results.json`` content (per-fact data lives in ``per_fact.jsonl``)."""
        attacks = {}
        for name, a in self.attacks.items():
            d = asdict(a)
            if a.success_post is None:
                d.pop("success_post")
                d.pop("curve_post")
            attacks[name] = d
        attacks.update(self.other_attacks)
        out = {"model": self.model, "n_layers": self.n_layers, "n_facts": self.n_facts, "attacks": attacks}
        if self.defense is not None:
            out["defense"] = self.defense
        out["per_layer"] = self.per_layer()
        out.update(self.meta)
        return out

    def per_layer(self) -> dict:
        """Per-layer aggregates: median rank, mean log10 rank and mean probability, pre and post."""
        out = {"layers": list(range(self.n_layers))}
        for phase in ("pre", "post"):
            reads = [getattr(f, phase) for f in self.facts if getattr(f, phase) is not None]
            if not reads:
                continue
            cols = list(zip(*[r.rank for r in reads]))
            pcols = list(zip(*[r.prob for r in reads]))
            out[phase] = {
                "median_rank": [_median(c) for c in cols],
                "mean_log10_rank": [sum(math.log10(x) for x in c) / len(c) for c in cols],
                "mean_prob": [sum(c) / len(c) for c in pcols],
            }
        return out

    def to_json(self) -> str:
        return json.dumps(self.summary_json(), indent=2)

    def _repr_html_(self) -> str:
        rows = []
        for name, a in self.attacks.items():
            post = "" if a.success_post is None else f"{100 * a.success_post:.1f}%"
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{a.budget}</td><td>{100 * a.success_pre:.1f}%</td>"
                        f"<td>{post}</td></tr>")
        dfn = ""
        if self.defense:
            keys = ("rewrite_score", "paraphrase_score", "neighborhood_score", "neighborhood_delta_acc")
            dfn = "<p>" + html.escape(str(self.defense.get("name"))) + ": " + ", ".join(
                f"{k} {self.defense[k]:.3f}" for k in keys if isinstance(self.defense.get(k), (int, float))) + "</p>"
        return (f"<p><b>{html.escape(self.model)}</b>, {self.n_facts} facts</p>"
                "<table><tr><th>attack</th><th>B</th><th>success pre</th><th>success post</th></tr>"
                + "".join(rows) + "</table>" + dfn)


def _median(xs) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
