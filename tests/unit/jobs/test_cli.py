"""The ``probe-attack`` command line, end to end on a tiny random Llama saved to disk.

Every run goes through ``probe.cli.main([...])`` in-process (stdout/stderr via ``capsys``), plus
real subprocess calls of the installed ``probe-attack`` script for the exit status and the
absence of tracebacks. The tiny model knows nothing, so ``run`` uses ``--known-rank 1000`` to
keep every fact past the known-fact filter, and ``--steps 2`` to keep the edits short.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import probe
from defenses.constrained_ft import ConstrainedFineTune
from probe.cli import main
from probe.matching import answer_matches

ROOT = Path(__file__).resolve().parents[3]

# Prompts and answers use words of the tiny tokenizer's corpus (tests/conftest.py CORPUS).
FACTS = [
    {"id": "france", "prompt": "The capital of France is", "answer": "Paris",
     "paraphrases": ["The Eiffel Tower is located in the city of"],
     "neighborhood": [{"prompt": "The capital of Japan is", "answer": "Tokyo"}]},
    {"id": "japan", "prompt": "The capital of Japan is", "answer": "Tokyo",
     "paraphrases": ["Japan: the capital of Japan is"],
     "neighborhood": [{"prompt": "The capital of France is", "answer": "Paris"}]},
    {"id": "water", "prompt": "Water is made of hydrogen and", "answer": "oxygen",
     "paraphrases": ["Water is made of"],
     "neighborhood": [{"prompt": "The Colosseum is in", "answer": "Rome"}]},
    {"id": "rome", "prompt": "The Colosseum is in", "answer": "Rome",
     "paraphrases": ["The Colosseum is in the city of"],
     "neighborhood": [{"prompt": "Berlin is in", "answer": "Germany"}]},
    {"id": "berlin", "prompt": "Berlin is in", "answer": "Germany",
     "paraphrases": ["The city of Berlin is in"],
     "neighborhood": [{"prompt": "Madrid is in", "answer": "Spain"}]},
]
IDS = [f["id"] for f in FACTS]
# --max-facts 3 of these 5 (all known at --known-rank 1000): "evenly spaced" per the flag's help,
# items (i * 5) // 3 for i = 0, 1, 2
SUBSET3 = ["france", "japan", "rome"]
RUN_FAST = ["--known-rank", "1000", "--steps", "2", "--acc-tokens", "2", "--quiet"]
ATTACKS = ("head-projection", "probability-delta", "pd2")


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (not JSON per RFC 8259; JSON.parse rejects them)."""
    def bad(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny, tiny_tokenizer) -> Path:
    """The tiny random Llama (2 layers, 128 positions) and its tokenizer, saved as an HF directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama").hf.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def facts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "facts.jsonl", FACTS)


@pytest.fixture
def cli(model_dir, capsys):
    """``cli(cmd, *args)`` -> (exit code, stdout, stderr) of ``probe.cli.main`` on the tiny model."""
    def _call(command: str, *args: str):
        capsys.readouterr()  # drop anything captured before
        rc = main([command, "--model", str(model_dir), *args])
        out, err = capsys.readouterr()
        return rc, out, err
    return _call


def stderr_lines(err: str) -> list[str]:
    """stderr lines, without transformers' "Loading weights" progress bar (printed even with
    --quiet: see test_quiet_error_after_model_load_is_one_line)."""
    return [x for x in err.replace("\r", "\n").splitlines() if x and not x.startswith("Loading weights:")]


def assert_input_error(rc, out, err, *needles, out_dir: Path | None = None):
    """Exit 2, exactly one stderr line ``probe-attack: error: ...`` (besides the model-loading bar)
    containing ``needles``, no traceback, nothing on stdout, and no output folder."""
    assert rc == 2
    lines = stderr_lines(err)
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("probe-attack: error: "), lines
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert out == ""
    if out_dir is not None:
        assert not out_dir.exists(), f"{out_dir} was created: {list(out_dir.iterdir())}"


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def probe_attack_exe() -> list[str]:
    exe = Path(sys.executable).parent / "probe-attack"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "probe.cli"]


def in_unit(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0


# ---------------------------------------------------------------------------------------------
# run: the main job


def test_run_writes_results_per_fact_and_report(cli, model_dir, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "3", *RUN_FAST)
    assert rc == 0, err
    assert "Traceback" not in err

    res = strict_json((out_dir / "results.json").read_text())
    assert res["model"] == str(model_dir)
    assert json.loads((out_dir / "run.json").read_text())["model"] == str(model_dir)
    assert res["n_facts"] == 3
    assert res["n_layers"] == 2
    assert set(res["attacks"]) == set(ATTACKS)
    for name, a in res["attacks"].items():
        assert isinstance(a["budget"], int) and a["budget"] >= 0
        assert in_unit(a["success_pre"]), (name, a["success_pre"])
        assert in_unit(a["success_post"]), (name, a["success_post"])
    d = res["defense"]
    assert d["name"] == "fact-erasure" and d["editor"] == "constrained-ft" and d["protocol"] == "one-at-a-time"
    assert d["editor_config"]["steps"] == 2
    for k in ("rewrite_score", "paraphrase_score", "neighborhood_score"):
        assert in_unit(d[k]), (k, d[k])
    assert d["n_deleted"] == 3
    assert res["n_facts_input"] == 5 and res["known_filter"]["max_rank"] == 1000

    recs = read_jsonl(out_dir / "per_fact.jsonl")
    assert [r["id"] for r in recs] == SUBSET3
    by_id = {f["id"]: f for f in FACTS}
    for r in recs:
        f = by_id[r["id"]]
        assert r["prompt"] == f["prompt"] and r["answer"] == f["answer"]
        for phase in ("pre", "post"):
            read = r[phase]
            assert len(read["rank"]) == 2 and len(read["prob"]) == 2
            assert all(isinstance(x, int) and 1 <= x <= 1000 for x in read["rank"])
            assert all(0.0 <= p <= 1.0 for p in read["prob"])
            assert read["rank"][-1] <= 1000  # passed the known filter
        assert r["edit"]["steps"] in (1, 2)
        assert in_unit(r["scores"]["rewrite_score"])

    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith(("<!doctype html", "<html")) and len(html) > 500

    assert "head-projection" in out and "probability-delta" in out and "pd2" in out
    head = next(line for line in out.splitlines() if line.startswith("attack "))
    assert head.split() == ["attack", "layers", "B", "pre", "post", "control", "excess", "hidden", "B_h"]
    assert "3 facts" in out
    # facts without relations: controls from the other facts' answers, said so in the results
    res = strict_json((out_dir / "results.json").read_text())
    assert {a["control"] for a in res["attacks"].values()} == {"any-relation"}
    for r in recs:
        assert r["control_source"] == "any-relation" and r["control"] not in (None, r["answer"])
        assert r["control"] in {f["answer"] for f in FACTS}
    assert f"report:  {out_dir / 'report.html'}" in out
    assert f"results: {out_dir / 'results.json'}" in out


def test_run_results_are_strict_json_without_paraphrases(cli, tmp_path):
    facts = write_jsonl(tmp_path / "plain.jsonl", [{k: f[k] for k in ("id", "prompt", "answer")} for f in FACTS])
    out_dir = tmp_path / "out"
    rc, _, err = cli("run", "--facts", str(facts), "--out", str(out_dir), "--max-facts", "2", *RUN_FAST)
    assert rc == 0, err
    res = strict_json((out_dir / "results.json").read_text())
    assert res["defense"]["paraphrase_score"] is None or in_unit(res["defense"]["paraphrase_score"])
    for line in (out_dir / "per_fact.jsonl").read_text().splitlines():
        strict_json(line)


def test_attack_keeps_every_fact_and_has_no_post(cli, facts_file, tmp_path):
    out_dir = tmp_path / "att"
    rc, out, err = cli("attack", "--facts", str(facts_file), "--out", str(out_dir), "--quiet")
    assert rc == 0, err
    res = strict_json((out_dir / "results.json").read_text())
    assert res["n_facts"] == len(FACTS)  # no known filter: the random model knows none of them at rank 1
    assert "defense" not in res
    assert set(res["attacks"]) == set(ATTACKS)
    for a in res["attacks"].values():
        assert a["success_post"] is None and a["curve_post"] is None
        assert in_unit(a["success_pre"])
    recs = read_jsonl(out_dir / "per_fact.jsonl")
    assert [r["id"] for r in recs] == IDS
    assert all(r["post"] is None and r["scores"] is None for r in recs)
    assert all(len(r["pre"]["rank"]) == 2 for r in recs)
    assert any(r["pre"]["rank"][-1] > 1 for r in recs)  # they would have failed the default filter
    assert (out_dir / "report.html").is_file()
    assert "control" in out and "excess" in out and "defense" not in out


def test_run_default_known_rank_filters_everything_out(cli, facts_file, tmp_path):
    """Contrast with ``attack``: the random model knows none of the facts at rank 1."""
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--steps", "2", "--quiet")
    assert_input_error(rc, out, err, "none of the 5 facts is known", "rank <= 1", out_dir=out_dir)


def test_multi_token_answer(cli, tmp_path):
    facts = write_jsonl(tmp_path / "f.jsonl", [
        {"id": "rio", "prompt": "The city famous for its Carnival in Brazil is", "answer": "Rio de Janeiro",
         "paraphrases": ["The Carnival in Brazil is in"]},
        FACTS[0]])
    out_dir = tmp_path / "out"
    rc, _, err = cli("run", "--facts", str(facts), "--out", str(out_dir), *RUN_FAST)
    assert rc == 0, err
    rec = read_jsonl(out_dir / "per_fact.jsonl")[0]
    assert rec["id"] == "rio" and rec["answer"] == "Rio de Janeiro"
    assert len(rec["answer_ids"]) > 1
    for phase in ("pre", "post"):
        r = rec[phase]
        assert len(r["token_logprobs"]) == len(rec["answer_ids"])
        assert all(lp < 0 for lp in r["token_logprobs"])
        assert r["answer_logprob"] == pytest.approx(sum(r["token_logprobs"]), rel=1e-5, abs=1e-5)
        assert 0.0 <= r["token_acc"] <= 1.0


def test_protocol_all_at_once(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "3",
                       "--protocol", "all-at-once", *RUN_FAST)
    assert rc == 0, err
    recs = read_jsonl(out_dir / "per_fact.jsonl")
    assert [r["id"] for r in recs] == SUBSET3
    for r in recs:
        assert r["post"] is not None and len(r["post"]["rank"]) == 2
        assert in_unit(r["scores"]["rewrite_score"])
    # one edit for all facts: the same edit statistics on every record
    assert len({(r["edit"]["steps"], r["edit"]["max_abs_change"]) for r in recs}) == 1
    res = strict_json((out_dir / "results.json").read_text())
    assert res["defense"]["protocol"] == "all-at-once" and res["n_facts"] == 3
    assert all(in_unit(a["success_post"]) for a in res["attacks"].values())
    assert "all-at-once" in out


def test_same_seed_gives_identical_per_fact_records(cli, facts_file, tmp_path, monkeypatch):
    """Two identical runs (same --seed) give the same records, byte for byte. The edit is made
    real (no early stop, larger lr/bound) so the deletion actually moves the weights."""
    orig = ConstrainedFineTune.edit

    def no_early_stop(self, *a, **k):
        self.early_stop = None
        return orig(self, *a, **k)

    monkeypatch.setattr(ConstrainedFineTune, "edit", no_early_stop)
    args = ["--facts", str(facts_file), "--max-facts", "3", "--seed", "7", "--lr", "0.05", "--norm-bound", "0.05",
            *RUN_FAST]
    rc1, _, err1 = cli("run", *args, "--out", str(tmp_path / "a"))
    rc2, _, err2 = cli("run", *args, "--out", str(tmp_path / "b"))
    assert rc1 == 0 and rc2 == 0, err1 + err2
    a = (tmp_path / "a" / "per_fact.jsonl").read_text()
    b = (tmp_path / "b" / "per_fact.jsonl").read_text()
    recs_a, recs_b = [strict_json(x) for x in a.splitlines()], [strict_json(x) for x in b.splitlines()]
    assert len(recs_a) == 3
    # 2 updates and a pass measuring the last (every pass is an accepted state or a rejected update)
    assert all(r["edit"]["steps"] + len(r["edit"]["extra"]["rejected_steps"]) == 3 and r["edit"]["max_abs_change"] > 0
               for r in recs_a)
    assert any(r["post"]["prob"] != r["pre"]["prob"] for r in recs_a)  # the edit changed the readouts
    for ra, rb in zip(recs_a, recs_b):
        assert ra["edit"].pop("seconds") >= 0 and rb["edit"].pop("seconds") >= 0  # wall time: the one difference
        diff = [k for k in ra if ra[k] != rb[k]]
        assert not diff, f"fact {ra['id']}: fields differ between identical runs: {diff}"


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


BAD_FILES = {
    # name: (content, needles in the message beyond the file path)
    "empty": (b"", ["empty"]),
    "blank-lines": (b"\n  \n\n", ["empty"]),
    "not-json": (json.dumps(FACTS[0]).encode() + b"\n{not json\n", [":2", "JSON"]),
    "not-object": (b"[1, 2]\n", [":1"]),
    "missing-field": (json.dumps({"id": "a", "prompt": "The capital of France is"}).encode() + b"\n",
                      [":1", "'answer'", "missing"]),
    "wrong-type": (json.dumps(FACTS[0]).encode() + b"\n"
                   + json.dumps({"id": "b", "prompt": "Berlin is in", "answer": 42}).encode() + b"\n",
                   [":2", "'answer'", "string"]),
    "wrong-type-prompt": (json.dumps({"id": "a", "prompt": ["The"], "answer": "Paris"}).encode() + b"\n",
                          [":1", "'prompt'"]),
    "empty-answer": (json.dumps({"id": "a", "prompt": "Berlin is in", "answer": ""}).encode() + b"\n",
                     [":1", "'answer'"]),
    "whitespace-answer": (json.dumps({"id": "a", "prompt": "Berlin is in", "answer": " \t "}).encode() + b"\n",
                          [":1", "'answer'"]),
    "whitespace-prompt": (json.dumps(FACTS[0]).encode() + b"\n"
                          + json.dumps({"id": "b", "prompt": "   \n ", "answer": "Paris"}).encode() + b"\n",
                          [":2", "'prompt'"]),
    "duplicate-id": (b"".join(json.dumps(f).encode() + b"\n"
                              for f in (FACTS[0], FACTS[1], {**FACTS[2], "id": "france"})),
                     [":3", "'id'", "duplicate", "line 1"]),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe\x00garbage\x01\x02", [":1", "binary"]),
    "not-utf8": (b'{"id": "a", "prompt": "Berlin \xff\xfe is in", "answer": "Germany"}\n', [":1", "UTF-8"]),
    "bad-neighborhood": (json.dumps({**FACTS[0], "neighborhood": [{"prompt": "Madrid is in"}]}).encode() + b"\n",
                         [":1", "neighborhood[0].answer"]),
}


@pytest.mark.parametrize("command", ["run", "attack"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_facts_file(cli, tmp_path, case, command):
    content, needles = BAD_FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    out_dir = tmp_path / "out"
    rc, out, err = cli(command, "--facts", str(path), "--out", str(out_dir), *(RUN_FAST if command == "run" else []))
    assert_input_error(rc, out, err, str(path), *needles, out_dir=out_dir)


def test_missing_facts_file(cli, tmp_path):
    path = tmp_path / "nope.jsonl"
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(path), "--out", str(out_dir), *RUN_FAST)
    assert_input_error(rc, out, err, str(path), "not found", out_dir=out_dir)


def test_facts_file_is_a_directory(cli, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("attack", "--facts", str(tmp_path), "--out", str(out_dir))
    assert_input_error(rc, out, err, str(tmp_path), "directory", out_dir=out_dir)


@pytest.mark.parametrize("command", ["run", "attack"])
def test_prompt_longer_than_context(cli, tmp_path, command):
    long_prompt = " ".join(["Paris", "is", "the", "capital", "of", "France"] * 67)  # 402 words
    assert len(long_prompt.split()) > 400
    path = write_jsonl(tmp_path / "long.jsonl", [FACTS[0], {"id": "long", "prompt": long_prompt, "answer": "Paris"}])
    out_dir = tmp_path / "out"
    rc, out, err = cli(command, "--facts", str(path), "--out", str(out_dir),
                       *(RUN_FAST if command == "run" else ["--quiet"]))
    assert_input_error(rc, out, err, f"{path}:2", "'prompt'", "128", out_dir=out_dir)


def test_paraphrase_longer_than_context_names_its_field(cli, tmp_path):
    long_prompt = " ".join(["Water", "is", "made", "of", "hydrogen"] * 90)
    path = write_jsonl(tmp_path / "long.jsonl", [{**FACTS[0], "paraphrases": ["Paris is the capital of", long_prompt]}])
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(path), "--out", str(out_dir), *RUN_FAST)
    assert_input_error(rc, out, err, f"{path}:1", "'paraphrases[1]'", out_dir=out_dir)


def test_model_path_does_not_exist(capsys, facts_file, tmp_path):
    missing = tmp_path / "no-such-model"
    out_dir = tmp_path / "out"
    rc = main(["run", "--model", str(missing), "--facts", str(facts_file), "--out", str(out_dir), *RUN_FAST])
    out, err = capsys.readouterr()
    assert_input_error(rc, out, err, str(missing), "does not exist", out_dir=out_dir)


def test_model_dir_without_config(capsys, facts_file, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out_dir = tmp_path / "out"
    rc = main(["attack", "--model", str(empty), "--facts", str(facts_file), "--out", str(out_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert_input_error(rc, out, err, str(empty), "config.json", out_dir=out_dir)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random OPT (a causal LM whose model_type 'opt' has no probe-attack adapter)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    d = tmp_path_factory.mktemp("tiny-opt")
    tf.OPTForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    assert "opt" not in probe.supported_model_types()
    return d


def test_unsupported_architecture_raises_the_right_error(opt_dir):
    with pytest.raises(probe.UnsupportedArchitectureError) as ei:
        probe.load_model(str(opt_dir))
    assert "'opt'" in str(ei.value)


def test_unsupported_architecture_cli(capsys, opt_dir, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc = main(["attack", "--model", str(opt_dir), "--facts", str(facts_file), "--out", str(out_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert_input_error(rc, out, err, "'opt'", "llama", "gpt2", "qwen2", ", ".join(probe.supported_model_types()),
                       out_dir=out_dir)


def test_unknown_attack_lists_valid_ones(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir),
                       "--attacks", "head-projection,logit-spy", *RUN_FAST)
    assert_input_error(rc, out, err, "'logit-spy'", *ATTACKS, out_dir=out_dir)
    rc, out, err = cli("attack", "--facts", str(facts_file), "--out", str(out_dir), "--attacks", " , ")
    assert_input_error(rc, out, err, "--attacks", out_dir=out_dir)


def test_unknown_defense_and_editor(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--defense", "forget-all", *RUN_FAST)
    assert_input_error(rc, out, err, "'forget-all'", "fact-erasure", out_dir=out_dir)
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--editor", "memit", *RUN_FAST)
    assert_input_error(rc, out, err, "'memit'", "constrained-ft", "lora", "rome", out_dir=out_dir)
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--editor", "lora",
                       "--norm-bound", "0.1", *RUN_FAST)
    assert_input_error(rc, out, err, "--norm-bound does not apply to editor lora", out_dir=out_dir)


@pytest.mark.parametrize("defense", ["empty-response", "head-projection", "input-rephrasing"])
def test_run_accepts_every_defense_and_non_lens_attacks(cli, facts_file, tmp_path, defense):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--defense", defense,
                       "--attacks", "head-projection,question-rephrase,relearning", "--max-facts", "2", *RUN_FAST)
    assert rc == 0, err
    assert "question-rephrase" in out and "(blackbox)" in out and "(relearning)" in out
    res = strict_json((out_dir / "results.json").read_text())
    qr = res["attacks"]["question-rephrase"]
    assert qr["budget"] == 20 and qr["n_facts"] == 2
    recs = read_jsonl(out_dir / "per_fact.jsonl")
    # the random tiny model's 20 samples name " Paris" (a token of its vocabulary) 5 times after
    # the France rephrasings and never "oxygen": success 1 of 2 facts before the edit
    hits = {}
    for r in recs:
        o = r["outcomes"]["question-rephrase"]
        assert len(o["pre"]["samples"]) == 20 and len(o["post"]["samples"]) == 20
        for phase in ("pre", "post"):  # hits count the recorded samples that contain the answer
            assert o[phase]["hits"] == sum(answer_matches(t, r["answer"]) for t in o[phase]["samples"])
        hits[r["id"]] = o["pre"]["hits"]
    assert hits == {"france": 5, "water": 0} and qr["success_pre"] == 0.5
    if defense == "empty-response":
        assert recs[0]["scores"]["target"] == "I don't know"
        assert "target_rewrite_score" in res["defense"]


def test_grid_cli_writes_cells_and_report(cli, facts_file, tmp_path):
    out_dir = tmp_path / "grid"
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(out_dir), "--defenses",
                       "fact-erasure,max-entropy", "--attacks", "head-projection,pd2,question-rephrase", "--max-facts", "2",
                       "--random-n", "1", *RUN_FAST)
    assert rc == 0, err
    assert "fact-erasure" in out and "max-entropy" in out and "B=20" in out
    grid = strict_json((out_dir / "grid.json").read_text())
    assert len(grid["cells"]) == 6 and grid["complete"] and grid["n_facts"] == 2
    assert {c["attack"] for c in grid["cells"]} == {"head-projection", "pd2", "question-rephrase"}
    assert (out_dir / "report.html").read_text().count("<script") >= 3
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(out_dir), "--defenses",
                       "fact-erasure,max-entropy", "--attacks", "head-projection,pd2,question-rephrase", "--max-facts", "2",
                       "--random-n", "1", *RUN_FAST)
    assert rc == 2 and "--resume" in err


def test_retention_and_generation_scores_reach_results_tables_and_reports(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "2",
                       "--gen-tokens", "3", *RUN_FAST)
    assert rc == 0, err
    d = strict_json((out_dir / "results.json").read_text())["defense"]
    recs = read_jsonl(out_dir / "per_fact.jsonl")
    # every fact is known at --known-rank 1000: each edit is scored on the 4 other facts, topped up
    # (fewer than 50) with the built-in facts not in the file (all known here; probe.pool)
    from probe.pool import extra_facts

    n_ret = 4 + len(extra_facts(probe.facts.load_jsonl(facts_file)))
    assert n_ret == 4 + 198  # "The capital of France is Paris" is a built-in fact too
    assert d["retention_n"] == n_ret and all(r["scores"]["retention_n"] == n_ret for r in recs)
    assert d["retention_drop"] == pytest.approx(d["retention_acc_pre"] - d["retention_acc_post"])
    assert d["retention_drop"] == pytest.approx(sum(r["scores"]["retention_drop"] for r in recs) / 2)
    assert d["generation_acc_pre"] in (0.0, 0.5, 1.0) and json.loads((out_dir / "run.json").read_text())["gen_tokens"] == 3
    line = next(x for x in out.splitlines() if x.strip().startswith("retention_drop"))
    assert line.split()[1] == f"{d['retention_drop']:.3f}" and f"on {n_ret} other known facts" in line
    assert "pools topped up with the built-in facts" in out and "retention 2" in out
    assert "retention_drop" in (out_dir / "report.html").read_text()

    grid_dir = tmp_path / "grid"
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(grid_dir), "--defenses", "fact-erasure",
                       "--attacks", "head-projection", "--max-facts", "1", "--random-n", "0", "--gen-tokens", "0",
                       *RUN_FAST)
    assert rc == 0, err
    cell = strict_json((grid_dir / "grid.json").read_text())["cells"][0]
    assert cell["retention_n"] == n_ret and cell["generation_efficacy"] is None and cell["generation_acc_pre"] is None
    head = next(x for x in out.splitlines() if x.startswith("defense ") and "rewrite" in x)
    assert head.split() == ["defense", "rewrite", "gen", "paraphr", "genPara", "neighb", "nΔAcc", "rΔAcc", "retΔ",
                            "target", "failed"]
    row = next(x for x in out.splitlines()[out.splitlines().index(head) + 1:] if x.startswith("fact-erasure"))
    assert row.split()[8] == f"{cell['retention_drop']:.3f}" and row.split()[2] == "—"
    html = (grid_dir / "report.html").read_text()
    assert "<th>retention_drop</th>" in html and "<th>retention_n</th>" in html


@pytest.mark.parametrize("n", ["0", "-3"])
def test_max_facts_must_be_positive(cli, facts_file, tmp_path, n):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--max-facts", n, *RUN_FAST)
    assert_input_error(rc, out, err, "--max-facts", out_dir=out_dir)


def test_quiet_error_after_model_load_is_one_line(cli, facts_file, tmp_path):
    long_prompt = " ".join(["Paris", "is", "the", "capital", "of", "France"] * 67)
    path = write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "prompt": long_prompt, "answer": "Paris"}])
    rc, out, err = cli("attack", "--facts", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert rc == 2
    assert err.splitlines() == [f"probe-attack: error: {path}:1 field 'prompt': "
                                + err.rsplit("field 'prompt': ", 1)[-1].rstrip("\n")]


def test_edit_layer_out_of_range(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--edit-layer", "5", *RUN_FAST)
    assert_input_error(rc, out, err, "edit layer 5 out of range for 2 layers")


def test_edit_layer_out_of_range_writes_nothing(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    rc, _, _ = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--edit-layer", "5", *RUN_FAST)
    assert rc == 2
    assert not out_dir.exists(), sorted(p.name for p in out_dir.iterdir())


# ---------------------------------------------------------------------------------------------
# output folder safety, resume, interrupt


def test_second_run_into_same_out_is_refused(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "2", *RUN_FAST]
    rc, _, err = cli("run", *args)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert {"per_fact.jsonl", "results.json", "report.html", "run.json"} <= set(before)
    rc, out, err = cli("run", *args)
    assert_input_error(rc, out, err, "--resume", str(out_dir))
    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert after == before  # every file byte-identical, nothing added
    # attack into a folder holding a run is refused the same way
    rc, out, err = cli("attack", "--facts", str(facts_file), "--out", str(out_dir), "--quiet")
    assert_input_error(rc, out, err, "--resume")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_resume_after_torn_write(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "3", *RUN_FAST]
    rc, _, err = cli("run", *args)
    assert rc == 0, err
    per_fact = out_dir / "per_fact.jsonl"
    full = per_fact.read_bytes()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 3
    torn = lines[0] + lines[1][: len(lines[1]) // 2]
    per_fact.write_bytes(torn)
    (out_dir / "results.json").unlink()  # a killed run has no results.json yet

    rc, out, err = cli("run", *args, "--resume")
    assert rc == 0, err
    new = per_fact.read_bytes()
    new_lines = new.splitlines(keepends=True)
    assert len(new_lines) == 3 and all(x.endswith(b"\n") for x in new_lines)
    assert [json.loads(x)["id"] for x in new_lines] == SUBSET3
    assert new_lines[0] == lines[0]  # kept, not recomputed
    res = strict_json((out_dir / "results.json").read_text())
    assert res["n_facts"] == 3 and res["defense"]["n_deleted"] == 3
    assert "3 facts" in out


def test_resumed_run_equals_uninterrupted_run(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "3", *RUN_FAST]
    rc, _, err = cli("run", *args)
    assert rc == 0, err
    per_fact = out_dir / "per_fact.jsonl"
    full = per_fact.read_bytes()
    lines = full.splitlines(keepends=True)
    per_fact.write_bytes(lines[0] + lines[1][:40])
    rc, _, err = cli("run", *args, "--resume")
    assert rc == 0, err
    for old, new in zip(lines, per_fact.read_bytes().splitlines(keepends=True)):
        old, new = json.loads(old), json.loads(new)
        assert new["edit"].pop("seconds") >= 0 and old["edit"].pop("seconds") >= 0  # wall time of the edit
        assert new == old


def test_resume_with_different_settings_is_refused(cli, facts_file, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "2", *RUN_FAST]
    rc, _, err = cli("run", *args)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    rc, out, err = cli("run", *args, "--steps", "3", "--resume")  # the later --steps wins
    assert_input_error(rc, out, err, "cannot resume", "editor_config", str(out_dir))
    rc, out, err = cli("run", *args, "--seed", "1", "--resume")
    assert_input_error(rc, out, err, "cannot resume", "seed")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_keyboard_interrupt_keeps_finished_facts_and_resumes(cli, facts_file, tmp_path, monkeypatch):
    calls = []
    orig = ConstrainedFineTune.edit

    def interrupting(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(ConstrainedFineTune, "edit", interrupting)
    out_dir = tmp_path / "out"
    args = ["--facts", str(facts_file), "--out", str(out_dir), "--max-facts", "3", *RUN_FAST]
    rc, out, err = cli("run", *args)
    assert rc == 130
    assert len(calls) == 2
    assert "--resume" in err and "interrupted" in err and "Traceback" not in err
    assert not (out_dir / "results.json").exists()
    recs = read_jsonl(out_dir / "per_fact.jsonl")
    assert [r["id"] for r in recs] == ["france"]
    first = (out_dir / "per_fact.jsonl").read_bytes()

    monkeypatch.setattr(ConstrainedFineTune, "edit", orig)
    rc, out, err = cli("run", *args, "--resume")
    assert rc == 0, err
    after = (out_dir / "per_fact.jsonl").read_bytes()
    assert after.startswith(first)
    assert [json.loads(x)["id"] for x in after.splitlines()] == SUBSET3
    assert strict_json((out_dir / "results.json").read_text())["n_facts"] == 3


# ---------------------------------------------------------------------------------------------
# help, models, no command


@pytest.mark.parametrize("argv, flags", [
    ([], ["run", "attack", "models"]),
    (["run"], ["--model", "--facts", "--out", "--attacks", "--defense", "--known-rank", "--max-facts", "--steps",
               "--protocol", "--resume", "--seed", "--gen-tokens"]),
    (["attack"], ["--model", "--facts", "--out", "--attacks", "--max-facts", "--resume"]),
])
def test_help(capsys, argv, flags):
    with pytest.raises(SystemExit) as ei:
        main([*argv, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: probe-attack")
    for f in flags:
        assert f in out, f
    if argv == ["attack"]:
        assert "--defense" not in out and "--known-rank" not in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: probe-attack" in capsys.readouterr().out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["run", "--max-facts", "many"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--max-facts" in err and "invalid int value" in err


def test_models_lists_short_names_and_architectures(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma-3-270m" in out
    assert "architectures: " + ", ".join(probe.supported_model_types()) in out


# ---------------------------------------------------------------------------------------------
# the installed script, in a real subprocess


def test_subprocess_bad_input_and_attack(model_dir, tmp_path):
    exe = probe_attack_exe()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FACTS[0]) + "\n" + json.dumps({"id": "x", "prompt": "Madrid is in"}) + "\n")
    out_dir = tmp_path / "out"
    p = subprocess.run([*exe, "run", "--model", str(model_dir), "--facts", str(bad), "--out", str(out_dir)],
                       capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [f"probe-attack: error: {bad}:2 field 'answer': missing required field"]
    assert p.stdout == ""
    assert not out_dir.exists()

    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS[:2])
    p = subprocess.run([*exe, "attack", "--model", str(model_dir), "--facts", str(facts), "--out", str(out_dir)],
                       capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert f"report:  {out_dir / 'report.html'}" in p.stdout
    assert strict_json((out_dir / "results.json").read_text())["n_facts"] == 2
    assert len(read_jsonl(out_dir / "per_fact.jsonl")) == 2


def test_real_sigint_stops_cleanly_and_resume_finishes(model_dir, tmp_path):
    """A real Ctrl-C (SIGINT) during the per-fact loop: exit 130 within seconds, every finished fact
    intact on disk, and --resume completes the run (nnsight can swallow a KeyboardInterrupt raised
    mid-trace, so the CLI handles the signal cooperatively)."""
    import signal
    import time

    facts = [dict(f, id=f"{f['id']}-{i}") for i in range(40) for f in FACTS]
    facts_path = write_jsonl(tmp_path / "many.jsonl", facts)
    out = tmp_path / "out"
    args = [*probe_attack_exe(), "run", "--model", str(model_dir), "--facts", str(facts_path), "--out", str(out),
            "--known-rank", "100000", "--steps", "2", "--acc-tokens", "2", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    per_fact = out / "per_fact.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if per_fact.is_file() and per_fact.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGINT did not stop the run within 30 s")
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    done = read_jsonl(per_fact)
    assert 2 <= len(done) < len(facts)
    assert not (out / "results.json").exists()
    rc = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=subprocess_env()).returncode
    assert rc == 0
    final = read_jsonl(per_fact)
    assert [r["id"] for r in final] == [f["id"] for f in facts]
    assert final[: len(done)] == done


def test_default_out_is_a_new_timestamped_folder(cli, facts_file, tmp_path, monkeypatch):
    """Without --out each run gets its own runs/<date-time>/ (running the README command twice works)."""
    monkeypatch.chdir(tmp_path)
    rc, out, _ = cli("attack", "--facts", str(facts_file), "--quiet")
    assert rc == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").is_file()
    assert str(Path("runs") / runs[0].name / "report.html") in out
    rc, _, err = cli("attack", "--facts", str(facts_file), "--quiet", "--resume")
    assert rc == 2 and "--resume needs the --out folder" in err


def test_run_report_shows_tuned_lens_probe_and_causal_traces(cli, model_dir, tmp_path, monkeypatch, counterfact_path):
    """Issue 5 in the main job: tuned-lens and linear-probe attacks slot into `run` by name, their
    per-layer ranks reach the report's "where the deleted knowledge persists" figure, and
    --causal-traces adds layer x position maps (unedited vs edited model as the clean run)."""
    import probe
    from probe.facts import load_facts
    from probe.lens_training import get_tuned_lens

    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "cache"))
    get_tuned_lens(probe.load_model(str(model_dir)), steps=3, minutes=None, train_tokens=512, heldout_tokens=64,
                   adam_tokens=128, seq_len=16, batch=8,
                   exclude=load_facts(counterfact_path))  # cached under the model's fingerprint
    facts = [{"id": f"f{i}", "prompt": p, "answer": a, "subject": s} for i, (p, a, s) in enumerate([
        ("The capital of France is", "Paris", "France"), ("The capital of Japan is", "Tokyo", "Japan"),
        ("Water is made of hydrogen and", "oxygen", "Water"), ("The Eiffel Tower is located in the city of",
                                                                "Paris", "The Eiffel Tower")])]
    facts_path = write_jsonl(tmp_path / "f.jsonl", facts)
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_path), "--out", str(out_dir), "--attacks",
                       "head-projection,tuned-lens,linear-probe", "--causal-traces", "1", "--max-facts", "2",
                       *RUN_FAST)
    assert rc == 0, err
    res = strict_json((out_dir / "results.json").read_text())
    assert res["attacks"]["tuned-lens"]["budget"] == 8
    # the probe trains on the file's 3 other facts (leave-one-out), topped up with the built-in facts
    # (fewer than 32): "Paris" then has 2 training examples (f3 and the built-in France fact) and is
    # scored; "Tokyo" (f1) has one and is skipped, counted
    lp = res["attacks"]["linear-probe"]
    assert (lp["n_facts"], lp["n_skipped"], lp["control"]) == (1, 1, "relation prior")
    rec = read_jsonl(out_dir / "per_fact.jsonl")[0]
    assert len(rec["outcomes"]["tuned-lens"]["post"]["layer_ranks"]) == 2
    traces = read_jsonl(out_dir / "causal_traces.jsonl")
    assert len(traces) == 1 and traces[0]["corrupted"] == "subject"
    assert len(traces[0]["pre"]["probs"]) == 2  # [n_layers][n_positions]
    html = (out_dir / "report.html").read_text()
    assert "Where the deleted knowledge persists" in html and "Causal trace of fact" in html


@pytest.mark.parametrize("flag,value,needle", [("--steps", "0", "--steps must be >= 1"),
                                               ("--acc-tokens", "-1", "--acc-tokens must be >= 1"),
                                               ("--bb-tokens", "0", "--bb-tokens must be >= 1"),
                                               ("--gen-tokens", "-1", "--gen-tokens must be >= 0"),
                                               ("--device", "cuda", "CUDA is not available"),
                                               ("--device-map", "everywhere", "device_map 'everywhere': use one of")])
def test_bad_numeric_flags_and_device_exit_2_and_write_nothing(cli, facts_file, tmp_path, flag, value, needle):
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(out_dir), "--known-rank", "1000", "--quiet",
                       flag, value)
    assert_input_error(rc, out, err, needle, out_dir=out_dir)


def test_grid_with_a_device_map_gives_the_cells_of_a_plain_grid(cli, facts_file, tmp_path, monkeypatch):
    """``--device-map auto`` (accelerate; all on the CPU here) reaches accelerate and changes no
    number of a grid."""
    import probe.model

    maps = []
    dispatch = probe.model.dispatch
    monkeypatch.setattr(probe.model, "dispatch", lambda hf, dm, **kw: maps.append(dm) or dispatch(hf, dm, **kw))
    cells = []
    for extra in ([], ["--device-map", "auto"]):
        out_dir = tmp_path / f"g{len(extra)}"
        rc, _, err = cli("grid", "--facts", str(facts_file), "--out", str(out_dir), "--defenses", "fact-erasure",
                         "--attacks", "head-projection", "--max-facts", "1", "--random-n", "0", *RUN_FAST, *extra)
        assert rc == 0, err
        units = read_jsonl(out_dir / "units.jsonl")
        for u in units:
            u["edit"].pop("seconds")  # wall-clock
        cells.append(units)
    assert cells[0] == cells[1] and cells[0]
    assert maps == ["auto"]


def test_run_and_grid_never_write_into_each_others_folders(cli, facts_file, tmp_path):
    grid_dir, run_dir = tmp_path / "g", tmp_path / "r"
    rc, _, err = cli("grid", "--facts", str(facts_file), "--out", str(grid_dir), "--defenses", "fact-erasure",
                     "--attacks", "head-projection", "--max-facts", "1", "--random-n", "0", *RUN_FAST)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in grid_dir.iterdir()}
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(grid_dir), *RUN_FAST)
    assert rc == 2 and "holds a grid" in err
    assert {p.name: p.read_bytes() for p in grid_dir.iterdir()} == before
    rc, _, err = cli("run", "--facts", str(facts_file), "--out", str(run_dir), "--max-facts", "1", *RUN_FAST)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(run_dir), "--defenses", "fact-erasure",
                       "--attacks", "head-projection", *RUN_FAST)
    assert rc == 2 and "holds a run" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_attack_flags_reach_every_selected_attack_that_has_the_field():
    from probe.cli import _attack_config, build_parser

    args = build_parser().parse_args(["grid", "--keep-answer-in-input", "--bb-tokens", "7"])
    cfg = _attack_config(args, ["head-projection", "question-rephrase", "jailbreak"])
    assert cfg == {"question-rephrase": {"max_new_tokens": 7, "skip_answer_in_input": False},
                   "jailbreak": {"max_new_tokens": 7, "skip_answer_in_input": False}}
    assert _attack_config(build_parser().parse_args(["grid"]), ["question-rephrase"]) == {}
    args = build_parser().parse_args(["run", "--relearn-lr", "1e-3", "--relearn-epochs", "3"])
    assert _attack_config(args, ["relearning", "head-projection"]) == {"relearning": {"lr": 1e-3, "epochs": 3}}
    assert build_parser().parse_args(["run", "--known", "reference"]).known == "reference"


def test_causal_traces_refuse_a_fact_without_subject_before_writing(cli, tmp_path):
    facts = [{"id": f"f{i}", "prompt": p, "answer": a} for i, (p, a) in enumerate([
        ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo")])]
    facts_path = write_jsonl(tmp_path / "f.jsonl", facts)
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(facts_path), "--out", str(out_dir), "--causal-traces", "1",
                       "--known-rank", "1000", *RUN_FAST)
    assert_input_error(rc, out, err, "has no subject", out_dir=out_dir)
    assert "f.jsonl:1" in err and "subject" in err


@pytest.mark.parametrize("command", ["run", "grid"])
def test_a_relation_with_a_single_attacked_fact_is_refused_before_writing(cli, tmp_path, command):
    facts = [{"id": "a", "prompt": "The capital of France is", "answer": "Paris", "relation": "capital"},
             {"id": "b", "prompt": "The capital of Japan is", "answer": "Tokyo", "relation": "capital"},
             {"id": "c", "prompt": "Water is made of hydrogen and", "answer": "oxygen", "relation": "chemistry"}]
    path = write_jsonl(tmp_path / "f.jsonl", facts)
    out_dir = tmp_path / "out"
    extra = ["--defenses", "fact-erasure", "--attacks", "head-projection"] if command == "grid" else []
    rc, out, err = cli(command, "--facts", str(path), "--out", str(out_dir), *extra, *RUN_FAST)
    assert_input_error(rc, out, err, "f.jsonl:3", "relation", "single fact", out_dir=out_dir)


@pytest.mark.parametrize("value", ['3', '""', '"  "', '["capital"]'])
def test_a_relation_that_is_not_a_non_empty_string_is_refused(cli, tmp_path, value):
    path = tmp_path / "f.jsonl"
    path.write_text('{"id": "a", "prompt": "The capital of France is", "answer": "Paris"}\n'
                    '{"id": "b", "prompt": "The capital of Japan is", "answer": "Tokyo", "relation": ' + value + '}\n')
    out_dir = tmp_path / "out"
    rc, out, err = cli("run", "--facts", str(path), "--out", str(out_dir), *RUN_FAST)
    assert_input_error(rc, out, err, "f.jsonl:2", "relation", out_dir=out_dir)


# ---------------------------------------------------------------------------------------------
# calibrate (issue 12 item 3)


def test_calibrate_then_run_uses_the_calibration_and_leaves_its_facts_out(cli, facts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ConstrainedFineTune, "calibration_ladder", ({"norm_bound": 1e-7, "lr": 1e-7},
                                                                    {"norm_bound": 1e-6, "lr": 1e-6}))
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "cache"))
    rc, out, err = cli("calibrate", "--facts", str(facts_file), "--objectives", "fact-erasure", "--n-facts", "2",
                       "--known-rank", "1000", "--quiet")
    assert rc == 0, err
    assert "fact-erasure" in out and "norm_bound=1e-06" in out
    path = out.strip().splitlines()[-1].split("calibration: ")[1]
    cal = json.loads(Path(path).read_text())
    assert cal["complete"] and cal["objectives"]["fact-erasure"]["settings"]["norm_bound"] == 1e-6
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(tmp_path / "r"), *RUN_FAST)
    assert rc == 0, err
    assert "calibrated for matched damage" in out and path in out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["defense"]["editor_config"]["norm_bound"] == 1e-6
    assert res["calibration"]["n_excluded"] == 2 and res["calibration"]["source"] == path
    cal_prompts = {p for p, _ in cal["facts"]}
    done = read_jsonl(tmp_path / "r" / "per_fact.jsonl")
    assert len(done) == len(FACTS) - 2 and not {f["prompt"] for f in done} & cal_prompts
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(tmp_path / "r2"), "--calibration", "none",
                       "--norm-bound", "0.5", *RUN_FAST)
    assert rc == 0, err
    res = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert res["defense"]["editor_config"]["norm_bound"] == 0.5 and res["calibration"] is None
    assert len(read_jsonl(tmp_path / "r2" / "per_fact.jsonl")) == len(FACTS) and "built-in settings" in out


@pytest.mark.parametrize("content, needle", [(None, "No such file"), ("{}", "not a probe-attack calibration"),
                                             ("FOREIGN", "with editor constrained-ft, but the job uses")])
def test_bad_calibration_file_is_one_line(cli, facts_file, tmp_path, content, needle):
    path = tmp_path / "cal.json"
    if content == "FOREIGN":
        content = json.dumps({"model": "m", "fingerprint": "abc", "editor": "constrained-ft", "min_neighborhood": 0.9,
                              "max_retention_drop": 0.02, "facts": [], "facts_file": "x", "objectives": {},
                              "complete": True, "created": ""})
    if content is not None:
        path.write_text(content)
    rc, out, err = cli("run", "--facts", str(facts_file), "--out", str(tmp_path / "r"), "--calibration", str(path),
                       *RUN_FAST)
    assert_input_error(rc, out, err, str(path), "'calibration'", needle, out_dir=tmp_path / "r")


@pytest.mark.parametrize("args, needle", [(["--n-facts", "0"], "--n-facts must be >= 1"),
                                          (["--editor", "nope"], "unknown editor 'nope'"),
                                          (["--objectives", "nope"], "unknown defense 'nope'"),
                                          (["--min-neighborhood", "2"], "within [0, 1]")])
def test_calibrate_bad_flags(cli, facts_file, args, needle):
    rc, out, err = cli("calibrate", "--facts", str(facts_file), "--quiet", *args)
    assert_input_error(rc, out, err, needle)


@pytest.mark.parametrize("command", ["run", "grid"])
def test_rome_refuses_facts_without_subject_before_writing(cli, facts_file, tmp_path, command):
    """issue 12 item 6: ROME keys its edit at the subject's last token; a fact without one is refused
    (not keyed on the prompt's last token, which every prompt of the relation shares)."""
    extra = ["--defenses", "fact-erasure"] if command == "grid" else []
    rc, out, err = cli(command, "--facts", str(facts_file), "--out", str(tmp_path / "o"), "--editor", "rome",
                       "--calibration", "none", "--known-rank", "1000", "--quiet", *extra)
    assert_input_error(rc, out, err, f"{facts_file}:1", "'subject'", "fact 'france' has no subject",
                       out_dir=tmp_path / "o")


def test_grid_cli_on_two_ray_workers_matches_the_serial_grid(cli, facts_file, tmp_path):
    """``--workers 2``: each Ray worker loads the model from --model itself (the CLI's factory); the
    cells equal the serial grid's (timings aside)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same float summation order
    try:
        cells = {}
        for workers in ((), ("--workers", "2")):
            out_dir = tmp_path / f"grid{len(workers)}"
            rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(out_dir), "--defenses",
                               "fact-erasure,max-entropy", "--attacks", "head-projection,pd2", "--max-facts", "2",
                               "--random-n", "1", *workers, *RUN_FAST)
            assert rc == 0, err
            grid = strict_json((out_dir / "grid.json").read_text())
            assert grid["complete"] and len(grid["cells"]) == 4
            cells[workers] = grid["cells"]
    finally:
        torch.set_num_threads(threads)
    assert cells[()] == cells[("--workers", "2")]


def test_grid_cli_refuses_zero_workers_in_one_line(cli, facts_file, tmp_path):
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(tmp_path / "g"), "--workers", "0")
    assert rc == 2 and err.strip() == "probe-attack: error: --workers must be >= 1"
    assert not (tmp_path / "g").exists()


def test_grid_cli_without_ray_says_how_to_install_it_in_one_line(cli, facts_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(tmp_path / "g"), "--workers", "2")
    assert rc == 2 and err.strip() == "probe-attack: error: --workers / --ray-address need Ray: pip install 'probe-attack[ray]'"
    assert not (tmp_path / "g").exists()


def test_grid_cli_unreachable_ray_cluster_is_one_line(cli, facts_file, tmp_path, monkeypatch):
    """An address Ray cannot reach (its own connect timeout takes minutes, so ``ray.init`` is made to
    fail as it does then) ends in one line naming the flag, after the known-fact filter, with
    nothing written (no output folder)."""
    import ray

    def unreachable(*a, **k):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", unreachable)
    rc, out, err = cli("grid", "--facts", str(facts_file), "--out", str(tmp_path / "g"), "--ray-address",
                       "10.0.0.1:6379", "--max-facts", "1", "--attacks", "head-projection", *RUN_FAST)
    assert rc == 2 and err.strip() == ("probe-attack: error: --ray-address 10.0.0.1:6379: Ray could not start or "
                                       "connect (ConnectionError: Could not find any running Ray instance. Please "
                                       "specify the one to connect to.)")
    assert not (tmp_path / "g").exists()
