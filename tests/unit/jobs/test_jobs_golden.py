"""The one deletion loop: ``run`` and ``grid`` give the numbers they gave before they shared it, and
agree with each other on every shared metric.

``tests/data/golden_tiny_before_jobs.json`` was written by the code *before* the deletion loop was
unified (``probe/pipeline.py`` and ``probe/grid.py``), on a tiny Llama taught 13 facts (seeded),
with constrained fine-tuning: grid cells of 4 defenses x 6 attacks and the run's summaries and
per-fact scores. Random Δ-Acc is new in ``run``; the grid's per-layer median is now the true
median (it was the upper median), so per-layer medians are compared through the per-fact ranks.
The error-injection target of a fact without ``alt_answer`` used to share its random stream with
the retain-prompt draw (``"{seed}:{fact_id}"``); it now has its own (:mod:`probe.seeds`), so the
comparison runs with the old key for that one draw. Issue 12 made the retain prompts leak-free
(:mod:`defenses.retain`), a change of the loop's *input*; the comparison runs with the selection
the golden file was written with. Issue 17 changed the linear probe's training pool
(leave-one-out), so its cells are compared between run and grid only, like relearning's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probe.facts import Fact
from probe.jobs import GridConfig, RunConfig, run_grid, run_main
from probe.results import GridResult, RunResult

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "golden_tiny_before_jobs.json"

FACTS = [
    Fact("fr", "The capital of France is", "Paris", paraphrases=["Paris is the capital of"],
         neighborhood=[{"prompt": "The capital of Japan is", "answer": "Tokyo"}], alt_answer="Rome"),
    Fact("jp", "The capital of Japan is", "Tokyo", paraphrases=["Tokyo is the capital of"],
         neighborhood=[{"prompt": "The capital of France is", "answer": "Paris"}]),
    Fact("water", "Water is made of hydrogen and", "oxygen", neighborhood=[{"prompt": "The Colosseum is in",
                                                                          "answer": "Rome"}]),
    Fact("eiffel", "The Eiffel Tower is located in the city of", "Paris", paraphrases=["The city of the Eiffel Tower is"]),
    Fact("berlin", "Berlin is in", "Germany", neighborhood=[{"prompt": "Madrid is in", "answer": "Spain"}]),
    Fact("madrid", "Madrid is in", "Spain"), Fact("rome", "The Colosseum is in", "Rome"),
    Fact("paris2", "Paris is the capital of", "France"), Fact("tokyo2", "Tokyo is the capital of", "Japan"),
    Fact("rio", "The city famous for its Carnival in Brazil is", "Rio"), Fact("ger", "Germany has the city", "Berlin"),
    Fact("fr3", "The Eiffel Tower is in", "Paris"), Fact("jp3", "The capital city of Japan is", "Tokyo"),
]
ATTACKS = ["head-projection", "probability-delta", "pd2", "question-rephrase", "relearning", "linear-probe"]
DEFENSES = ["fact-erasure", "error-injection", "head-projection", "empty-response"]
#: attacks rebuilt since the golden file was written (issue 11 item 6: relearning is LoRA on every
#: layer's MLP; issue 17: one fact at a time, the linear probe trains on every other fact of the
#: file, leave-one-out, where it used to leave out every evaluated fact), so their cells are not
#: compared with it; run and grid must still agree on them
REBUILT = {"relearning", "linear-probe"}
# the code before skipped no fact whose answer is in the attack's input ("fr": "Paris is the capital of")
COMMON = dict(attacks=ATTACKS,
              attack_config={"question-rephrase": {"max_new_tokens": 4, "skip_answer_in_input": False}},
              editor_config=dict(layer=0, lr=5e-2, norm_bound=1.0, steps=4), known_rank=10 ** 6, max_facts=4,
              random_n=2, acc_tokens=2, progress=False)


def taught_tiny_llama(tokenizer):
    """A random tiny Llama (seed 0) taught the facts by 150 Adam steps (seeded, one thread)."""
    from conftest import teach_tiny_llama

    return teach_tiny_llama(tokenizer, FACTS)


def legacy_retain_prompts(fact, facts, size, *, sim_frac=0.5, seed=0):
    """The retain selection the golden file was written with (before issue 12's leak-free retain
    sets, :mod:`defenses.retain`): the pool prompts most similar to the fact's by word overlap."""
    from probe.seeds import RETAIN, fact_rng

    def words(text):
        w = text.lower().split()
        return set(w) | set(zip(w, w[1:]))

    if size <= 0:
        return []
    banned = {fact.prompt, *fact.paraphrases, *(n["prompt"] for n in fact.neighborhood)}
    pool = sorted({g.prompt for g in facts if g.id != fact.id}
                  | {n["prompt"] for g in facts if g.id != fact.id for n in g.neighborhood} - banned)
    if len(pool) <= size:
        return pool
    ref = words(fact.prompt)
    n_sim = int(round(size * sim_frac))
    similar = sorted(pool, key=lambda p: (-len(ref & words(p)) / (1 + len(words(p))), p))[:n_sim]
    rest = [p for p in pool if p not in set(similar)]
    return similar + fact_rng(seed, RETAIN, fact.id).sample(rest, size - n_sim)


