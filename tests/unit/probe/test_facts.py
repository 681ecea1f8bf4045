"""Facts loaders: every bad input gives an InputError naming the file, the line and the field."""

from __future__ import annotations

import json

import pytest

import probe
import probe.facts
from probe.facts import Fact, load_counterfact, load_facts, load_jsonl

GOOD = {"id": "capital-japan", "prompt": "The capital of Japan is", "answer": "Tokyo"}


def write_lines(path, lines, encoding="utf-8"):
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def expect_error(path, line=None, field=None, match=None, loader=load_jsonl):
    with pytest.raises(probe.InputError) as ei:
        loader(path)
    err = ei.value
    msg = str(err)
    assert err.file == str(path) and str(path) in msg
    if line is not None:
        assert err.line == line and f"{path}:{line}" in msg
    if field is not None:
        assert err.field == field and repr(field) in msg
    if match is not None:
        assert match in msg.lower()
    return err


def test_good_file(tmp_path):
    full = {"id": "x", "prompt": "The capital of France is", "answer": " Paris ", "paraphrases": ["France's capital is"],
            "neighborhood": [{"prompt": "The capital of Spain is", "answer": "Madrid"}], "alt_answer": "Lyon"}
    f = write_lines(tmp_path / "f.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(full)])
    facts = load_jsonl(f)
    assert [x.id for x in facts] == ["capital-japan", "x"]
    assert facts[1].answer == "Paris"  # stripped
    assert facts[1].paraphrases == ["France's capital is"]
    assert facts[1].neighborhood == [{"prompt": "The capital of Spain is", "answer": "Madrid"}]
    assert facts[1].alt_answer == "Lyon" and facts[1].image is None
    assert facts[0].source == f"{f}:1" and facts[1].source == f"{f}:4"  # blank lines still counted
    # to_json round-trips
    g = write_lines(tmp_path / "g.jsonl", [json.dumps(x.to_json()) for x in facts])
    assert [x.to_json() for x in load_jsonl(g)] == [x.to_json() for x in facts]


def test_int_id_and_bom(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({**GOOD, "id": 7}).encode() + b"\n")
    (fact,) = load_jsonl(f)
    assert fact.id == "7"


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jsonl", match="not found")


def test_directory(tmp_path):
    expect_error(tmp_path, match="directory")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    expect_error(f, match="empty")


def test_not_json(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps(GOOD), "{not json", json.dumps({**GOOD, "id": "b"})])
    expect_error(f, line=2, match="json")


@pytest.mark.parametrize("missing", ["id", "prompt", "answer"])
def test_missing_field(tmp_path, missing):
    obj = {k: v for k, v in GOOD.items() if k != missing}
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, "id": "a"}), json.dumps(obj)])
    expect_error(f, line=2, field=missing, match="missing")


@pytest.mark.parametrize("fld,value,match", [
    ("answer", 5, "string"), ("prompt", ["x"], "string"), ("answer", None, "string"),
    ("id", True, "non-empty"), ("id", "  ", "non-empty"), ("id", {"a": 1}, "non-empty"),
    ("paraphrases", "not a list", "list"), ("neighborhood", {"prompt": "x"}, "list"),
    ("alt_answer", 3, "string"), ("image", 1, "string"),
])
def test_wrong_type(tmp_path, fld, value, match):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, fld: value})])
    expect_error(f, line=1, field=fld, match=match)


@pytest.mark.parametrize("fld", ["answer", "prompt"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_empty_text(tmp_path, fld, value):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, "id": "a"}), json.dumps({**GOOD, "id": "b"}),
                                          json.dumps({**GOOD, "id": "c", fld: value})])
    expect_error(f, line=3, field=fld, match="empty")


@pytest.mark.parametrize("obj,field", [
    ({"paraphrases": ["ok", ""]}, "paraphrases[1]"),
    ({"neighborhood": [{"prompt": "p"}]}, "neighborhood[0].answer"),
    ({"neighborhood": [{"prompt": "p", "answer": "a"}, "x"]}, "neighborhood[1]"),
    ({"neighborhood": [{"prompt": " ", "answer": "a"}]}, "neighborhood[0].prompt"),
    ({"prompt": "nul\u0000inside"}, "prompt"),
])
def test_nested_field_errors(tmp_path, obj, field):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, **obj})])
    expect_error(f, line=1, field=field)


def test_duplicate_id_names_both_lines(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "id": "other"}), json.dumps(GOOD)])
    err = expect_error(f, line=3, field="id", match="duplicate")
    assert "line 1" in str(err) and GOOD["id"] in str(err)


