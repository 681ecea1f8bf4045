"""Issue 17: every attack and every defense on a researcher's own small facts file.

A tiny random Llama (256 positions, so the jailbreak preambles fit) saved to disk, and facts files
of 1, 2, 5 and 30 facts written as a user would (no relations; prompts in the tiny tokenizer's
words). Each cell of the attack x defense grid either runs and writes complete results, or is
refused up front in one line with nothing written; every metric and attack records the pool of
other facts it drew from (:mod:`probe.pool`): the file's other facts (leave-one-out), topped up
with the built-in facts where those are too few.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from probe.cli import main
from probe.pool import FILE, TOPPED_UP

CITIES = ["Paris", "Tokyo", "Rome", "Berlin", "Madrid", "Rio"]
PLACES = ["France", "Japan", "Italy", "Germany", "Spain", "Brazil"]
TEXT_ATTACKS = ["head-projection", "probability-delta", "pd2", "question-rephrase", "jailbreak", "relearning",
                "tuned-lens", "linear-probe"]
DEFENSES = ["fact-erasure", "empty-response", "error-injection", "head-projection", "max-entropy",
            "input-rephrasing"]
FAST = ["--known-rank", "100000", "--steps", "2", "--acc-tokens", "2", "--gen-tokens", "4", "--bb-tokens", "4",
        "--relearn-epochs", "1", "--quiet"]
#: the only reasons an attack may skip a fact of these files
SKIP_REASONS = {"answer has < 2 training examples", "answer in input"}


def user_facts(n: int, n_answers: int | None = None) -> list[dict]:
    """``n`` facts as a user would write them: id, prompt, answer, a paraphrase, a neighbour, a
    subject; the answers cycle through ``n_answers`` cities (all different when None)."""
    out = []
    for i in range(n):
        place = PLACES[i % len(PLACES)]
        answer = CITIES[i % (n_answers or len(CITIES))] if n_answers else f"{CITIES[i % len(CITIES)]} {i}"
        out.append({"id": f"mine-{i}", "prompt": f"The capital of {place} number {i} is", "answer": answer,
                    "paraphrases": [f"{place} {i}: the capital is"], "subject": f"{place} number {i}",
                    "neighborhood": [{"prompt": f"The city of {place} {i} is in", "answer": place}]})
    return out


def write_facts(path: Path, facts: list[dict]) -> Path:
    path.write_text("".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny, tiny_tokenizer) -> Path:
    """The tiny random Llama with 256 positions, saved as an HF directory, and its tuned lens
    trained (3 steps) into a module cache, so the tuned-lens attack loads it."""
    import probe
    from probe.lens_training import get_tuned_lens

    d = tmp_path_factory.mktemp("tiny-llama-256")
    make_tiny("llama", max_position_embeddings=256).hf.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    mp = pytest.MonkeyPatch()
    mp.setenv("PROBE_ATTACK_CACHE", str(tmp_path_factory.mktemp("cache")))
    get_tuned_lens(probe.load_model(str(d)), steps=3, minutes=None, train_tokens=512, heldout_tokens=64,
                   adam_tokens=128, seq_len=16, batch=8, exclude=[])
    yield d
    mp.undo()


@pytest.fixture
def cli(model_dir, capsys):
    def _call(command: str, *args: str):
        capsys.readouterr()
        rc = main([command, "--model", str(model_dir), *args])
        out, err = capsys.readouterr()
        return rc, out, err
    return _call


def units_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_every_attack_and_defense_runs_on_a_file_of_n_facts(cli, tmp_path, n):
    path = write_facts(tmp_path / "mine.jsonl", user_facts(n))
    out = tmp_path / "grid"
    rc, _, err = cli("grid", "--facts", str(path), "--out", str(out), "--attacks", ",".join(TEXT_ATTACKS),
                     "--defenses", ",".join(DEFENSES), *FAST)
    assert rc == 0, err
    grid = json.loads((out / "grid.json").read_text())
    assert grid["complete"] and grid["n_facts"] == n
    units = units_of(out)
    assert len(units) == n * len(DEFENSES) and not [u["error"] for u in units if u["error"]]
    for c in grid["cells"]:  # every fact is scored or skipped for a counted reason
        assert c["n_facts"] + c["n_skipped"] == n, c
    reasons = Counter(o["post"]["skipped"] for u in units for o in u["outcomes"].values() if o["post"]["skipped"])
    assert set(reasons) <= SKIP_REASONS, reasons
    # relearning always finds data: the other facts of the file, topped up with built-in known facts
    assert all(not u["outcomes"]["relearning"]["post"]["skipped"] for u in units)
    relearn = [u["outcomes"]["relearning"]["post"]["details"] for u in units]
    assert all(len(d["relearn_data"]) == 16 for d in relearn)  # the attack's n_examples, always reached
    if n < 17:  # fewer than 16 other facts: topped up (with 30, the tiny model "never knew" some of them)
        assert {d["pool"]["source"] for d in relearn} == {TOPPED_UP}
    # every metric says where its pool came from; the error-injection target too
    for u in units:
        assert set(u["pools"]) == {"control", "random", "retain", "retention"} | (
            {"target"} if u["defense"] == "error-injection" else set()), u["pools"]
        src = {k: v["source"] for k, v in u["pools"].items()}
        if n == 1:  # nothing else in the file: every pool is the built-in facts
            assert set(src.values()) == {TOPPED_UP}
        if n == 30:  # 29 other facts: enough for a control, 10 random facts, 4 retain prompts, a target
            assert src["control"] == src["random"] == src["retain"] == FILE
            assert src.get("target", FILE) == FILE
            assert src["retention"] == TOPPED_UP and u["pools"]["retention"]["size"] > 29  # < 50 known: topped up
        assert u["pools"]["retain"]["size"] == 4 and u["pools"]["random"]["size"] >= 10
    summary = grid["pools"]["metrics"]
    assert sum(summary["control"].get(s, 0) for s in (FILE, TOPPED_UP)) == len(units)
    assert set(grid["pools"]["attacks"]) >= {"relearning", "linear-probe"}


def test_run_on_one_fact_with_every_attack_deletes_it_and_scores_controls(cli, tmp_path):
    """The issue's case at its smallest: `run` on a file of one fact with every text attack (before,
    error injection had no other answer to inject and the probe and relearning nothing to train on)."""
    path = write_facts(tmp_path / "one.jsonl", user_facts(1))
    out = tmp_path / "run"
    rc, _, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", ",".join(TEXT_ATTACKS),
                     "--defense", "error-injection", *FAST)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["defense"]["n_deleted"] == 1 and res["defense"]["n_failed"] == 0
    fact = json.loads((out / "per_fact.jsonl").read_text().splitlines()[0])
    assert fact["control_source"] == "built-in" and fact["control"]
    assert fact["scores"]["target"] and fact["scores"]["target"] != fact["answer"]
    assert fact["pools"]["target"]["source"] == TOPPED_UP
    assert fact["scores"]["retention_n"] >= 50 and fact["scores"]["random_delta_acc"] is not None
    assert res["attacks"]["relearning"]["n_facts"] == 1
    lp = fact["outcomes"]["linear-probe"]["post"]
    assert lp["details"]["pool"]["source"] == TOPPED_UP  # nothing else in the file to train on
    assert res["pools"]["metrics"]["retention"] == {FILE: 0, TOPPED_UP: 1, "size_min": fact["pools"][
        "retention"]["size"], "size_max": fact["pools"]["retention"]["size"]}


def test_linear_probe_and_relearning_train_on_the_other_facts_of_the_file(cli, tmp_path):
    """Leave-one-out: deleting one fact at a time, the probe trains on the file's 39 other facts
    (4 answers x 10), so every fact is scored; before, it trained on no fact the run deleted, and
    `run` deletes every fact, so every fact was skipped."""
    path = write_facts(tmp_path / "forty.jsonl", user_facts(40, n_answers=4))
    out = tmp_path / "run"
    rc, _, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", "linear-probe,relearning",
                     "--max-facts", "3", *FAST)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert (res["attacks"]["linear-probe"]["n_facts"], res["attacks"]["linear-probe"]["n_skipped"]) == (3, 0)
    for line in (out / "per_fact.jsonl").read_text().splitlines():
        f = json.loads(line)
        for phase in ("pre", "post"):
            d = f["outcomes"]["linear-probe"][phase]["details"]
            assert d["pool"] == {"source": FILE, "size": 39} and d["n_train"] == 39
        r = f["outcomes"]["relearning"]["post"]["details"]
        assert len(r["relearn_data"]) == 16 and f["prompt"] not in r["relearn_data"]


def test_all_at_once_on_one_fact_takes_retain_prompts_and_target_from_the_built_in_facts(cli, tmp_path):
    path = write_facts(tmp_path / "one.jsonl", user_facts(1))
    out = tmp_path / "run"
    rc, _, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", "head-projection",
                     "--defense", "error-injection", "--protocol", "all-at-once", *FAST)
    assert rc == 0, err
    fact = json.loads((out / "per_fact.jsonl").read_text().splitlines()[0])
    assert fact["error"] is None and fact["scores"]["target"]


def test_a_relation_known_to_the_built_in_facts_gets_a_built_in_control(cli, tmp_path):
    facts = user_facts(2)
    facts[0]["relation"], facts[1]["relation"] = "capital", "my-own-relation"
    path = write_facts(tmp_path / "rel.jsonl", facts[:1])
    out = tmp_path / "run"
    rc, _, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", "head-projection", *FAST)
    assert rc == 0, err
    fact = json.loads((out / "per_fact.jsonl").read_text().splitlines()[0])
    builtin_capitals = {json.loads(x)["answer"] for x in
                        (Path(__file__).resolve().parents[3] / "probe/data/builtin_facts.jsonl").read_text().splitlines()
                        if json.loads(x).get("relation") == "capital"}
    assert fact["control_source"] == "built-in" and fact["control"] in builtin_capitals
    # a relation nobody else has: refused before anything is written, in one line
    path = write_facts(tmp_path / "own.jsonl", facts[1:])
    out = tmp_path / "refused"
    rc, stdout, err = cli("run", "--facts", str(path), "--out", str(out), *FAST)
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("Loading weights")]
    assert rc == 2 and len(lines) == 1 and "own.jsonl:1" in lines[0] and "relation" in lines[0], lines
    assert not out.exists()


def test_an_attack_prompt_too_long_for_the_context_is_refused_up_front(cli, tmp_path):
    """The jailbreak preamble (~130 tokens here) plus 200 sampled tokens exceed the 256 positions:
    refused before any output is written (before, the run stopped half-written)."""
    path = write_facts(tmp_path / "mine.jsonl", user_facts(2))
    out = tmp_path / "run"
    rc, stdout, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", "jailbreak",
                          *FAST, "--bb-tokens", "200")
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("Loading weights")]
    assert rc == 2 and len(lines) == 1, lines
    assert "mine.jsonl:1" in lines[0] and "jailbreak" in lines[0] and "--bb-tokens" in lines[0]
    assert not out.exists() and stdout == ""


@pytest.fixture(scope="module")
def flags30(tmp_path_factory):
    """30 built-in flag image facts (capital relation), rendered small, as loaded from disk."""
    from probe.facts import load_facts
    from probe.vlm.flags import COUNTRIES
    from probe.vlm.image_facts import write_builtin_image_facts

    path = write_builtin_image_facts(tmp_path_factory.mktemp("flags") / "set", countries=[c.name for c in COUNTRIES[:30]],
                                     relations=("capital",), n_per_strength=1, n_neighborhood_images=1, size=32)
    return load_facts(str(path))


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_image_attacks_and_every_defense_run_on_a_file_of_n_image_facts(tiny_vlm, flags30, tmp_path, n):
    """Image facts: the image attacks, the probe and relearning x every defense on files of 1, 2, 5
    and 30 flag facts (of the 30, three are deleted, to keep the test short; the pools are the
    whole file's). The probe's top-up is text facts, never used for an image fact."""
    from probe.jobs import GridConfig, run_grid

    attacks = ["head-projection", "image-rephrase", "multimodal-rephrase", "linear-probe", "relearning"]
    # of a file of 30, three facts are deleted (evenly spaced); the pools are the 30-fact file's
    cfg = GridConfig(defenses=DEFENSES, attacks=attacks, known_rank=10**6, progress=False, acc_tokens=2,
                     max_facts=3 if n == 30 else None,
                     gen_tokens=2, editor_config={"steps": 2},
                     attack_config={"image-rephrase": {"max_new_tokens": 2}, "multimodal-rephrase": {"max_new_tokens": 2},
                                    "relearning": {"epochs": 1}})
    grid = run_grid(tiny_vlm, flags30[:n], tmp_path / "grid", cfg, facts_label="flags").to_dict()
    k = min(n, 3) if n == 30 else n
    assert grid["complete"] and grid["n_facts"] == k
    units = units_of(tmp_path / "grid")
    assert len(units) == k * len(DEFENSES) and not [u["error"] for u in units if u["error"]]
    for c in grid["cells"]:
        assert c["n_facts"] + c["n_skipped"] == k, c
    assert all(not u["outcomes"][a]["post"]["skipped"] for u in units for a in ("image-rephrase", "relearning"))
    lp = [u["outcomes"]["linear-probe"]["post"] for u in units]
    assert all(o["details"]["pool"]["source"] == FILE for o in lp)  # image facts: no text top-up
    if n < 5:  # each capital once: no answer has 2 training examples
        assert all(o["skipped"] == "answer has < 2 training examples" for o in lp)
    assert all(u["pools"]["control"]["source"] == (TOPPED_UP if n == 1 else FILE) for u in units)


@pytest.mark.parametrize("editor", ["lora", "rome"])
def test_the_other_editors_delete_the_only_fact_of_a_file(cli, tmp_path, editor):
    """LoRA and ROME on a file of one fact: their retain prompts and the error-injection target come
    from the built-in facts; the edit runs and is scored."""
    path = write_facts(tmp_path / "one.jsonl", user_facts(1))
    out = tmp_path / "run"
    i = FAST.index("--steps")
    fast = FAST[:i] + FAST[i + 2:] if editor == "rome" else FAST  # ROME has v* steps, no --steps
    rc, _, err = cli("run", "--facts", str(path), "--out", str(out), "--attacks", "head-projection,relearning",
                     "--defense", "error-injection", "--editor", editor, *fast)
    assert rc == 0, err
    fact = json.loads((out / "per_fact.jsonl").read_text().splitlines()[0])
    assert fact["error"] is None and fact["edit"]["max_abs_change"] > 0
    assert fact["pools"]["retain"] == {"source": TOPPED_UP, "size": 4} and fact["pools"]["target"]["source"] == TOPPED_UP
