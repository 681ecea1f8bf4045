"""``probe-attack calibrate`` (matched damage, issue 12 item 3) on a tiny Llama taught 13 facts:
the strongest rung within the damage target is chosen, the search stops at the first rung that
breaks it, an interrupted calibration resumes from its log, the chosen settings reach ``run`` and
``grid`` (explicit flags still win), and calibration facts never become evaluation facts."""

from __future__ import annotations

import json

import pytest

import probe.jobs.calibrate as calmod
from defenses.constrained_ft import ConstrainedFineTune
from probe.jobs import RunConfig, build_plan, evenly_spaced, known_facts
from probe.jobs.calibrate import (CalibrateConfig, Calibration, calibrate, calibration_facts, load_calibration,
                                  meets)
from probe.jobs.deletion import attack_context
from probe.results import FactResult

from test_jobs_golden import FACTS, taught_tiny_llama

#: weakest first: no edit at all, a small one, one far past any damage target, one never measured
LADDER = ({"norm_bound": 1e-7, "lr": 1e-7}, {"norm_bound": 1e-4, "lr": 1e-4}, {"norm_bound": 5.0, "lr": 0.5},
          {"norm_bound": 10.0, "lr": 1.0})
EDIT = {"layer": 0, "steps": 6, "early_stop": None}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return taught_tiny_llama(tiny_tokenizer)


@pytest.fixture
def ladder(monkeypatch):
    monkeypatch.setattr(ConstrainedFineTune, "calibration_ladder", LADDER)


def config(**over) -> CalibrateConfig:
    return CalibrateConfig(**{"objectives": ["fact-erasure"], "n_facts": 3, "known_rank": 10 ** 6, "progress": False,
                              "editor_config": dict(EDIT), "acc_tokens": 2, **over})


