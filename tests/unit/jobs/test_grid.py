"""The attack x defense grid on a tiny model: cells, resume after a kill, failures, bad names."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import attacks
from attacks.base import ATTACKS, Attack, AttackOutcome
from probe.facts import Fact
from probe.jobs import PRE, UNITS, GridConfig, resolve_names, run_grid

FACTS = [
    Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of"],
         neighborhood=[{"prompt": "The capital of Japan is", "answer": "Tokyo"}], alt_answer="Rome"),
    Fact("jp", "The capital of Japan is", "Tokyo", neighborhood=[{"prompt": "The capital of France is", "answer": "Paris"}]),
    Fact("water", "Water is made of hydrogen and", "oxygen"),
]
CALLS: list[tuple[str, str]] = []


@dataclass
class StubAttack(Attack):
    """Succeeds iff the model's top output token for the prompt is the answer's first token
    (a tiny deterministic attack whose success the edit can change). Registered only while a
    test of this module runs (:func:`stub_registered`)."""

    name = "test-stub-attack"
    kind = "blackbox"

    def budget(self, n_layers):
        return 1

    def run(self, model, facts, ctx):
        from attacks import attack_readout

        reads = attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], [])
        for f in facts:
            CALLS.append((model.name, f.id))
        return [AttackOutcome(success=r.rank[-1] <= 1, budget=1, best_rank=r.rank[-1]) for r in reads]


@pytest.fixture(autouse=True)
def stub_registered(monkeypatch):
    """The stub attack in the global registry for one test, removed afterwards (it must not leak
    into other modules' "all attacks")."""
    monkeypatch.setitem(ATTACKS, StubAttack.name, StubAttack)


def test_the_stub_attack_leaves_the_registry_after_a_test(monkeypatch):
    assert ATTACKS["test-stub-attack"] is StubAttack
    monkeypatch.undo()  # what the end of every test does (the same monkeypatch as the fixture's)
    assert "test-stub-attack" not in ATTACKS and "head-projection" in attacks.attack_names()


def _cfg(**kw):
    base = dict(defenses=["fact-erasure", "error-injection"], attacks=["head-projection", "test-stub-attack"],
                editor_config=dict(layer=0, lr=5e-2, norm_bound=1.0, steps=4), known_rank=10 ** 6, random_n=2,
                acc_tokens=2, progress=False)
    base.update(kw)
    return GridConfig(**base)


def test_grid_writes_one_cell_per_defense_and_attack(tiny_llama, tmp_path):
    res = run_grid(tiny_llama, FACTS, tmp_path / "g", _cfg()).to_dict()
    cells = {(c["defense"], c["attack"]): c for c in res["cells"]}
    assert set(cells) == {(d, a) for d in ("fact-erasure", "error-injection")
                          for a in ("head-projection", "test-stub-attack")}
    hp = cells[("fact-erasure", "head-projection")]
    assert hp["budget"] == 4 * 2 and hp["n_facts"] == 3  # k=4 x the tiny model's 2 layers
    units = [json.loads(x) for x in (tmp_path / "g" / UNITS).read_text().splitlines()]
    assert len(units) == 6
    # the cell is the mean of the per-fact outcomes
    fe = [u for u in units if u["defense"] == "fact-erasure"]
    expect = sum(u["outcomes"]["test-stub-attack"]["post"]["success"] for u in fe) / 3
    assert cells[("fact-erasure", "test-stub-attack")]["success_post"] == pytest.approx(expect)
    # error injection reports the target-form rewrite score and its target, and raises p(target):
    # measured p(target) x150 (fr), x137 (jp), x2.4 (water); the rewrite score is floored at 2e-8,
    # so only water's (0.0056 = (0.0094 - 0.0038) / (1 - 0.0038)) is above the floor
    ei = {u["id"]: u["scores"] for u in units if u["defense"] == "error-injection"}
    assert ei["fr"]["target"] == "Rome"  # the fact's alt_answer
    assert all(s["target_p_post"] > 2 * s["target_p_pre"] for s in ei.values())
    assert ei["water"]["target_rewrite_score"] > 1e-3
    assert json.loads((tmp_path / "g" / "grid.json").read_text())["complete"] is True
    html = (tmp_path / "g" / "report.html").read_text()
    assert "grid-figure-0" in html and "error-injection" in html


def test_resume_recomputes_only_the_unfinished_fact(tiny_llama, tmp_path):
    out = tmp_path / "g"
    run_grid(tiny_llama, FACTS, out, _cfg())
    lines = (out / UNITS).read_text().splitlines(keepends=True)
    # simulate a kill while the last fact of the last defense was being written: torn line
    (out / UNITS).write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    CALLS.clear()
    with pytest.raises(Exception, match="already holds a grid"):
        run_grid(tiny_llama, FACTS, out, _cfg())
    res = run_grid(tiny_llama, FACTS, out, _cfg(), resume=True).to_dict()
    assert len(CALLS) == 1  # only the edited state of the one unfinished (defense, fact)
    assert len((out / UNITS).read_text().splitlines()) == 6
    assert len((out / PRE).read_text().splitlines()) == 3
    assert res["complete"]


def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path):
    out = tmp_path / "g"
    run_grid(tiny_llama, FACTS[:1], out, _cfg(defenses=["fact-erasure"]))
    with pytest.raises(Exception, match="settings differ.*editor_config"):
        run_grid(tiny_llama, FACTS[:1], out, _cfg(defenses=["fact-erasure"], editor_config=dict(layer=1)), resume=True)


