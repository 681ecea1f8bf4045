"""docs/extending.md in practice: a toy attack, objective and editor, each registered in one place,
show up in the CLI, the grid and the report without touching anything else."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import attacks
import defenses
from probe.facts import Fact
from probe.jobs import GridConfig, run_grid

FACTS = [
    Fact("fr", "The capital of France is", "Paris", neighborhood=[{"prompt": "The capital of Japan is",
                                                                  "answer": "Tokyo"}]),
    Fact("jp", "The capital of Japan is", "Tokyo"),
    Fact("water", "Water is made of hydrogen and", "oxygen"),
]


@pytest.fixture
def toys(monkeypatch):
    """Register a toy attack, objective and editor (removed from the registries afterwards)."""
    monkeypatch.setattr(attacks.base, "ATTACKS", dict(attacks.ATTACKS))
    monkeypatch.setattr(attacks, "ATTACKS", attacks.base.ATTACKS)
    monkeypatch.setattr(defenses.base, "OBJECTIVES", dict(defenses.OBJECTIVES))
    monkeypatch.setattr(defenses, "OBJECTIVES", defenses.base.OBJECTIVES)
    monkeypatch.setattr(defenses.base, "EDITORS", dict(defenses.EDITORS))
    monkeypatch.setattr(defenses, "EDITORS", defenses.base.EDITORS)

    @attacks.register("toy-top1")
    @dataclass
    class ToyTop1(attacks.LensAttack):
        """Is the answer the lens's top-1 token at the last layer? B = 1."""

        k: int = 1

        def default_layers(self, n_layers):
            return [n_layers - 1]

        def n_lists(self, n_layers):
            return 1

        def best_rank(self, lens, n_layers):
            return lens.ranks[:, -1]

    @defenses.register_objective("toy-logprob")
    @dataclass
    class ToyLogprob(defenses.Objective):
        """Minimise the answer's mean log-probability (nats)."""

        def loss(self, inputs):
            return torch.stack([lp.mean() for lp in inputs.seq_logprobs]).mean()

    yield ToyTop1, ToyLogprob


def test_toy_attack_and_objective_reach_cli_grid_and_report(toys, tiny_llama, tmp_path):
    from probe.cli import build_parser

    assert "toy-top1" in attacks.attack_names() and "toy-logprob" in defenses.OBJECTIVES
    del build_parser  # the CLI validates names against the registries (below)
    cfg = GridConfig(defenses=["toy-logprob"], attacks=["head-projection", "toy-top1"],
                     editor_config=dict(layer=0, lr=5e-2, norm_bound=1.0, steps=2), known_rank=10 ** 6, random_n=1,
                     acc_tokens=2, progress=False)
    grid = run_grid(tiny_llama, FACTS, tmp_path / "g", cfg)
    cell = grid.cell("toy-logprob", "toy-top1")
    assert cell is not None and cell.budget == 1 and cell.kind == "whitebox" and cell.n_facts == 3
    units = [json.loads(x) for x in (tmp_path / "g" / "units.jsonl").read_text().splitlines()]
    # the toy outcome is the answer's rank at the output, exactly as the unit's own readout says
    for u in units:
        post = u["outcomes"]["toy-top1"]["post"]
        assert post["best_rank"] == u["post"]["rank"][-1] and post["success"] == (u["post"]["rank"][-1] == 1)
    html = (tmp_path / "g" / "report.html").read_text()
    assert "toy-top1" in html and "toy-logprob" in html
