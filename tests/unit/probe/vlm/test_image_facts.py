"""Multimodal facts: the loader's image fields, the built-in flag fact set, the UnLOK-VQA importer
and their CLI commands. Fast: no model is loaded."""

from __future__ import annotations

import json
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import probe
import probe.vlm.image_facts as imf
from probe.cli import main
from probe.facts import load_facts, load_jsonl
from probe.vlm.image_facts import RELATIONS, load_builtin_image_facts, write_builtin_image_facts
from probe.vlm.unlok_vqa import DEFAULT_TEMPLATE, import_unlok_vqa

GOOD = {"id": "g", "prompt": "The capital of Japan is", "answer": "Tokyo"}


def png(path: Path, color=(200, 30, 30), size=(4, 4), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_facts(path: Path, objs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def expect_error(path, line, field, match=None, loader=load_jsonl):
    with pytest.raises(probe.InputError) as ei:
        loader(path)
    err = ei.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert f"{path}:{line}" in str(err) and repr(field) in str(err)
    if match:
        assert match in str(err).lower()
    return err


# ---------------------------------------------------------------------------------------------
# loader


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "data"
    for name, color in (("main", (255, 0, 0)), ("easy0", (0, 255, 0)), ("hard0", (0, 0, 255)),
                        ("other", (9, 9, 9))):
        png(d / "img" / f"{name}.png", color)
    return d


def mm_fact(**over):
    obj = {"id": "flag-capital-france", "prompt": "The capital of this country is", "answer": "Paris",
           "paraphrases": ["This country's capital is"], "image": "img/main.png",
           "image_paraphrases": {"hard": ["img/hard0.png"], "easy": ["img/easy0.png"]},
           "neighborhood_images": [{"image": "img/other.png", "answer": "Tokyo"}],
           "neighborhood": [{"prompt": "The official language of this country is", "answer": "French",
                             "image": "img/main.png"},
                            {"prompt": "The capital of Spain is", "answer": "Madrid"}],
           "text_prompt": "This is the flag of France.\nThe capital of this country is", "entity": "France"}
    obj.update(over)
    return obj


def test_loader_resolves_relative_image_paths(image_dir, tmp_path, monkeypatch):
    f = write_facts(image_dir / "facts.jsonl", [GOOD, mm_fact()])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file, not to the working directory
    text_only, fact = load_facts(f)
    img = image_dir / "img"
    assert not text_only.has_image and text_only.image_paraphrases == {} and text_only.neighborhood_images == []
    assert fact.has_image and fact.image == str(img / "main.png") and Path(fact.image).is_absolute()
    assert fact.image_paraphrases == {"easy": [str(img / "easy0.png")], "hard": [str(img / "hard0.png")]}
    assert list(fact.image_paraphrases) == ["easy", "hard"]  # canonical order
    assert fact.neighborhood_images == [{"image": str(img / "other.png"), "answer": "Tokyo"}]
    assert fact.neighborhood[0] == {"prompt": "The official language of this country is", "answer": "French",
                                    "image": str(img / "main.png")}
    assert fact.neighborhood[1] == {"prompt": "The capital of Spain is", "answer": "Madrid"}  # text-only item
    assert fact.text_prompt.startswith("This is the flag of France.\n") and fact.entity == "France"
    # to_json carries the new fields; a copy elsewhere (absolute paths) loads the same
    d = fact.to_json()
    assert d["image_paraphrases"] and d["neighborhood_images"] and d["entity"] == "France"
    g = write_facts(tmp_path / "copy" / "g.jsonl", [d])
    assert load_jsonl(g)[0].to_json() == d


def test_loader_absolute_path_and_placeholder(image_dir):
    obj = mm_fact(image=str(image_dir / "img" / "main.png"), prompt="USER: <image>\nThe capital of this country is")
    (fact,) = load_jsonl(write_facts(image_dir / "f.jsonl", [obj]))
    assert fact.image == str(image_dir / "img" / "main.png") and fact.prompt.count("<image>") == 1


@pytest.mark.parametrize("over,field,match", [
    ({"image": "img/missing.png"}, "image", "not found"),
    ({"image_paraphrases": {"hard": ["img/hard0.png", "img/x.png"]}}, "image_paraphrases.hard[1]", "image"),
    ({"image_paraphrases": {"extreme": ["img/hard0.png"]}}, "image_paraphrases.extreme", "strength"),
    ({"image_paraphrases": ["img/hard0.png"]}, "image_paraphrases", "object"),
    ({"neighborhood_images": [{"image": "img/other.png"}]}, "neighborhood_images[0].answer", "missing"),
    ({"neighborhood_images": [{"image": "img/other.png", "answer": "a"}] * 2 + [{"image": "nope.png", "answer": "b"}]},
     "neighborhood_images[2].image", "not found"),
    ({"neighborhood": [{"prompt": "p", "answer": "a", "image": "img/gone.png"}]}, "neighborhood[0].image",
     "not found"),
    ({"neighborhood": [{"prompt": "<image> p", "answer": "a"}]}, "neighborhood[0].prompt", "no image"),
    ({"prompt": "<image>\nThe capital <image> is"}, "prompt", "2 times"),
    ({"text_prompt": "<image> This is the flag of France."}, "text_prompt", "no image"),
])
def test_loader_bad_image_fields(image_dir, over, field, match):
    (image_dir / "img" / "x.png").write_text("not an image")
    f = write_facts(image_dir / "facts.jsonl", [GOOD, mm_fact(**over)])
    expect_error(f, 2, field, match)


def test_unreadable_main_image(image_dir):
    (image_dir / "img" / "x.png").write_text("this is text, not a PNG")
    f = write_facts(image_dir / "facts.jsonl", [mm_fact(image="img/x.png")])
    expect_error(f, 1, "image", "not a readable image")


def test_placeholder_without_image(tmp_path):
    f = write_facts(tmp_path / "f.jsonl", [GOOD, {**GOOD, "id": "b", "prompt": "<image>\nThe capital is"}])
    expect_error(f, 2, "prompt", "no image")


def test_image_lists_need_the_main_image(image_dir):
    obj = mm_fact()
    del obj["image"]
    obj["neighborhood"] = []
    f = write_facts(image_dir / "facts.jsonl", [obj])
    expect_error(f, 1, "image_paraphrases", "own image")


# ---------------------------------------------------------------------------------------------
# built-in flag facts, with a small fake renderer (controlled answers, counts calls)


@dataclass(frozen=True)
class FakeCountry:
    name: str
    capital: str
    language: str
    continent: str
    currency: str


FAKE_COUNTRIES = (
    FakeCountry("France", "Paris", "French", "Europe", "euro"),
    FakeCountry("Germany", "Berlin", "German", "Europe", "euro"),
    FakeCountry("Italy", "Rome", "Italian", "Europe", "euro"),
    FakeCountry("Japan", "Tokyo", "Japanese", "Asia", "yen"),
    FakeCountry("Brazil", "Brasília", "Portuguese", "South America", "real"),
    FakeCountry("Côte d'Ivoire", "Yamoussoukro", "French", "Africa", "CFA franc"),
)


@pytest.fixture
def fake_flags(monkeypatch):
    calls = []

    def render_image(name, strength, seed, size=64):
        calls.append((name, strength, seed, size))
        h = sum(map(ord, f"{name}{strength}{seed}"))
        return Image.new("RGB", (size, size), (h % 256, (h // 7) % 256, (seed // 13) % 256))

    def country(name):
        for c in FAKE_COUNTRIES:
            if c.name == name:
                return c
        raise KeyError(name)

    mod = types.ModuleType("fake_flags")
    mod.__file__ = __file__
    mod.COUNTRIES, mod.country, mod.render_image, mod.calls = FAKE_COUNTRIES, country, render_image, calls
    monkeypatch.setattr(imf, "_flags", lambda: mod)
    return mod


def test_builtin_writer_fake(tmp_path, fake_flags):
    path = write_builtin_image_facts(tmp_path / "set", n_per_strength=2, n_neighborhood_images=3)
    assert path == tmp_path / "set" / "facts.jsonl"
    facts = load_jsonl(path)
    n_c, n_r = len(FAKE_COUNTRIES), len(RELATIONS)
    assert len(facts) == n_c * n_r
    assert len({f.id for f in facts}) == len(facts)
    assert "flag-capital-cote-d-ivoire" in {f.id for f in facts}
    # each image written once: a main image + 2 per strength per country, all seeds >= 10**6
    pngs = sorted((tmp_path / "set" / "images").glob("*.png"))
    assert len(pngs) == n_c * (1 + 3 * 2) == len(fake_flags.calls)
    assert all(seed >= 10**6 for _, _, seed, _ in fake_flags.calls)
    assert len({seed for _, _, seed, _ in fake_flags.calls}) == len(fake_flags.calls)
    by_id = {f.id: f for f in facts}
    fr = by_id["flag-capital-france"]
    assert (fr.prompt, fr.answer, fr.entity) == ("The capital of this country is", "Paris", "France")
    assert fr.text_prompt == "This is the flag of France.\nThe capital of this country is"
    assert fr.paraphrases == list(RELATIONS["capital"].paraphrases)
    # every fact carries its relation's name (attack controls come from the same relation); no subject,
    # since the prompt names no entity
    assert (fr.relation, by_id["flag-currency-japan"].relation) == ("capital", "currency")
    assert {(f.relation, f.prompt) for f in facts} == {(r.name, r.prompt) for r in RELATIONS.values()}
    assert all(f.id == f"flag-{f.relation}-{imf.slug(f.entity)}" and f.subject is None for f in facts)
    assert sorted(Counter(f.relation for f in facts).values()) == [n_c] * n_r
    # the main image is shared by the country's four facts and its neighbourhood questions
    fr_facts = [f for f in facts if f.entity == "France"]
    assert len(fr_facts) == 4 and len({f.image for f in fr_facts}) == 1
    assert all(n["image"] == fr.image for n in fr.neighborhood)
    assert sorted(n["answer"] for n in fr.neighborhood) == sorted(["French", "Europe", "euro"])
    assert {k: len(v) for k, v in fr.image_paraphrases.items()} == {"easy": 2, "medium": 2, "hard": 2}
    all_paraphrase_images = [p for v in fr.image_paraphrases.values() for p in v]
    assert fr.image not in all_paraphrase_images and len(set(all_paraphrase_images)) == 6
    main_images = {f.entity: f.image for f in facts}
    for f in facts:
        assert f.alt_answer and f.alt_answer.casefold() != f.answer.casefold()
        assert len(f.neighborhood_images) == 3
        for n in f.neighborhood_images:
            assert n["image"] in main_images.values() and n["image"] != f.image  # shared, another country
            assert n["answer"].casefold() != f.answer.casefold()  # possible here for every relation
    # continent: France's neighbours have three different answers, none "Europe"
    cont = by_id["flag-continent-france"]
    assert sorted(n["answer"] for n in cont.neighborhood_images) == ["Africa", "Asia", "South America"]
    # currency of France: only 3 non-euro countries exist; all are used
    assert {n["answer"] for n in by_id["flag-currency-france"].neighborhood_images} == {"yen", "real", "CFA franc"}


def test_builtin_writer_prefers_different_answers_but_fills_up(tmp_path, fake_flags):
    path = write_builtin_image_facts(tmp_path / "s", relations=["continent"],
                                     countries=["France", "Germany", "Italy", "Japan"], n_per_strength=0,
                                     n_neighborhood_images=3)
    by_id = {f.id: f for f in load_jsonl(path)}
    answers = [n["answer"] for n in by_id["flag-continent-france"].neighborhood_images]
    assert answers[0] == "Asia" and sorted(answers) == ["Asia", "Europe", "Europe"]
    assert by_id["flag-continent-france"].alt_answer == "Asia"
    assert by_id["flag-continent-france"].image_paraphrases == {}


def test_builtin_writer_deterministic(tmp_path, fake_flags):
    a = write_builtin_image_facts(tmp_path / "a", relations="capital,currency", seed=3)
    b = write_builtin_image_facts(tmp_path / "b", relations="capital,currency", seed=3)
    assert a.read_bytes() == b.read_bytes()
    for p in (tmp_path / "a" / "images").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    write_builtin_image_facts(tmp_path / "c", relations="capital,currency", seed=4)  # other seeds, other renders
    assert (tmp_path / "c" / "images" / "france-main.png").read_bytes() != \
        (tmp_path / "a" / "images" / "france-main.png").read_bytes()


def test_builtin_writer_atomic(tmp_path, fake_flags, monkeypatch):
    real = fake_flags.render_image

    def failing(name, strength, seed, size=64):
        if len(fake_flags.calls) >= 10:
            raise RuntimeError("disk full")
        return real(name, strength, seed, size)

    monkeypatch.setattr(fake_flags, "render_image", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_builtin_image_facts(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a temporary directory
    monkeypatch.setattr(fake_flags, "render_image", real)
    fake_flags.calls.clear()
    (tmp_path / "out").mkdir()  # an empty existing directory is fine
    assert write_builtin_image_facts(tmp_path / "out").is_file()
    with pytest.raises(probe.InputError, match="not an empty directory"):  # never overwritten
        write_builtin_image_facts(tmp_path / "out")


@pytest.mark.parametrize("kw,field", [({"relations": ["capital", "colour"]}, "relations"),
                                      ({"countries": ["France", "Atlantis"]}, "countries"),
                                      ({"countries": ["France"]}, "countries"),
                                      ({"n_per_strength": -1}, "n_per_strength")])
def test_builtin_writer_bad_args(tmp_path, fake_flags, kw, field):
    with pytest.raises(probe.InputError) as ei:
        write_builtin_image_facts(tmp_path / "x", **kw)
    assert ei.value.field == field
    assert not (tmp_path / "x").exists()


def test_load_builtin_image_facts_cached(tmp_path, fake_flags, monkeypatch):
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "cache"))
    kw = {"relations": ("capital",), "n_per_strength": 1}
    d = imf.builtin_image_facts_dir(**kw)
    assert d.parent == tmp_path / "cache" / "image-facts"
    assert imf.builtin_image_facts_dir(**kw) == d != imf.builtin_image_facts_dir(relations=("capital",), seed=1)
    facts = load_builtin_image_facts(**kw)
    assert len(facts) == len(FAKE_COUNTRIES) and all(f.has_image for f in facts)
    monkeypatch.setattr(imf, "write_builtin_image_facts", lambda *a, **k: pytest.fail("rewritten"))
    assert [f.to_json() for f in load_builtin_image_facts(**kw)] == [f.to_json() for f in facts]


def test_builtin_writer_real_flags(tmp_path):
    """The real renderer: every country x relation, deterministic, answers that differ."""
    flags = pytest.importorskip("probe.vlm.flags")
    a = write_builtin_image_facts(tmp_path / "a", n_per_strength=1)
    facts = load_jsonl(a)
    assert len(flags.COUNTRIES) >= 48 and len(facts) == len(flags.COUNTRIES) * 4
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == len(flags.COUNTRIES) * 4
    for f in facts:
        assert f.alt_answer and f.alt_answer != f.answer
        assert len(f.neighborhood_images) == 3
        assert all(n["answer"].casefold() != f.answer.casefold() for n in f.neighborhood_images)
        with Image.open(f.image) as im:
            assert im.size == (64, 64)
    sub = dict(countries=[c.name for c in flags.COUNTRIES[:5]], relations="capital,language")
    b = write_builtin_image_facts(tmp_path / "b", **sub)
    c = write_builtin_image_facts(tmp_path / "c", **sub)
    assert b.read_bytes() == c.read_bytes()
    assert len(load_jsonl(b)) == 10


# ---------------------------------------------------------------------------------------------
# UnLOK-VQA importer


def unlok_record(rid, image_id, **over):
    rec = {"id": rid, "src": "What country is famous for this dish?", "pred": "Italy",
           "rephrase": "Which nation is this dish famous in?", "loc": "nq question: who wrote the iliad",
           "loc_ans": "Homer, the poet", "image_id": image_id, "alt_ans": ["Japan", "France", "Spain"],
           "subject": "this dish", "neigh_idx": [0, 1], "answers": ["italy"]}
    rec.update(over)
    return rec


@pytest.fixture
def unlok(tmp_path):
    coco, par, nei = tmp_path / "coco", tmp_path / "par", tmp_path / "nei"
    png(coco / "train2017" / f"{1:012d}.jpg", fmt="JPEG")
    png(coco / "val2017" / f"{2:012d}.jpg", (0, 90, 0), fmt="JPEG")
    png(coco / f"{3:012d}.jpg", (0, 0, 90), fmt="JPEG")
    png(par / "parap_images" / "okvqa" / "101.jpg", fmt="JPEG")
    png(par / "paraphrase_images_hard" / "okvqa_yolo_dino_bert" / "processed_images" / "101.jpg", fmt="JPEG")
    png(nei / "neigh_easy" / "101_0.jpg", fmt="JPEG")
    png(nei / "neigh_easy" / "101_1.jpg", fmt="JPEG")
    png(nei / "neigh_med" / "101_1.jpg", fmt="JPEG")
    png(nei / "neigh_easy" / "102_2.jpg", fmt="JPEG")  # neigh_idx of 102 is [0, 1]: not used
    records = [unlok_record(101, 1),
               unlok_record("102", "2", src="What sport is played here?", pred=" tennis ", rephrase=["a", "b"],
                            loc=["nq question: when did rome fall", ""], loc_ans=["476 AD", ""], alt_ans=[]),
               unlok_record(103, 3, subject="not in the question")]
    path = tmp_path / "unlok.json"
    path.write_text(json.dumps(records, indent=2))
    return types.SimpleNamespace(coco=coco, par=par, nei=nei, path=path, records=records, tmp=tmp_path)


def test_import_unlok_vqa(unlok):
    out = unlok.tmp / "out" / "facts.jsonl"
    facts = import_unlok_vqa(unlok.path, unlok.coco, paraphrase_root=unlok.par, neighborhood_root=unlok.nei, out=out)
    assert [f.id for f in facts] == ["101", "102", "103"]
    f1, f2, f3 = facts
    q = "What country is famous for this dish?"
    assert f1.prompt == DEFAULT_TEMPLATE.replace("{question}", q)
    assert f1.prompt.endswith("USER: <image>\nAnswer the question in one word\n Question: " + q + " Answer: ASSISTANT:")
    assert f1.answer == "Italy" and f1.alt_answer == "Japan" and f1.subject == "this dish"
    assert f1.image == str(unlok.coco / "train2017" / "000000000001.jpg")
    assert f2.image == str(unlok.coco / "val2017" / "000000000002.jpg")
    assert f3.image == str(unlok.coco / "000000000003.jpg") and f3.subject is None
    assert f1.paraphrases == [DEFAULT_TEMPLATE.replace("{question}", "Which nation is this dish famous in?")]
    assert f1.neighborhood == [{"prompt": DEFAULT_TEMPLATE.replace("{question}", "Who wrote the iliad?"),
                                "answer": "Homer", "image": f1.image}]
    # missing paraphrase images are skipped
    assert f1.image_paraphrases == {
        "easy": [str(unlok.par / "parap_images" / "okvqa" / "101.jpg")],
        "hard": [str(unlok.par / "paraphrase_images_hard" / "okvqa_yolo_dino_bert" / "processed_images" / "101.jpg")]}
    assert [(Path(n["image"]).name, n["answer"], n["strength"]) for n in f1.neighborhood_images] == [
        ("101_0.jpg", "Japan", "easy"), ("101_1.jpg", "France", "easy"), ("101_1.jpg", "France", "medium")]
    assert f2.answer == "tennis" and f2.alt_answer is None and len(f2.paraphrases) == 2
    assert [n["answer"] for n in f2.neighborhood] == ["476"]
    assert f2.image_paraphrases == {} and f2.neighborhood_images == []
    # the written file loads with the normal loader, identically
    assert [f.to_json() for f in load_facts(out)] == [f.to_json() for f in facts]
    # JSONL input and --limit
    jl = unlok.tmp / "unlok.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in unlok.records))
    assert [f.id for f in import_unlok_vqa(jl, unlok.coco, limit=2)] == ["101", "102"]


@pytest.mark.parametrize("index,over,field,match", [
    (2, {"image_id": 99}, "image_id", "coco image not found"),
    (3, {"src": None}, "src", "missing"),
    (3, {"src": "  "}, "src", "non-empty"),
    (1, {"pred": None, "answers": None}, "pred", "missing"),
    (2, {"loc": ["nq question: a", "nq question: b"], "loc_ans": ["x"]}, "loc_ans", "answers for"),
    (1, {"alt_ans": []}, "alt_ans", "alt_ans[0]"),
    # errors found while building the fact name the record's field, not the fact's
    (2, {"src": "What is <image> this <image>?"}, "src", "occurs 3 times"),  # + the template's own
    (1, {"rephrase": ["ok?", "<image> twice <image>"]}, "rephrase[1]", "occurs 3 times"),
])
def test_import_unlok_vqa_errors(unlok, index, over, field, match):
    recs = [dict(r) for r in unlok.records]
    recs[index - 1].update(over)
    recs[index - 1] = {k: v for k, v in recs[index - 1].items() if v is not None}
    unlok.path.write_text(json.dumps(recs, indent=2))
    out = unlok.tmp / "o.jsonl"
    with pytest.raises(probe.InputError) as ei:
        import_unlok_vqa(unlok.path, unlok.coco, neighborhood_root=unlok.nei, out=out)
    err = ei.value
    assert (err.file, err.line, err.field) == (str(unlok.path), index, field), str(err)
    assert match in str(err).lower()
    assert not out.exists()


def test_import_unlok_vqa_bad_args(unlok):
    with pytest.raises(probe.InputError, match="directory not found"):
        import_unlok_vqa(unlok.path, unlok.tmp / "nope")
    with pytest.raises(probe.InputError, match="question"):
        import_unlok_vqa(unlok.path, unlok.coco, template="Q: {q}")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_image_facts(tmp_path, fake_flags, capsys):
    out = tmp_path / "flags"
    assert main(["image-facts", "--out", str(out), "--relations", "capital,language", "--per-strength", "1"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "facts.jsonl") in stdout and f"{len(FAKE_COUNTRIES) * 2} facts" in stdout
    assert len(load_jsonl(out / "facts.jsonl")) == len(FAKE_COUNTRIES) * 2
    # existing output folder: one-line error, exit 2, nothing changed
    before = (out / "facts.jsonl").read_bytes()
    assert main(["image-facts", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe-attack: error:") and str(out) in err and "\n" not in err
    assert (out / "facts.jsonl").read_bytes() == before
    assert main(["image-facts", "--out", str(tmp_path / "x"), "--relations", "capital,colour"]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_cli_import_unlok_vqa(unlok, capsys):
    out = unlok.tmp / "facts.jsonl"
    rc = main(["import-unlok-vqa", str(unlok.path), "--coco", str(unlok.coco), "--paraphrase-images", str(unlok.par),
               "--neighborhood-images", str(unlok.nei), "--limit", "2", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "imported 2 facts" in stdout and str(out) in stdout
    assert len(load_jsonl(out)) == 2
    recs = json.loads(unlok.path.read_text())
    recs[1]["image_id"] = 424242
    unlok.path.write_text(json.dumps(recs))
    out2 = unlok.tmp / "facts2.jsonl"
    assert main(["import-unlok-vqa", str(unlok.path), "--coco", str(unlok.coco), "--out", str(out2)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe-attack: error:") and f"{unlok.path}:2" in err and "'image_id'" in err
    assert "\n" not in err and not out2.exists()
    assert not [p for p in unlok.tmp.iterdir() if p.name.startswith(".facts2")]  # no temporary left over


def test_truncated_image_is_refused_at_load_with_file_line_and_field(tmp_path):
    """Regression (found by a fresh-user test): a JPEG with truncated pixel data passes PIL's
    ``verify()`` but fails to decode mid-run; the loader must decode it and name file/line/field."""
    import io

    import numpy as np
    from PIL import Image

    from probe.errors import InputError
    from probe.facts import load_facts

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])  # a JPEG cut in half: verify() says ok
    (tmp_path / "facts.jsonl").write_text(
        '{"id": "a", "prompt": "The capital of this country is", "answer": "Paris"}\n'
        '{"id": "b", "prompt": "The capital of this country is", "answer": "Paris", "image": "trunc.png"}\n')
    with pytest.raises(InputError) as err:
        load_facts(str(tmp_path / "facts.jsonl"))
    assert err.value.line == 2 and err.value.field == "image" and "trunc.png" in str(err.value)


def test_prompt_with_only_the_image_placeholder_is_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from probe.errors import InputError
    from probe.facts import load_facts

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "f.jsonl").write_text('{"id": "a", "prompt": " <image> ", "answer": "Paris", "image": "a.png"}\n')
    with pytest.raises(InputError) as err:
        load_facts(str(tmp_path / "f.jsonl"))
    assert err.value.line == 1 and err.value.field == "prompt" and "no text" in str(err.value)
