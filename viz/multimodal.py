"""Figures and HTML pieces for vision-language (LLaVA-style) runs: text vs image vs both.

The blackbox attacks on an image fact are grouped by which input they rephrase (the attack's declared ``modality``):

* ``question-rephrase`` and ``jailbreak`` -- *text-only*: rephrased questions, the original image;
* ``image-rephrase`` -- *image-only*: paraphrase images (same answer), the original question;
* ``multimodal-rephrase`` -- *multimodal*: both at once.

Everything here takes plain data (``grid.json`` dictionaries, per-fact rank lists, example dicts
with image paths), so notebooks can call it without a model; nothing imports torch.

Units: attack success is a fraction of facts (0..1) in the data and a percentage (0..100) in
figures and tables; ranks are 1-based (1 = the model's top token), drawn on a log axis; layers are
0-based decoder layers (the residual stream after block ``ℓ``); image thumbnails are ``thumb``
pixels on their longer side.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go

from .layers import _layout, clean_ranks, median_rank_by_layer

__all__ = ["MODALITIES", "modality_map", "modality_attacks", "modality_rows", "run_modality_rows", "modality_figure",
           "modality_table_html", "run_modality_table_html", "image_rank_figure",
           "grid_image_rank_figure", "image_examples_html", "image_data_uri"]

#: The modalities an attack may declare (``Attack.modality``), in column order of every table and figure.
MODALITIES = ("text-only", "image-only", "multimodal")

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_DEFENSE_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")
_WITH_IMAGE = "with image"
_TEXT_ONLY = "text only (entity named, no image)"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def modality_map(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Attack name -> modality, from summary or cell records that carry ``modality`` (the
    attack's declared :attr:`attacks.base.Attack.modality`; records without one are ignored),
    ordered by :data:`MODALITIES`, then by first appearance."""
    found: dict[str, str] = {}
    for r in records:
        name = r.get("attack") or r.get("name")
        if r.get("modality") in MODALITIES and name not in found:
            found[name] = r["modality"]
    return dict(sorted(found.items(), key=lambda kv: MODALITIES.index(kv[1])))


def modality_attacks(mods: Mapping[str, str]) -> list[str]:
    """The modality attacks of a :func:`modality_map`, in column order."""
    return list(mods)


def _label(attack: str, budget: Any, modality: str) -> str:
    return f"{modality}: {attack} (B={budget if budget is not None else '?'})"


# --------------------------------------------------------------------------------------------
# rows (plain data)


def _entry(attack: str, success: float | None, c: Mapping[str, Any]) -> dict:
    return {"modality": c.get("modality"), "success": success, "budget": c.get("budget"),
            "n_facts": c.get("n_facts"), "n_skipped": c.get("n_skipped", 0) or 0}


def modality_rows(cells: list[dict], defenses: Sequence[str] | None = None) -> list[dict]:
    """Attack success of the modality attacks, unedited and after each defense.

    Args:
        cells: grid cells (``grid.json["cells"]``: dicts with ``defense``, ``attack``, ``kind``,
            ``budget``, ``success_pre``, ``success_post``, ``n_facts``, ``n_skipped``, ...).
            Cells of other attacks are ignored.
        defenses: row order (defenses without a modality cell are left out); default: order of
            first appearance in ``cells``.

    Returns:
        ``[{"defense": "unedited", "attacks": {...}}, {"defense": <name>, "attacks": {...}}, ...]``
        where ``attacks`` maps each modality attack present (in :data:`MODALITY` order) to
        ``{"modality", "success" (0..1 or None), "budget" (candidates), "n_facts", "n_skipped"}``.
        The "unedited" row takes ``success_pre`` -- the same for every defense -- from the first
        cell where it is not None (``n_facts``/``n_skipped`` from that cell); a defense row takes
        ``success_post``. An attack a defense has no cell for is absent from that row's dict.
        ``[]`` when no cell is a modality attack.
    """
    mods = modality_map(cells)
    cells = [c for c in cells if c.get("attack") in mods]
    if not cells:
        return []
    attacks = modality_attacks(mods)
    order = list(dict.fromkeys(c["defense"] for c in cells))
    if defenses is not None:
        order = [d for d in defenses if d in set(order)]
    unedited: dict[str, dict] = {}
    for a in attacks:
        mine = [c for c in cells if c["attack"] == a]
        src = next((c for c in mine if c.get("success_pre") is not None), mine[0])
        unedited[a] = _entry(a, src.get("success_pre"), src)
    rows = [{"defense": "unedited", "attacks": unedited}]
    for d in order:
        by_attack = {c["attack"]: c for c in cells if c["defense"] == d}
        rows.append({"defense": d, "attacks": {a: _entry(a, by_attack[a].get("success_post"), by_attack[a])
                                               for a in attacks if a in by_attack}})
    return rows