def test_a_diverging_defense_skips_that_fact_and_the_grid_goes_on(tiny_llama, tmp_path, monkeypatch):
    import defenses
    from defenses.fact_erasure import FactErasure

    real = FactErasure.loss

    def flaky(self, inputs):
        loss = real(self, inputs)
        return loss * float("nan") if inputs.answer_first.numel() and CALLS_FLAG["nan"] else loss

    CALLS_FLAG = {"nan": True}
    monkeypatch.setattr(FactErasure, "loss", flaky)
    res = run_grid(tiny_llama, FACTS, tmp_path / "g", _cfg()).to_dict()
    cells = {(c["defense"], c["attack"]): c for c in res["cells"]}
    assert cells[("fact-erasure", "head-projection")]["n_failed"] == 3
    assert cells[("fact-erasure", "head-projection")]["n_facts"] == 0
    assert cells[("error-injection", "head-projection")]["n_facts"] == 3
    units = [json.loads(x) for x in (tmp_path / "g" / UNITS).read_text().splitlines()]
    assert all("nan" in u["error"] for u in units if u["defense"] == "fact-erasure")
    assert defenses.OBJECTIVES["fact-erasure"] is FactErasure


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown defense 'nope'; valid defenses: fact-erasure, empty-response"):
        resolve_names("fact-erasure,nope", "defense")
    with pytest.raises(ValueError, match="unknown attack 'hp'; valid attacks: head-projection"):
        resolve_names(["hp"], "attack")
    assert resolve_names("all", "defense")[:6] == ["fact-erasure", "empty-response", "error-injection",
                                                   "head-projection", "max-entropy", "input-rephrasing"]
    assert "test-stub-attack" in resolve_names("all", "attack") and "head-projection" in attacks.attack_names()


def test_cli_grid_bad_names_exit_2_and_write_nothing(tmp_path, capsys):
    from probe.cli import main

    out = tmp_path / "g"
    assert main(["grid", "--defenses", "fact-erasure,bogus", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown defense 'bogus'" in err and "max-entropy" in err and "Traceback" not in err
    assert main(["grid", "--attacks", "head-projection,bogus", "--out", str(out), "--quiet"]) == 2
    assert "unknown attack 'bogus'" in capsys.readouterr().err
    assert main(["grid", "--editor", "nope", "--out", str(out), "--quiet"]) == 2
    assert "valid editors: constrained-ft" in capsys.readouterr().err
    assert not out.exists()


def test_resume_says_how_much_was_finished(tiny_llama, tmp_path, capsys):
    out = tmp_path / "g"
    run_grid(tiny_llama, FACTS, out, _cfg())
    lines = (out / UNITS).read_text().splitlines(keepends=True)
    (out / UNITS).write_text("".join(lines[:-2]))  # the last two units were lost
    capsys.readouterr()
    run_grid(tiny_llama, FACTS, out, _cfg(progress=True), resume=True)
    assert "resuming: 4 of 6 (defense, fact) units already finished, not recomputed" in capsys.readouterr().err