def test_binary_garbage(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"\x00\x01\x02garbage\x00\xff\n")
    expect_error(f, line=2, match="binary")


def test_non_utf8(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"id": "b", "prompt": "Ça va", "answer": "x"}'.encode("latin-1")
                  + b"\n")
    expect_error(f, line=2, match="utf-8")


@pytest.mark.parametrize("line", ["[1, 2]", '"just a string"', "42", "null"])
def test_not_an_object(tmp_path, line):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps(GOOD), line])
    expect_error(f, line=2, match="object")


def test_fact_from_dict_defaults():
    fact = probe.facts.fact_from_dict(GOOD, file="mem", line=9)
    assert isinstance(fact, Fact) and fact.source == "mem:9"
    assert fact.paraphrases == [] and fact.neighborhood == [] and fact.alt_answer is None
    assert fact.relation is None and fact.subject is None


def test_relation_and_subject_read(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [
        json.dumps({**GOOD, "relation": " capital ", "subject": "Japan"}),
        json.dumps({**GOOD, "id": "no-relation"})])
    a, b = load_jsonl(f)
    assert (a.relation, a.subject) == ("capital", "Japan")  # stripped
    assert (b.relation, b.subject) == (None, None)
    assert a.to_json()["relation"] == "capital"
    g = write_lines(tmp_path / "g.jsonl", [json.dumps(x.to_json()) for x in (a, b)])
    assert [x.relation for x in load_jsonl(g)] == ["capital", None]


@pytest.mark.parametrize("value,match", [(3, "non-empty string"), ("", "non-empty string"),
                                         ("  ", "non-empty string"), (["P36"], "non-empty string")])
def test_relation_refused(tmp_path, value, match):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, "relation": "capital"}),
                                          json.dumps({**GOOD, "id": "b", "relation": value})])
    expect_error(f, line=2, field="relation", match=match)


def test_subject_not_in_prompt_refused(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({**GOOD, "subject": "France"})])
    expect_error(f, line=1, field="subject", match="does not occur")


# ---------------------------------------------------------------------------------------------
# CounterFact


def test_counterfact_real_file(counterfact_path):
    facts = load_counterfact(counterfact_path)
    assert len(facts) == 1400
    raw = json.loads(counterfact_path.read_text())
    rec, f0 = raw[0], facts[0]
    rw = rec["requested_rewrite"]
    assert f0.id == str(rec["case_id"])
    assert f0.prompt == rw["prompt"].format(rw["subject"])
    assert f0.prompt == "The mother tongue of Danielle Darrieux is"
    assert f0.answer == rw["target_true"]["str"] == "French"
    assert f0.alt_answer == rw["target_new"]["str"] == "English"
    assert f0.paraphrases == rec["paraphrase_prompts"]
    assert [n["prompt"] for n in f0.neighborhood] == rec["neighborhood_prompts"]
    assert all(n["answer"] == "French" for n in f0.neighborhood)
    assert f0.source == f"{counterfact_path}:2"
    assert f0.relation == rw["relation_id"] == "P103" and f0.subject == rw["subject"] == "Danielle Darrieux"
    assert all(f.relation == r["requested_rewrite"]["relation_id"] for f, r in zip(facts, raw))
    assert len({f.relation for f in facts}) == 32
    assert len({f.id for f in facts}) == 1400
    assert all(f.prompt.strip() and f.answer.strip() for f in facts)
    # auto-detection picks the CounterFact loader
    assert [f.id for f in load_facts(counterfact_path)[:3]] == [f.id for f in facts[:3]]


def _cf_record(case_id, prompt="The capital of {} is", subject="France", true="Paris", new="Lyon"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject,
                                                      "target_true": {"str": true}, "target_new": {"str": new}},
            "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["The capital of Spain is"]}


def _record_start_line(text, index):
    starts = [i for i, ln in enumerate(text.split("\n"), 1) if ln == "  {"]
    return starts[index]


def test_counterfact_prompt_without_placeholder(tmp_path):
    recs = [_cf_record(0), _cf_record(1, prompt="The capital of France is")]
    text = json.dumps(recs, indent=2)
    f = tmp_path / "cf.json"
    f.write_text(text)
    expect_error(f, line=_record_start_line(text, 1), field="requested_rewrite.prompt", match="{}",
                 loader=load_counterfact)


def test_counterfact_missing_target(tmp_path):
    bad = _cf_record(1)
    del bad["requested_rewrite"]["target_true"]
    text = json.dumps([_cf_record(0), bad], indent=2)
    f = tmp_path / "cf.json"
    f.write_text(text)
    expect_error(f, line=_record_start_line(text, 1), field="requested_rewrite", match="target_true",
                 loader=load_counterfact)