def run_modality_rows(summaries: Mapping[str, Any]) -> list[dict]:
    """:func:`modality_rows` for one run: rows ``"before"`` and ``"after"`` the edit.

    Args:
        summaries: ``RunResult.attacks`` (name -> :class:`~probe.results.AttackSummary` or its
            dict: ``name``, ``modality``, ``budget``, ``success_pre``, ``success_post``, ``n_facts``,
            ``n_skipped``).

    Returns:
        ``[{"defense": "before", "attacks": {...}}, {"defense": "after", "attacks": {...}}]`` (the
        "after" row only when some modality attack has a ``success_post``), ``[]`` when no modality
        attack ran.
    """
    summ = {k: (v if isinstance(v, Mapping) else vars(v)) for k, v in summaries.items()}
    attacks = modality_attacks(modality_map(summ.values()))
    if not attacks:
        return []
    rows = [{"defense": "before", "attacks": {a: _entry(a, summ[a].get("success_pre"), summ[a])
                                              for a in attacks}}]
    if any(summ[a].get("success_post") is not None for a in attacks):
        rows.append({"defense": "after", "attacks": {a: _entry(a, summ[a].get("success_post"), summ[a])
                                                     for a in attacks}})
    return rows


def _grid_rows(grid: Mapping[str, Any]) -> tuple[list[str], list[dict]]:
    listed = set(grid.get("attacks") or [])
    attacks = [a for a in modality_attacks(modality_map(grid.get("cells") or [])) if a in listed]
    if not attacks:
        return [], []
    cells = [c for c in grid.get("cells") or [] if c.get("attack") in attacks]
    return attacks, modality_rows(cells, grid.get("defenses"))


def _budgets(attacks: Sequence[str], rows: Sequence[dict]) -> dict[str, Any]:
    out = {}
    for a in attacks:
        out[a] = next((r["attacks"][a]["budget"] for r in rows if a in r["attacks"]
                       and r["attacks"][a]["budget"] is not None), None)
    return out


def _mods(attacks: Sequence[str], rows: Sequence[dict]) -> dict[str, str]:
    return {a: next(r["attacks"][a]["modality"] for r in rows if a in r["attacks"]) for a in attacks}


def _skipped(attacks: Sequence[str], rows: Sequence[dict]) -> dict[str, int]:
    """Per attack, the number of facts it skipped (max over rows: every row sees the same facts)."""
    return {a: max((int(r["attacks"][a]["n_skipped"] or 0) for r in rows if a in r["attacks"]), default=0)
            for a in attacks}


# --------------------------------------------------------------------------------------------
# figure and tables


