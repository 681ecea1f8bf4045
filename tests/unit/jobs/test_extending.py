"""docs/extending.md in practice: a toy attack, objective and editor, each registered in one place,
show up in the CLI, the grid and the report without touching anything else."""

from __future__ import annotations

import contextlib
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
def toys():
    """Register a toy attack, objective and editor (removed from the registries afterwards)."""
    registries = (attacks.ATTACKS, defenses.OBJECTIVES, defenses.EDITORS)
    before = [set(r) for r in registries]

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

    @defenses.register_editor("toy-sgd")
    @dataclass
    class ToySGD(defenses.Editor):
        """Plain SGD on the edit layer's MLP output weight, no clamp, no retain term."""

        layer: int | None = None
        layer_frac: float = 0.0
        early_stop: float | str | None = None
        steps: int = 3
        lr: float = 0.5

        @contextlib.contextmanager
        def _run(self, session, objective, request):
            from defenses.editor import Steps
            from defenses.forward import objective_step_loss, prepare
            from probe.model import only_trainable

            model, param = session.model, session.param
            prep = prepare(model, objective, request, retain=False)
            opt = torch.optim.SGD([param], lr=self.lr)

            def loss(step):
                return objective_step_loss(model, prep, objective, None, 0.0)

            with only_trainable(model, [param]), torch.enable_grad():
                yield Steps(self.steps, loss, opt.step, [param], opt)

    yield ToyTop1, ToyLogprob, ToySGD
    for registry, keys in zip(registries, before):
        for name in set(registry) - keys:
            del registry[name]


def test_toy_attack_objective_and_editor_reach_the_grid_and_report(toys, tiny_llama, tmp_path):
    assert "toy-top1" in attacks.attack_names() and "toy-logprob" in defenses.OBJECTIVES
    cfg = GridConfig(defenses=["toy-logprob"], attacks=["head-projection", "toy-top1"], editor="toy-sgd",
                     known_rank=10 ** 6, random_n=1, acc_tokens=2, progress=False)
    grid = run_grid(tiny_llama, FACTS, tmp_path / "g", cfg)
    cell = grid.cell("toy-logprob", "toy-top1")
    assert cell is not None and cell.budget == 1 and cell.kind == "whitebox" and cell.n_facts == 3
    assert cell.editor == "toy-sgd" and cell.n_failed == 0
    units = [json.loads(x) for x in (tmp_path / "g" / "units.jsonl").read_text().splitlines()]
    # the toy outcome is the answer's rank at the output, exactly as the unit's own readout says
    for u in units:
        post = u["outcomes"]["toy-top1"]["post"]
        assert post["best_rank"] == u["post"]["rank"][-1] and post["success"] == (u["post"]["rank"][-1] == 1)
        assert u["edit"]["steps"] == 4 and u["edit"]["parameter"]  # 3 updates, each measured == "model.layers.0.mlp.down_proj.weight"
        assert u["edit"]["max_abs_change"] > 0  # the toy editor really edits
    html = (tmp_path / "g" / "report.html").read_text()
    assert "toy-top1" in html and "toy-logprob" in html


def test_toy_pieces_are_cli_choices(toys, make_tiny, tiny_tokenizer, tmp_path, capsys):
    from probe.cli import main

    d = tmp_path / "model"
    make_tiny("llama").hf.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": f.id, "prompt": f.prompt, "answer": f.answer, "paraphrases": [],
                                         "neighborhood": f.neighborhood}) + "\n" for f in FACTS))
    rc = main(["run", "--model", str(d), "--facts", str(facts), "--defense", "toy-logprob", "--editor", "toy-sgd",
               "--attacks", "toy-top1", "--known-rank", "1000", "--acc-tokens", "2", "--random-n", "1", "--quiet",
               "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "toy-top1" in out and "defense toy-logprob (toy-sgd, one-at-a-time), 3 facts deleted" in out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["attacks"]["toy-top1"]["budget"] == 1 and res["defense"]["editor"] == "toy-sgd"