def test_counterfact_duplicate_and_empty_answer(tmp_path):
    text = json.dumps([_cf_record(0), _cf_record(0)], indent=2)
    f = tmp_path / "dup.json"
    f.write_text(text)
    expect_error(f, line=_record_start_line(text, 1), field="case_id", match="duplicate", loader=load_counterfact)
    text = json.dumps([_cf_record(0, true="  ")], indent=2)
    f.write_text(text)
    expect_error(f, line=2, field="answer", match="empty", loader=load_counterfact)


@pytest.mark.parametrize("content,line", [('{"a": 1}', 1), ("[1, 2]", 1), ("[\n{bad", 2)])
def test_counterfact_bad_shapes(tmp_path, content, line):
    f = tmp_path / "cf.json"
    f.write_text(content)
    expect_error(f, line=line, loader=load_counterfact)


def test_counterfact_good_small(tmp_path):
    f = tmp_path / "cf.json"
    f.write_text(json.dumps([_cf_record(3), _cf_record(4, subject="Japan", true="Tokyo", new="Kyoto")], indent=2))
    facts = load_facts(f)  # auto-detected
    assert [(x.id, x.prompt, x.answer, x.alt_answer) for x in facts] == [
        ("3", "The capital of France is", "Paris", "Lyon"), ("4", "The capital of Japan is", "Tokyo", "Kyoto")]


def test_counterfact_relation_id(tmp_path):
    with_rel = _cf_record(1)
    with_rel["requested_rewrite"]["relation_id"] = "P36"
    blank = _cf_record(2, subject="Japan", true="Tokyo", new="Kyoto")
    blank["requested_rewrite"]["relation_id"] = "  "
    f = tmp_path / "cf.json"
    f.write_text(json.dumps([with_rel, blank, _cf_record(3, subject="Spain", true="Madrid")], indent=2))
    facts = load_counterfact(f)
    assert [(x.id, x.relation, x.subject) for x in facts] == [("1", "P36", "France"), ("2", None, "Japan"),
                                                              ("3", None, "Spain")]


# ---------------------------------------------------------------------------------------------
# built-in set and load_facts


def test_builtin_facts():
    facts = load_facts(None)
    assert len(facts) >= 100
    ids = [f.id for f in facts]
    assert len(set(ids)) == len(ids)
    for f in facts:
        assert f.prompt.strip() and f.answer.strip() and f.answer == f.answer.strip()
        assert all(n["answer"].strip() and n["prompt"].strip() for n in f.neighborhood)
        assert all(p.strip() for p in f.paraphrases)
    by_id = {f.id: f for f in facts}
    assert by_id["bf-capital-france"].answer == "Paris"


def test_builtin_facts_relation_and_subject():
    """Every built-in fact names its relation (attack controls are other answers of the same relation)
    and its subject (ROME and causal tracing key on the subject's tokens)."""
    from collections import defaultdict

    from probe.matching import answer_matches

    facts = load_facts(None)
    answers = defaultdict(set)
    for f in facts:
        assert isinstance(f.relation, str) and f.relation == f.relation.strip() != "", f.id
        assert isinstance(f.subject, str) and f.subject == f.subject.strip() != "", f.id
        assert f.prompt.count(f.subject) == 1, f.id  # the first occurrence is the subject
        assert not answer_matches(f.subject, f.answer), f.id  # the subject does not give the answer away
        answers[f.relation].add(f.answer.casefold())
    n_facts = {r: sum(f.relation == r for f in facts) for r in answers}
    assert min(n_facts.values()) >= 2 and min(len(a) for a in answers.values()) >= 2, answers
    by_id = {f.id: f for f in facts}
    assert (by_id["bf-capital-czech-republic"].relation, by_id["bf-capital-czech-republic"].subject) == \
        ("capital", "Czech Republic")
    assert by_id["bf-us-state-capital-utah"].relation == "us-state-capital"  # not the countries' capitals
    assert (by_id["bf-inventor-python"].relation, by_id["bf-inventor-telephone"].relation) == \
        ("programming-language-creator", "inventor")
    assert len(answers) == 34


def test_load_facts_formats(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps(GOOD)])
    assert [x.id for x in load_facts(f)] == [GOOD["id"]]
    assert [x.id for x in load_facts(f, fmt="jsonl")] == [GOOD["id"]]
    with pytest.raises(probe.InputError) as ei:
        load_facts(f, fmt="csv")
    assert ei.value.field == "format" and "csv" in str(ei.value)
    with pytest.raises(probe.InputError):
        load_facts(tmp_path / "missing.jsonl")