def modality_figure(grid: Mapping[str, Any]) -> go.Figure | None:
    """Grouped bars: attack success (%) of the text-only / image-only / multimodal attacks.

    Args:
        grid: a ``grid.json`` dictionary (``attacks``, ``defenses``, ``cells``).

    Returns:
        x = ``"unedited"`` (success before any edit) then each defense (success after its edit),
        one bar group per modality attack in ``grid["attacks"]`` (legend
        ``"text-only: question-rephrase (B=20)"``), y = success in percent (0..100; a missing value
        is no bar). Trace ``meta``: ``{"kind": "modality", "attack", "modality", "budget"}``.
        None when none of the modality attacks is in ``grid["attacks"]``.
    """
    attacks, rows = _grid_rows(grid)
    if not attacks:
        return None
    budgets, mods = _budgets(attacks, rows), _mods(attacks, rows)
    xs = [r["defense"] for r in rows]
    fig = go.Figure()
    for i, a in enumerate(attacks):
        ys = []
        for r in rows:
            e = r["attacks"].get(a)
            ys.append(None if e is None or e["success"] is None else 100 * e["success"])
        fig.add_trace(go.Bar(
            x=xs, y=ys, name=_label(a, budgets[a], mods[a]), marker={"color": _PALETTE[i % len(_PALETTE)]},
            text=["" if y is None else f"{y:.0f}%" for y in ys], textposition="outside",
            hovertemplate=f"{_esc(a)} ({mods[a]})<br>%{{x}}: %{{y:.1f}}%<extra></extra>",
            meta={"kind": "modality", "attack": a, "modality": mods[a], "budget": budgets[a]}))
    fig.update_layout(
        title={"text": "Text-only vs image-only vs multimodal attacks: success after each edit"},
        barmode="group", template="plotly_white", height=460, xaxis_title="model",
        yaxis={"title": {"text": "attack success (% of facts)"}, "range": [0, 105]},
        legend={"orientation": "v", "yanchor": "top", "y": 1, "xanchor": "left", "x": 1.02},
        margin={"t": 70, "l": 70, "r": 30, "b": 60})
    return fig


def _table(attacks: Sequence[str], rows: Sequence[dict], table_id: str, first: str) -> str:
    budgets, mods = _budgets(attacks, rows), _mods(attacks, rows)
    head = "".join(f"<th>{_esc(mods[a])}: {_esc(a)} (B={_esc(budgets[a] if budgets[a] is not None else '?')})</th>"
                   for a in attacks)
    body = []
    for r in rows:
        tds = "".join(f"<td>{_pct(r['attacks'][a]['success']) if a in r['attacks'] else '—'}</td>" for a in attacks)
        body.append(f"<tr><td>{_esc(r['defense'])}</td>{tds}</tr>")
    skipped = _skipped(attacks, rows)
    notes = [f"{a}: {n} fact{'s' if n != 1 else ''} without paraphrase images skipped"
             if mods[a] != "text-only" else f"{a}: {n} fact{'s' if n != 1 else ''} skipped"
             for a, n in skipped.items() if n > 0]
    if notes:
        body.append(f"<tr class=\"note\"><td colspan=\"{len(attacks) + 1}\">{_esc('; '.join(notes))}</td></tr>")
    return (f"<table id=\"{table_id}\"><thead><tr><th>{_esc(first)}</th>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>\n")


def modality_table_html(grid: Mapping[str, Any], table_id: str = "modality-table") -> str:
    """The numbers of :func:`modality_figure` as an HTML table.

    Rows: ``unedited`` then each defense; columns: the modality attacks with their budget B in the
    header; values: attack success in percent (``—`` when missing). When an attack skipped facts
    (``n_skipped > 0``), a last note row says so, e.g. ``"image-rephrase: 3 facts without
    paraphrase images skipped"``. ``""`` when no modality attack is in ``grid["attacks"]``.
    """
    attacks, rows = _grid_rows(grid)
    return _table(attacks, rows, table_id, "model") if attacks else ""


def run_modality_table_html(summaries: Mapping[str, Any],
                            table_id: str = "modality-table") -> str:
    """:func:`modality_table_html` for one run (rows ``before`` / ``after`` the edit, see
    :func:`run_modality_rows`); ``""`` when no modality attack ran."""
    rows = run_modality_rows(summaries)
    if not rows:
        return ""
    return _table(list(rows[0]["attacks"]), rows, table_id, "edit")


# --------------------------------------------------------------------------------------------
# rank per layer: with vs without the image


def _fit(ys: Sequence[Any], n_layers: int) -> list[float | None]:
    ys = list(ys)[:n_layers]
    return ys + [None] * (n_layers - len(ys))