def test_midpoints_never_collide_with_the_evenly_spaced_evaluation_facts():
    for size in range(2, 80):
        items = list(range(size))
        for n in range(1, size // 2 + 1):
            cal = calibration_facts(items, n)
            assert len(cal) == len(set(cal)) == n
            assert not set(cal) & set(evenly_spaced(items, n)), (size, n)
    assert calibration_facts([1, 2], 5) == [1, 2]


def test_chooses_the_strongest_rung_within_the_target_and_stops_at_the_first_breach(model, ladder, tmp_path):
    cal = calibrate(model, FACTS, config(), out=tmp_path)
    oc = cal.objectives["fact-erasure"]
    measured = [r.settings["norm_bound"] for r in oc.rungs]
    # recompute every rung's damage from the logged units (not from the code's summary)
    units = [json.loads(x) for x in (tmp_path / "units.jsonl").read_text().splitlines()]
    by_bound: dict[float, list] = {}
    for u in units:
        by_bound.setdefault(u["settings"]["norm_bound"], []).append(FactResult.from_json(u["unit"]).scores)
    assert sorted(by_bound) == sorted(measured)
    verdicts = []
    for b in measured:
        s = by_bound[b]
        assert len(s) == 3
        nb = sum(x.neighborhood_score for x in s) / 3
        rd = sum(x.retention_drop for x in s) / 3
        verdicts.append(nb >= 0.9 and rd <= 0.02)
    assert [r.met for r in oc.rungs] == verdicts
    # the no-op rung leaves every neighbour and known fact as it was; the huge one breaks the target
    assert verdicts[0] is True and oc.rungs[0].neighborhood == pytest.approx(1.0, abs=1e-4)
    assert oc.rungs[0].retention_drop == 0.0
    assert False in verdicts and verdicts.index(False) == len(verdicts) - 1  # stopped at the first breach
    assert 10.0 not in measured
    assert oc.met and oc.settings == oc.rungs[verdicts.index(False) - 1].settings
    assert cal.complete and len(cal.facts) == 3
    assert Calibration.load(tmp_path / "calibration.json").settings() == cal.settings()


def test_interrupted_calibration_resumes_without_recomputing(model, ladder, tmp_path, monkeypatch):
    first = calibrate(model, FACTS, config(), out=tmp_path)
    calls = []
    real = calmod.measure_deletion
    monkeypatch.setattr(calmod, "measure_deletion", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = calibrate(model, FACTS, config(), out=tmp_path)
    assert calls == []
    assert again.settings() == first.settings()
    assert [r.neighborhood for r in again.objectives["fact-erasure"].rungs] == \
        [r.neighborhood for r in first.objectives["fact-erasure"].rungs]


def test_nothing_meets_an_impossible_target_then_the_weakest_is_used(model, ladder, tmp_path):
    cal = calibrate(model, FACTS, config(min_neighborhood=1.01), out=tmp_path)
    oc = cal.objectives["fact-erasure"]
    # the ladder's first rung, then 4 halvings below it (constrained FT's descent); the weakest is used
    assert not oc.met and len(oc.rungs) == 5 and oc.settings == oc.rungs[0].settings
    assert oc.settings["norm_bound"] == pytest.approx(1e-7 / 16)


def test_calibrated_settings_reach_the_job_and_explicit_settings_win(model, ladder, tmp_path):
    cal = calibrate(model, FACTS, config(), out=tmp_path)
    chosen = cal.settings()["fact-erasure"]["norm_bound"]
    rec = cal.job_record("test")
    cfg = RunConfig(defense="fact-erasure", calibration=rec, known_rank=10 ** 6, progress=False)
    _, editor = build_plan(model, [], ["fact-erasure"], cfg).defenses["fact-erasure"]
    assert editor.norm_bound == chosen
    cfg.editor_config = {"norm_bound": 0.123}
    _, editor = build_plan(model, [], ["fact-erasure"], cfg).defenses["fact-erasure"]
    assert editor.norm_bound == 0.123
    cfg.editor = "lora"
    with pytest.raises(ValueError, match="calibration is for editor 'constrained-ft'"):
        build_plan(model, [], ["fact-erasure"], cfg)


def test_calibration_facts_are_left_out_of_the_evaluation(model, ladder, tmp_path):
    cal = calibrate(model, FACTS, config(), out=tmp_path)
    cfg = RunConfig(calibration=cal.job_record("test"), known_rank=10 ** 6, progress=False)
    plan = build_plan(model, ["head-projection"], [], cfg)
    plan.pool = FACTS
    kept, n_known = known_facts(model, FACTS, plan, cfg, attack_context(plan, [], cfg))
    keys = {tuple(k) for k in cal.facts}
    assert n_known == len(FACTS) and plan.n_calibration_excluded == 3
    assert len(kept) == len(FACTS) - 3
    assert not {(str(f.prompt).strip(), f.answer.strip()) for f, _, _ in kept} & keys


def test_load_calibration_ignores_an_incomplete_or_foreign_file(model, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path))
    monkeypatch.setattr(calmod, "SHIPPED", tmp_path / "none")
    assert load_calibration(model, "constrained-ft") is None
    d = calmod.calibration_dir(model, "constrained-ft")
    d.mkdir(parents=True)
    cal = Calibration(model.name, model.fingerprint, "constrained-ft", 0.9, 0.02, [], "x")
    (d / "calibration.json").write_text(cal.to_json())
    assert load_calibration(model, "constrained-ft") is None  # not complete
    cal.complete = True
    (d / "calibration.json").write_text(cal.to_json())
    found, path = load_calibration(model, "constrained-ft")
    assert path == str(d / "calibration.json") and found.editor == "constrained-ft"
    assert load_calibration(model, "lora") is None


def test_meets_needs_every_edit_and_both_metrics():
    r = calmod.Rung({}, n=3, neighborhood=0.95, retention_drop=0.01)
    cfg = CalibrateConfig()
    assert meets(r, cfg)
    assert not meets(calmod.Rung({}, n=3, n_failed=1, neighborhood=0.95, retention_drop=0.01), cfg)
    assert not meets(calmod.Rung({}, n=3, neighborhood=0.89, retention_drop=0.01), cfg)
    assert not meets(calmod.Rung({}, n=3, neighborhood=0.95, retention_drop=0.03), cfg)
    assert not meets(calmod.Rung({}, n=3, neighborhood=0.95, retention_drop=None), cfg)


def test_below_the_ladder_when_its_weakest_rung_breaks_the_target(model, monkeypatch, tmp_path):
    """Constrained FT steps below its ladder (bound and lr halved, at most 4 times) when the first
    rung already breaks the target (Gemma-3-270M at ±5e-4): here the ladder starts with an edit far
    past any target, and the first halving that meets it is chosen; rungs are listed weakest first."""
    monkeypatch.setattr(ConstrainedFineTune, "calibration_ladder", ({"norm_bound": 5.0, "lr": 0.5},))
    monkeypatch.setattr(ConstrainedFineTune, "calibration_max_descent", 30)
    cal = calibrate(model, FACTS, config(), out=tmp_path)
    oc = cal.objectives["fact-erasure"]
    bounds = [r.settings["norm_bound"] for r in oc.rungs]
    assert bounds == sorted(bounds) and bounds[-1] == 5.0 and not oc.rungs[-1].met
    assert all(b2 == pytest.approx(2 * b1) for b1, b2 in zip(bounds, bounds[1:]))  # halvings
    assert oc.met and oc.rungs[0].met and not any(r.met for r in oc.rungs[1:])  # stopped at the first that meets
    assert oc.settings == oc.rungs[0].settings
    assert oc.settings["lr"] == pytest.approx(oc.settings["norm_bound"] / 10)


def test_the_descent_is_bounded(model, monkeypatch, tmp_path):
    monkeypatch.setattr(ConstrainedFineTune, "calibration_ladder", ({"norm_bound": 5.0, "lr": 0.5},))
    cal = calibrate(model, FACTS, config(), out=tmp_path)  # 4 halvings: 0.3125 still breaks the target
    oc = cal.objectives["fact-erasure"]
    assert [r.settings["norm_bound"] for r in oc.rungs] == [0.3125, 0.625, 1.25, 2.5, 5.0]
    assert not oc.met and oc.settings["norm_bound"] == 0.3125


@pytest.mark.parametrize("editor, knob, start, extra", [
    ("lora", "lr", 1e-2, {"layer": 0}),
    ("rome", "clamp_norm_factor", 0.5, {"layer": 0, "v_steps": 2, "context_prefixes": ()}),
])
def test_lora_and_rome_descend_below_their_ladders_too(model, tmp_path, editor, knob, start, extra):
    """An impossible target: LoRA halves its lr and ROME its clamp below the ladder's first rung, 4
    times, and the weakest measured setting is used (the first rung records only the ladder's keys:
    LoRA's lr there is the default)."""
    import dataclasses

    facts = FACTS if editor == "lora" else [dataclasses.replace(f, subject=f.prompt.split()[-2]) for f in FACTS]
    cal = calibrate(model, facts, config(editor=editor, min_neighborhood=1.01, editor_config=extra), out=tmp_path)
    oc = cal.objectives["fact-erasure"]
    values = [r.settings.get(knob, start) for r in oc.rungs]
    assert values == pytest.approx([start / 16, start / 8, start / 4, start / 2, start])
    assert not oc.met and oc.settings[knob] == pytest.approx(start / 16)