@pytest.fixture(scope="module")
def jobs(tiny_tokenizer, tmp_path_factory):
    import defenses.editor
    from probe import seeds
    from probe.jobs import deletion as deletion_mod

    model = taught_tiny_llama(tiny_tokenizer)
    out = tmp_path_factory.mktemp("jobs")
    legacy = dict(seeds._LEGACY_KEYS)
    seeds._LEGACY_KEYS[seeds.ERROR_TARGET] = "{seed}:{fact_id}"  # the draw before it got its own stream
    mp = pytest.MonkeyPatch()
    # the golden numbers' retain prompts (inputs of the loop, not the loop)
    mp.setattr(deletion_mod, "retain_prompts", legacy_retain_prompts)
    # the golden edits predate stable updates (issue 12 item 2): with lr 5e-2 two of them have a
    # retain KL of 2.3-2.4 nats, which the loop now rejects; an infinite cap accepts every finite
    # update, i.e. the loop as it was (its extra measuring pass changes no weight)
    mp.setattr(defenses.editor, "RETAIN_KL_CAP", float("inf"))
    try:
        grid = run_grid(model, FACTS, out / "grid", GridConfig(defenses=DEFENSES, **COMMON))
        run = run_main(model, FACTS, out / "run", RunConfig(**COMMON))
    finally:
        mp.undo()
        seeds._LEGACY_KEYS.clear()
        seeds._LEGACY_KEYS.update(legacy)
    return grid, run, out


#: attacks whose scoring changed by design after the golden file was written: issue 11 item 5
#: (per-relation probes that skip answers with < 2 training examples); their attack numbers are
#: checked on their own, their defense metrics still against the golden file
REDESIGNED = {"linear-probe"}
ATTACK_KEYS = {"success_pre", "success_post", "n_facts", "n_skipped"}


def _close(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-6)
    return a == b


def test_grid_cells_unchanged_by_the_shared_loop(jobs):
    grid, _, out = jobs
    golden = json.loads(GOLDEN.read_text())
    cells = {(c["defense"], c["attack"]): c for c in grid.to_dict()["cells"]}
    assert len(cells) == len(golden["grid_cells"]) == 24
    for old in golden["grid_cells"]:
        if old["attack"] in REBUILT:
            continue
        new = cells[(old["defense"], old["attack"])]
        for k, v in old.items():
            if old["attack"] in REDESIGNED and k in ATTACK_KEYS:
                continue
            assert _close(new[k], v), (old["defense"], old["attack"], k, new[k], v)
        if old["attack"] == "linear-probe":  # no answer of the 4 deleted facts has 2 of the 9 others' answers
            assert (new["n_facts"], new["n_skipped"], new["success_pre"]) == (0, 4, None)
    # the written grid.json loads back into the same typed result
    assert GridResult.load(out / "grid").to_dict()["cells"] == grid.to_dict()["cells"]


def test_run_unchanged_by_the_shared_loop(jobs):
    _, run, out = jobs
    golden = json.loads(GOLDEN.read_text())
    for name, old in golden["run_attacks"].items():
        if name in REBUILT:
            continue
        a = run.attacks[name]
        if name in REDESIGNED:
            continue
        assert (a.success_pre, a.success_post, a.budget) == (old["success_pre"], old["success_post"], old["budget"])
    for k, v in golden["run_defense"].items():
        if k in ("edit_parameter", "editor_config", "name", "editor", "protocol", "n_deleted") or v is None:
            assert v is None or run.defense[k] == v, k
        else:
            assert _close(run.defense[k], v), (k, run.defense[k], v)
    by_id = {f.id: f for f in run.facts}
    for old in golden["run_per_fact"]:
        f = by_id[old["id"]]
        assert f.pre.rank == old["pre_rank"] and f.post.rank == old["post_rank"]
        for k in ("rewrite_score", "paraphrase_score", "neighborhood_score", "p_pre", "p_post"):
            assert _close(getattr(f.scores, k), old["scores"][k]), (f.id, k)
    loaded = RunResult.load(out / "run")
    assert loaded.summary_json() == json.loads((out / "run" / "results.json").read_text())
    assert [f.to_json() for f in loaded.facts] == [f.to_json() for f in run.facts]


def test_run_and_grid_agree_on_every_shared_metric(jobs):
    grid, run, _ = jobs
    cells = {c.name: c for c in grid.cells if c.defense == "fact-erasure"}
    assert run.defense["random_delta_acc"] is not None  # run now measures random Δ-Acc too
    for name, a in run.attacks.items():
        c = cells[name]
        assert (a.success_pre, a.success_post, a.budget, a.n_facts) == (c.success_pre, c.success_post, c.budget,
                                                                        c.n_facts), name
    for k, v in cells["head-projection"].scores.items():
        assert _close(run.defense[k], v) if v is not None else run.defense[k] is None, k