def image_rank_figure(with_image: Mapping[str, Any], text_only: Mapping[str, Any], n_layers: int,
                      *, title: str = "Median answer rank per layer: with the image vs text only") -> go.Figure:
    """Median (over facts) answer rank per layer, asked with the image vs in text only.

    Args:
        with_image: ``{"pre": [[rank per layer] per fact], "post": [[...] per fact] or None}`` --
            the image prompt (``FactResult.pre.rank`` / ``.post.rank``), before / after the edit.
        text_only: the same for the text-only form of the question (entity named, no image).
        n_layers: number of decoder layers (x = 0 .. n_layers-1; longer lists are cut, shorter
            ones end in a gap).

    Returns:
        Up to four lines: with image (blue) and text only (orange), before the edit (solid) and
        after it (dashed). Ranks are 1-based on a reversed log axis; ``None``/unranked entries
        count as +inf in the median (:func:`viz.layers.median_rank_by_layer`), so a layer is a gap
        only when half the facts are unranked there. Trace ``meta``: ``{"kind": "image-rank",
        "input": "with image"|"text only", "phase": "pre"|"post", "n": facts, "median": [...]}``.
    """
    fig = go.Figure()
    xs = list(range(n_layers))
    for inp, data, color in ((_WITH_IMAGE, with_image, "#1f77b4"), (_TEXT_ONLY, text_only, "#ff7f0e")):
        for phase in ("pre", "post"):
            rows = [r for r in (data or {}).get(phase) or [] if r is not None]
            if not rows:
                continue
            med = _fit(median_rank_by_layer(rows), n_layers)
            fig.add_trace(go.Scatter(
                x=xs, y=med, mode="lines+markers", connectgaps=False,
                name=f"{inp}, {'before' if phase == 'pre' else 'after'} edit (median of {len(rows)})",
                legendgroup=inp, line={"color": color, "dash": "solid" if phase == "pre" else "dash", "width": 3},
                marker={"size": 5},
                hovertemplate=f"{inp}, {phase}<br>layer %{{x}}<br>median rank %{{y:.4g}}<extra></extra>",
                meta={"kind": "image-rank", "input": "text only" if inp == _TEXT_ONLY else inp, "phase": phase,
                      "n": len(rows), "median": med}))
    return _layout(fig, title, n_layers)


def grid_image_rank_figure(per_layer: Mapping[str, Any], per_layer_text: Mapping[str, Any],
                           *, title: str = "Median answer rank per layer with and without the image") -> go.Figure:
    """Grid version of :func:`image_rank_figure`: per-layer median ranks, unedited and after each
    defense, with the image (solid) and in text only (dashed).

    Args:
        per_layer: ``grid["per_layer"]`` (``{"layers": [...], "pre": [median rank per layer],
            "post": {defense: [median rank per layer]}}``), asked with the image.
        per_layer_text: ``grid["per_layer_text"]``, the same for the text-only questions.

    Returns:
        One colour per model (unedited: black, then one per defense), solid = with image, dashed =
        text only; y: 1-based median rank, reversed log axis. Trace ``meta``: ``{"kind":
        "image-rank", "input", "model"}``.
    """
    fig = go.Figure()
    layers = list(per_layer.get("layers") or per_layer_text.get("layers") or [])
    models = [("unedited", per_layer.get("pre"), per_layer_text.get("pre"), "black")]
    defs = list(dict.fromkeys(list((per_layer.get("post") or {})) + list((per_layer_text.get("post") or {}))))
    for i, d in enumerate(defs):
        models.append((d, (per_layer.get("post") or {}).get(d), (per_layer_text.get("post") or {}).get(d),
                       _DEFENSE_COLORS[i % len(_DEFENSE_COLORS)]))
    for name, img, txt, color in models:
        for inp, ys, dash in (("with image", img, "solid"), ("text only", txt, "dash")):
            if not ys:
                continue
            ys = clean_ranks(ys)
            xs = layers[:len(ys)] if len(layers) >= len(ys) else list(range(len(ys)))
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", connectgaps=False, name=f"{name}, {inp}", legendgroup=name,
                line={"color": color, "dash": dash, "width": 3 if name == "unedited" else 2}, marker={"size": 5},
                hovertemplate=f"{_esc(name)}, {inp}<br>layer %{{x}}<br>median rank %{{y:.4g}}<extra></extra>",
                meta={"kind": "image-rank", "input": inp, "model": name}))
    return _layout(fig, title, len(layers))


# --------------------------------------------------------------------------------------------
# example images


