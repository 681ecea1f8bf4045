"""Tests of :mod:`viz.multimodal` and the multimodal sections of the run / grid reports (no model)."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass

import plotly.offline
import pytest
from PIL import Image

import viz
from probe.results import AttackSummary, RunResult
from viz.grid import grid_report_html
from viz.multimodal import (
    MODALITIES,
    modality_map,
    grid_image_rank_figure,
    image_data_uri,
    image_examples_html,
    image_rank_figure,
    modality_figure,
    modality_rows,
    modality_table_html,
    run_modality_rows,
    run_modality_table_html,
)

from test_viz import N_LAYERS, make_result

DATA_URI = "data:image/png;base64,"


def _n_images(page: str) -> int:
    """Embedded PNG data URIs in ``page``, not counting any inside the bundled plotly.js."""
    return page.count(DATA_URI) - plotly.offline.get_plotlyjs().count(DATA_URI)


# --------------------------------------------------------------------------------------------
# a hand-made grid


MOD = {"question-rephrase": "text-only", "jailbreak": "text-only", "image-rephrase": "image-only",
       "multimodal-rephrase": "multimodal"}


def _cell(defense, attack, pre, post, budget=20, n_facts=10, n_skipped=0, kind="blackbox"):
    return {"defense": defense, "attack": attack, "kind": kind, "budget": budget, "success_pre": pre,
            "success_post": post, "n_facts": n_facts, "n_skipped": n_skipped, "rewrite_score": 0.9,
            "modality": MOD.get(attack)}


def make_grid(attacks=("head-projection", "question-rephrase", "jailbreak", "image-rephrase",
                       "multimodal-rephrase")) -> dict:
    vals = {  # attack -> (pre, {defense: post}, budget, n_skipped)
        "head-projection": (0.9, {"rome": 0.6, "memit": 0.5}, 160, 0),
        "question-rephrase": (0.8, {"rome": 0.3, "memit": 0.2}, 20, 0),
        "jailbreak": (0.7, {"rome": 0.25, "memit": 0.15}, 10, 0),
        "image-rephrase": (0.6, {"rome": 0.4, "memit": 0.35}, 12, 3),
        "multimodal-rephrase": (0.75, {"rome": 0.45, "memit": None}, 24, 3),
    }
    cells = []
    for d in ("rome", "memit"):
        for a in attacks:
            pre, post, b, sk = vals[a]
            # the first defense's pre is None for question-rephrase: "unedited" takes the first non-None
            p = None if (a == "question-rephrase" and d == "rome") else pre
            cells.append(_cell(d, a, p, post[d], budget=b, n_skipped=sk, n_facts=10 - sk,
                               kind="whitebox" if a == "head-projection" else "blackbox"))
    return {"model": "synthetic/vlm", "editor": "rome", "defenses": ["rome", "memit"], "attacks": list(attacks),
            "n_facts": 10, "cells": cells,
            "per_layer": {"layers": [0, 1, 2, 3], "pre": [900, 100, 10, 1],
                          "post": {"rome": [900, 500, 300, 200], "memit": [800, 400, 200, 100]}}}


def test_modality_map():
    """Modalities come from the attacks' declared ``modality`` (recorded in every summary and cell),
    in :data:`MODALITIES` order; attacks without one are not modality attacks."""
    import attacks

    assert {n: c.modality for n, c in attacks.ATTACKS.items() if c.modality} == MOD
    assert MODALITIES == ("text-only", "image-only", "multimodal")
    cells = [_cell("d", a, 0, 0) for a in ("multimodal-rephrase", "head-projection", "image-rephrase", "jailbreak")]
    assert modality_map(cells) == {"jailbreak": "text-only", "image-rephrase": "image-only",
                                   "multimodal-rephrase": "multimodal"}


def test_modality_rows_values():
    grid = make_grid()
    rows = modality_rows(grid["cells"])
    assert [r["defense"] for r in rows] == ["unedited", "rome", "memit"]
    assert list(rows[0]["attacks"]) == ["question-rephrase", "jailbreak", "image-rephrase", "multimodal-rephrase"]
    un = rows[0]["attacks"]
    assert un["question-rephrase"]["success"] == 0.8  # first non-None pre (memit's cell)
    assert un["jailbreak"]["success"] == 0.7
    assert un["image-rephrase"] == {"modality": "image-only", "success": 0.6, "budget": 12, "n_facts": 7,
                                    "n_skipped": 3}
    rome, memit = rows[1]["attacks"], rows[2]["attacks"]
    assert rome["question-rephrase"]["success"] == 0.3 and memit["question-rephrase"]["success"] == 0.2
    assert rome["jailbreak"] == {"modality": "text-only", "success": 0.25, "budget": 10, "n_facts": 10,
                                 "n_skipped": 0}
    assert rome["multimodal-rephrase"]["success"] == 0.45 and memit["multimodal-rephrase"]["success"] is None
    assert "head-projection" not in rome
    # explicit defense order, and no modality cells at all
    assert [r["defense"] for r in modality_rows(grid["cells"], ["memit", "rome", "ft"])] == ["unedited", "memit", "rome"]
    assert modality_rows([c for c in grid["cells"] if c["attack"] == "head-projection"]) == []


def test_run_modality_rows():
    others = {"image-rephrase": {"name": "image-rephrase", "kind": "blackbox", "budget": 12, "success_pre": 0.5,
                                 "success_post": 0.25, "n_facts": 4, "n_skipped": 1, "modality": "image-only"},
              "question-rephrase": {"name": "question-rephrase", "kind": "blackbox", "budget": 20,
                                    "success_pre": 1.0, "success_post": None, "n_facts": 5, "n_skipped": 0,
                                    "modality": "text-only"},
              "other": {"name": "other", "kind": "blackbox", "budget": 1, "success_pre": 0, "success_post": 0,
                        "n_facts": 5, "n_skipped": 0}}
    rows = run_modality_rows(others)
    assert [r["defense"] for r in rows] == ["before", "after"]
    assert list(rows[0]["attacks"]) == ["question-rephrase", "image-rephrase"]
    assert rows[0]["attacks"]["image-rephrase"]["success"] == 0.5
    assert rows[1]["attacks"]["image-rephrase"]["success"] == 0.25
    assert rows[1]["attacks"]["question-rephrase"]["success"] is None
    html = run_modality_table_html(others)
    assert "<tr><td>before</td><td>100.0%</td><td>50.0%</td></tr>" in html
    assert "<tr><td>after</td><td>—</td><td>25.0%</td></tr>" in html
    assert "image-rephrase: 1 fact without paraphrase images skipped" in html
    assert run_modality_rows({"other": others["other"]}) == [] and run_modality_table_html({}) == ""


def test_modality_figure_values():
    grid = make_grid()
    fig = modality_figure(grid)
    assert [t.name for t in fig.data] == ["text-only: question-rephrase (B=20)", "text-only: jailbreak (B=10)",
                                          "image-only: image-rephrase (B=12)", "multimodal: multimodal-rephrase (B=24)"]
    assert fig.layout.barmode == "group"
    rows = modality_rows(grid["cells"])
    for t in fig.data:
        assert list(t.x) == ["unedited", "rome", "memit"]
        a = t.meta["attack"]
        expected = [None if r["attacks"][a]["success"] is None else 100 * r["attacks"][a]["success"] for r in rows]
        assert [None if y is None else round(y, 9) for y in t.y] == [
            None if y is None else round(y, 9) for y in expected]
    qr = next(t for t in fig.data if t.meta["attack"] == "question-rephrase")
    assert list(qr.y) == pytest.approx([80.0, 30.0, 20.0])
    mm = next(t for t in fig.data if t.meta["attack"] == "multimodal-rephrase")
    assert mm.y[0] == pytest.approx(75.0) and mm.y[1] == pytest.approx(45.0) and mm.y[2] is None
    # only attacks listed in grid["attacks"]; none of the four -> None
    assert [t.meta["attack"] for t in modality_figure(dict(grid, attacks=["image-rephrase"])).data] == ["image-rephrase"]
    assert modality_figure(dict(grid, attacks=["head-projection"])) is None


def test_modality_table_html():
    grid = make_grid()
    html = modality_table_html(grid)
    assert html.startswith('<table id="modality-table">')
    for head in ("text-only: question-rephrase (B=20)", "text-only: jailbreak (B=10)",
                 "image-only: image-rephrase (B=12)", "multimodal: multimodal-rephrase (B=24)"):
        assert f"<th>{head}</th>" in html
    assert "<tr><td>unedited</td><td>80.0%</td><td>70.0%</td><td>60.0%</td><td>75.0%</td></tr>" in html
    assert "<tr><td>rome</td><td>30.0%</td><td>25.0%</td><td>40.0%</td><td>45.0%</td></tr>" in html
    assert "<tr><td>memit</td><td>20.0%</td><td>15.0%</td><td>35.0%</td><td>—</td></tr>" in html
    assert "image-rephrase: 3 facts without paraphrase images skipped" in html
    assert "multimodal-rephrase: 3 facts without paraphrase images skipped" in html
    assert "head-projection" not in html
    no_skip = make_grid(("question-rephrase", "jailbreak"))
    assert "skipped" not in modality_table_html(no_skip)
    assert modality_table_html(make_grid(("head-projection",))) == ""


# --------------------------------------------------------------------------------------------
# rank per layer with vs without the image


def test_image_rank_figure_medians():
    with_image = {"pre": [[100, 10, 1], [300, None, 3], [200, 30, 2]],
                  "post": [[500, 400, 50], [700, 600, None], [600, 500, None]]}
    text_only = {"pre": [[50, 5, 1], [70, 7, 1], [60, 6, 2]], "post": None}
    fig = image_rank_figure(with_image, text_only, n_layers=3)
    got = {(t.meta["input"], t.meta["phase"]): t for t in fig.data}
    assert set(got) == {("with image", "pre"), ("with image", "post"), ("text only", "pre")}
    assert list(got["with image", "pre"].y) == [200, 30, 2]  # None counts as +inf: median of (10, 30, inf)
    assert list(got["with image", "post"].y) == [600, 500, None]  # two of three unranked -> gap
    assert list(got["text only", "pre"].y) == [60, 6, 1]
    assert got["with image", "pre"].line.dash == "solid" and got["with image", "post"].line.dash == "dash"
    assert got["with image", "pre"].line.color != got["text only", "pre"].line.color
    assert all(t.meta["n"] == 3 for t in fig.data)
    assert fig.layout.yaxis.type == "log"
    assert "text only (entity named, no image)" in got["text only", "pre"].name
    # n_layers pads / cuts
    fig4 = image_rank_figure({"pre": [[3, 2, 1]]}, {"pre": []}, n_layers=4)
    assert len(fig4.data) == 1 and list(fig4.data[0].x) == [0, 1, 2, 3] and list(fig4.data[0].y) == [3, 2, 1, None]


def test_grid_image_rank_figure():
    grid = make_grid()
    text = {"layers": [0, 1, 2, 3], "pre": [50, 5, 2, 1], "post": {"rome": [60, 30, 20, 10]}}
    fig = grid_image_rank_figure(grid["per_layer"], text)
    got = {(t.meta["model"], t.meta["input"]): t for t in fig.data}
    assert set(got) == {("unedited", "with image"), ("unedited", "text only"), ("rome", "with image"),
                        ("rome", "text only"), ("memit", "with image")}
    assert list(got["unedited", "text only"].y) == [50, 5, 2, 1]
    assert list(got["memit", "with image"].y) == [800, 400, 200, 100]
    assert got["rome", "text only"].line.dash == "dash" and got["rome", "with image"].line.dash == "solid"
    assert got["rome", "text only"].line.color == got["rome", "with image"].line.color


# --------------------------------------------------------------------------------------------
# example images


def _png(path, color, size=(4, 3)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_image_data_uri(tmp_path):
    uri = image_data_uri(_png(tmp_path / "a.png", (255, 0, 0)), thumb=16)
    assert uri.startswith(DATA_URI)
    img = Image.open(io.BytesIO(base64.b64decode(uri[len(DATA_URI):])))
    assert img.size == (16, 12) and img.getpixel((5, 5))[:3] == (255, 0, 0)
    assert image_data_uri(tmp_path / "nope.png") is None
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert image_data_uri(tmp_path / "bad.png") is None


def _examples(tmp_path):
    red, green, blue = (_png(tmp_path / f"{c}.png", rgb) for c, rgb in
                        (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))))
    return [
        {"fact_id": "fr<1>", "prompt": "What is the capital of the country of this flag?", "answer": " Paris",
         "image": red, "image_paraphrases": {"easy": [red, green], "medium": [blue], "hard": []},
         "neighborhood_images": [{"image": blue, "answer": " Tokyo"}]},
        {"fact_id": "jp", "prompt": "Capital?", "answer": " Tokyo", "image": blue,
         "image_paraphrases": {"easy": [str(tmp_path / "gone.png")]},
         "neighborhood_images": [{"image": red, "answer": "Paris"}, {"image": green, "answer": "Rome"}]},
        {"fact_id": "extra", "prompt": "p", "answer": "a", "image": red},
    ]


def test_image_examples_html(tmp_path):
    ex = _examples(tmp_path)
    html = image_examples_html(ex, n=2, thumb=32)
    assert '<table id="image-examples">' in html
    # row 1: 1 + 3 paraphrases + 1 neighbour; row 2: 1 + (1 missing) + 2 neighbours; row 3 cut by n=2
    assert html.count(DATA_URI) == 5 + 3
    assert html.count(">missing</span>") == 1
    assert len(re.findall(r"<tr><td><b>", html)) == 2 and "extra" not in html
    assert "fr&lt;1&gt;" in html and "fr<1>" not in html
    for cap in ("easy", "medium", "Tokyo", "Paris", "Rome"):
        assert f"<figcaption>{cap}</figcaption>" in html
    assert "image-rendering:pixelated" in html
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", html)  # self-contained
    assert html.count('width="32"') == 8
    assert image_examples_html(ex, n=10).count(DATA_URI) == 9
    assert image_examples_html([]) == ""


def test_image_examples_missing_everything(tmp_path):
    html = image_examples_html([{"fact_id": "x", "prompt": "p", "answer": "a", "image": None,
                                 "neighborhood_images": [{"image": str(tmp_path / "no.png"), "answer": "b"}]}])
    assert DATA_URI not in html and html.count(">missing</span>") == 2


# --------------------------------------------------------------------------------------------
# reports


def test_grid_report_multimodal_sections(tmp_path):
    grid = make_grid()
    grid["per_layer_text"] = {"layers": [0, 1, 2, 3], "pre": [50, 5, 2, 1],
                              "post": {"rome": [60, 30, 20, 10], "memit": [55, 20, 10, 5]}}
    grid["image_examples"] = _examples(tmp_path)
    text = grid_report_html(grid)
    assert "<h2>Text-only vs image-only vs multimodal attacks</h2>" in text
    assert 'id="modality-table"' in text and 'id="grid-modality-figure"' in text
    assert "<h2>Median answer rank per layer with and without the image</h2>" in text
    assert 'id="grid-image-rank-figure"' in text
    assert '<table id="image-examples">' in text and _n_images(text) == 5 + 3 + 1
    assert text.count('class="plotly-graph-div"') == 4


def test_grid_report_text_only_has_no_multimodal_sections():
    grid = make_grid(("head-projection",))
    text = grid_report_html(grid)
    assert "Text-only vs image-only" not in text and "modality-table" not in text
    assert "with and without the image" not in text and "image-examples" not in text
    assert text.count('class="plotly-graph-div"') == 2
    # a text-only blackbox attack alone still gets the modality section
    assert "<h2>Text-only vs image-only vs multimodal attacks</h2>" in grid_report_html(
        make_grid(("head-projection", "question-rephrase")))


def _modal_result(tmp_path, *, examples=True) -> RunResult:
    res = make_result(n_facts=4)
    facts = []
    for i, f in enumerate(res.facts):
        text_pre = {"rank": [r // 2 + 1 for r in f.pre.rank], "prob": f.pre.prob}
        text_post = {"rank": [r * 2 for r in f.post.rank], "prob": f.post.prob}
        f.modal = {"text_prompt": f"text {i}", "text_pre": text_pre, "text_post": text_post} if i < 3 else None
        facts.append(f)
    res.facts = facts
    res.attacks["image-rephrase"] = AttackSummary("image-rephrase", "blackbox", 12, 0.75, 0.25, n_facts=4,
                                                  modality="image-only")
    res.attacks["multimodal-rephrase"] = AttackSummary("multimodal-rephrase", "blackbox", 24, 1.0, 0.5, n_facts=3,
                                                       n_skipped=1, modality="multimodal")
    if examples:
        res.meta["image_examples"] = _examples(tmp_path)[:2]
    return res


def test_report_html_multimodal_section(tmp_path):
    res = _modal_result(tmp_path)
    text = viz.report_html(res)
    assert text.count("<h2>Multimodal</h2>") == 1
    assert '<table id="modality-table">' in text
    assert "<tr><td>before</td><td>75.0%</td><td>100.0%</td></tr>" in text
    assert "<tr><td>after</td><td>25.0%</td><td>50.0%</td></tr>" in text
    assert "multimodal-rephrase: 1 fact without paraphrase images skipped" in text
    assert 'id="multimodal-figure-0"' in text
    assert '<table id="image-examples">' in text and _n_images(text) == 8
    assert text.count('class="plotly-graph-div"') == len(viz.all_figures(res)) + 1
    assert "image_examples" not in re.search(r'<dl class="meta".*?</dl>', text, re.S).group(0)
    # the image-rank figure's data: medians over the 3 facts with a modal field
    from viz.multimodal import image_rank_figure as irf
    modal = [f for f in res.facts if f.modal]
    fig = irf({"pre": [f.pre.rank for f in modal], "post": [f.post.rank for f in modal]},
              {"pre": [f.modal["text_pre"]["rank"] for f in modal],
               "post": [f.modal["text_post"]["rank"] for f in modal]}, N_LAYERS)
    assert len(fig.data) == 4
    for t in fig.data:
        col = {"with image": {"pre": [f.pre.rank for f in modal], "post": [f.post.rank for f in modal]},
               "text only": {"pre": [f.modal["text_pre"]["rank"] for f in modal],
                             "post": [f.modal["text_post"]["rank"] for f in modal]}}[t.meta["input"]][t.meta["phase"]]
        assert list(t.y) == [sorted(c)[1] for c in zip(*col)]


def test_report_html_examples_only_and_plain_run(tmp_path):
    res = make_result()
    res.meta["image_examples"] = _examples(tmp_path)[:1]
    text = viz.report_html(res)
    assert "<h2>Multimodal</h2>" in text and '<table id="image-examples">' in text
    assert 'id="multimodal-figure-0"' not in text and "modality-table" not in text
    plain = viz.report_html(make_result())
    assert "Multimodal" not in plain and "image-examples" not in plain
    assert plain.count('class="plotly-graph-div"') == 6
    # modal facts without examples: the table is absent when no modality attack ran
    res2 = _modal_result(tmp_path, examples=False)
    for name in ("image-rephrase", "multimodal-rephrase"):
        del res2.attacks[name]
    text2 = viz.report_html(res2)
    assert "<h2>Multimodal</h2>" in text2 and 'id="multimodal-figure-0"' in text2
    assert "modality-table" not in text2 and "image-examples" not in text2