def image_data_uri(path: Any, thumb: int = 64) -> str | None:
    """A ``data:image/png;base64,...`` URI of the image at ``path`` (or a PIL image), resized so
    that its longer side is ``thumb`` pixels (nearest neighbour when enlarging, bilinear when
    shrinking). None when the file is missing or unreadable."""
    try:
        from PIL import Image

        if isinstance(path, Image.Image):
            img = path.copy()
        else:
            if path is None or not os.path.isfile(os.fspath(path)):
                return None
            with Image.open(os.fspath(path)) as im:
                im.load()
                img = im.copy()
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
        w, h = img.size
        if w <= 0 or h <= 0:
            return None
        scale = thumb / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        img = img.resize(size, resample)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 -- any unreadable image is shown as "missing"
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_EXAMPLES_CSS = ("#image-examples td{vertical-align:top;text-align:left}"
                 "#image-examples img{image-rendering:pixelated;border:1px solid #ccc;display:block}"
                 "#image-examples figure{display:inline-block;margin:0 .3em .3em 0;text-align:center}"
                 "#image-examples figcaption{font-size:.8em;color:#444}"
                 "#image-examples .missing{display:inline-block;font-size:.8em;color:#a00;border:1px dashed #a00;"
                 "padding:.2em .4em}")


def image_examples_html(examples: Sequence[Mapping[str, Any]], n: int = 4, thumb: int = 64,
                        base_dir: str | os.PathLike | None = None) -> str:
    """A self-contained HTML table (``id="image-examples"``) of example image facts.

    Args:
        examples: dicts ``{"fact_id", "prompt", "answer", "image": path, "image_paraphrases":
            {"easy"|"medium"|"hard": [paths]}, "neighborhood_images": [{"image": path,
            "answer": str}, ...]}`` (:func:`probe.jobs.image_examples`).
        n: at most this many examples (rows).
        thumb: thumbnail size in pixels (longer side).
        base_dir: directory that relative image paths are resolved against (default: as given).

    Returns:
        One row per example: fact id / prompt / answer, the original image, the paraphrase images
        (one column per strength, labelled easy / medium / hard), and the neighbourhood images
        captioned with their answers. Images are embedded as base64 PNG data URIs (no external
        URL); a missing or unreadable file becomes a small ``missing`` cell. ``""`` for no
        examples.
    """
    examples = list(examples or [])[:max(0, n)]
    if not examples:
        return ""
    cache: dict[Any, str | None] = {}

    def img(path: Any, caption: str | None = None) -> str:
        p = path
        if base_dir is not None and isinstance(p, (str, os.PathLike)) and not os.path.isabs(os.fspath(p)):
            p = Path(base_dir) / p
        key = os.fspath(p) if isinstance(p, (str, os.PathLike)) else id(p)
        if key not in cache:
            cache[key] = image_data_uri(p, thumb)
        uri = cache[key]
        name = os.path.basename(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "image"
        inner = (f"<img src=\"{uri}\" width=\"{thumb}\" alt=\"{_esc(name)}\" title=\"{_esc(name)}\" "
                 f"style=\"width:{thumb}px;height:auto\">" if uri else
                 f"<span class=\"missing\" title=\"{_esc(path)}\">missing</span>")
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption is not None else ""
        return f"<figure>{inner}{cap}</figure>"

    levels = ("easy", "medium", "hard")
    rows = []
    for ex in examples:
        fact = (f"<td><b>{_esc(ex.get('fact_id', ''))}</b><br>{_esc(ex.get('prompt', ''))}<br>"
                f"answer: <b>{_esc(str(ex.get('answer', '')).strip())}</b></td>")
        orig = f"<td>{img(ex.get('image'))}</td>"
        para = ex.get("image_paraphrases") or {}
        paras = "".join(f"<td>{''.join(img(p, lv) for p in para.get(lv) or []) or '—'}</td>" for lv in levels)
        neigh = "".join(img(nb.get("image"), str(nb.get("answer", "")).strip())
                        for nb in ex.get("neighborhood_images") or [] if isinstance(nb, Mapping))
        rows.append(f"<tr>{fact}{orig}{paras}<td>{neigh or '—'}</td></tr>")
    return (f"<style>{_EXAMPLES_CSS}</style>\n<table id=\"image-examples\"><thead><tr><th>fact</th><th>image</th>"
            "<th>paraphrase: easy</th><th>paraphrase: medium</th><th>paraphrase: hard</th>"
            "<th>neighbourhood (other answers)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n")
