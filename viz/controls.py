"""HTML pieces that set an attack's success against its control (run and grid reports).

Every attack summary (:class:`probe.results.AttackSummary`, and each grid cell
:class:`probe.results.Cell`) carries, next to ``success_pre`` / ``success_post``:

* ``success_control_pre`` / ``success_control``: the same rule scored on each fact's *control*
  answer (:mod:`probe.controls`: another answer of the fact's relation that the model does not
  give for the prompt) on the unedited / the attacked model; ``control`` names the source;
* ``excess`` = ``success_post - success_control`` (``success_pre - success_control_pre``
  without an edit): the headline number (method.md section 10);
* lens attacks: ``success_output_*`` (answer in the top-k of the output layer alone) and
  ``success_hidden_*`` (the attack with the output layer removed, budget ``budget_hidden``);
* relearning: ``success_taught`` (facts the model never knew that the relearned weights put in
  the candidate set).

Results written before these fields existed lack them; every cell then shows "—". Functions take
the summaries as dataclasses or as plain ``grid.json`` / ``results.json`` dictionaries. All values
are fractions (0..1) in the data and percentages in the tables; text from the results is
HTML-escaped.
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["get", "pct", "control_legend_html", "control_sources", "is_lens", "is_relearning",
           "HIDDEN_NOTE", "TAUGHT_NOTE", "hidden_table_html", "taught_table_html", "unedited_excess"]

#: One sentence per column of :func:`hidden_table_html`.
HIDDEN_NOTE = ("For each lens attack: <b>output</b> = the answer's first token is in the top-k of the output "
               "layer alone (what the model's own output distribution gives away); <b>hidden only</b> = the attack "
               "with the output layer removed from its layers (budget B<sub>h</sub>: what only the hidden states "
               "carry), with its control; <b>all layers</b> = the attack as run (hidden layers and output, budget B), "
               "with its control. Hidden-only success above its control while output success is near zero is "
               "knowledge the edit hid from the output but did not remove.")

#: What the taught column means.
TAUGHT_NOTE = ("<b>taught</b>: what the same relearning puts in the candidate set for facts the model never knew "
               "(first answer token ranked beyond 100 before any edit) -- success reached by teaching, not by "
               "recovering. Relearning recovers a deleted fact only in so far as its success exceeds both the "
               "control and taught.")


def get(x: Any, name: str, default: Any = None) -> Any:
    """``x[name]`` of a dict or ``x.name`` of a dataclass; ``default`` when missing (old files)."""
    if x is None:
        return default
    v = x.get(name, default) if isinstance(x, Mapping) else getattr(x, name, default)
    return default if v is None else v


def pct(x: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal (``"+12.5%"`` when ``signed``); ``"—"`` for None."""
    if x is None:
        return "—"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def control_sources(summaries: Iterable[Any]) -> list[str]:
    """The distinct ``control`` labels of ``summaries`` (first-seen order; missing ones skipped)."""
    out: list[str] = []
    for s in summaries:
        c = get(s, "control")
        if c and c not in out:
            out.append(c)
    return out


def control_legend_html(summaries: Iterable[Any], edited: bool = True) -> str:
    """The paragraph at the top of every attack section: what control and excess mean, and where
    this result's controls came from (``<p id="control-legend">``)."""
    srcs = control_sources(summaries)
    src = (f" Control answers here: {_esc(', '.join(srcs))}." if srcs
           else " These results have no control answers (written before controls, or no fact had one): "
                "control and excess show —.")
    extra = ""
    if any("any-relation" in s for s in srcs):
        extra += (" <i>any-relation</i>: the facts file has no relations, or no other answer of the fact's "
                  "relation passed the tests, so the control is another fact's answer of any relation (a weaker "
                  "control).")
    if any("built-in" in s for s in srcs):
        extra += (" <i>built-in</i>: no answer of the facts file qualified (e.g. a file of one fact), so the "
                  "control is a built-in fact's answer, of the same relation name when there is one.")
    if "relation prior" in srcs:
        extra += (" <i>relation prior</i> (linear probe): the control is the probe's answer-frequency baseline "
                  "of the relation, not a control answer.")
    head = "post − control" if edited else "pre − control (no edit in this run)"
    return ("<p class=\"legend\" id=\"control-legend\"><b>How to read the attack numbers.</b> "
            "<b>success</b> = fraction of the facts the attack did not skip whose answer is in its candidate set "
            "of size B, on the unedited model (pre) and after the edit (post). "
            "<b>control</b> = the same rule scored on another answer of the fact's relation that the model does "
            "not give for this prompt (same candidate set, samples or relearned weights): what the attack reaches "
            f"without knowing the fact. <b>excess = {head}</b> is the headline: the success that is about this "
            f"fact.{src}{extra}</p>\n")


def is_lens(s: Any) -> bool:
    """A lens attack: its summary has output-only or hidden-only success."""
    return any(get(s, k) is not None for k in ("success_output_pre", "success_output_post", "success_hidden_pre",
                                               "success_hidden_post"))


def is_relearning(s: Any) -> bool:
    """A relearning attack (``kind == "relearning"`` or a taught rate)."""
    return get(s, "kind") == "relearning" or get(s, "success_taught") is not None


def _phase_values(s: Any, phase: str) -> tuple:
    """(output, hidden, hidden control, all layers, control) of one model state."""
    if phase == "pre":  # the hidden-only control is scored on the attacked model: unedited only without an edit
        hid_c = get(s, "success_hidden_control") if get(s, "success_post") is None else None
        return (get(s, "success_output_pre"), get(s, "success_hidden_pre"), hid_c, get(s, "success_pre"),
                get(s, "success_control_pre"))
    return (get(s, "success_output_post"), get(s, "success_hidden_post"), get(s, "success_hidden_control"),
            get(s, "success_post"), get(s, "success_control"))


def hidden_table_html(rows: Sequence[tuple[str, str, Any, str]], table_id: str = "hidden-table") -> str:
    """Output-only vs hidden-only vs all layers, one row per ``(model state label, attack name,
    summary, phase)`` with ``phase`` ``"pre"`` (unedited model) or ``"post"`` (after the edit);
    ``""`` when ``rows`` is empty. The hidden-only control is scored on the attacked model only
    (``success_hidden_control``): an unedited row shows it only when the summary has no edit."""
    if not rows:
        return ""
    body = []
    for state, name, s, phase in rows:
        out, hid, hid_c, full, ctl = _phase_values(s, phase)
        bh = get(s, "budget_hidden")
        body.append(f"<tr><td>{_esc(state)}</td><td>{_esc(name)}</td><td>{pct(out)}</td><td>{pct(hid)}</td>"
                    f"<td>{pct(hid_c)}</td><td>{bh if bh is not None else '—'}</td><td>{pct(full)}</td>"
                    f"<td>{pct(ctl)}</td><td>{get(s, 'budget', '—')}</td></tr>")
    return (f"<table id=\"{table_id}\"><thead><tr><th>model</th><th>attack</th><th>output (top-k)</th>"
            "<th>hidden only</th><th>hidden-only control</th><th>B<sub>h</sub></th><th>all layers</th>"
            "<th>control</th><th>B</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>\n"
            f"<p class=\"note\">{HIDDEN_NOTE}</p>\n")


def taught_table_html(rows: Sequence[tuple[str, str, Any]], table_id: str = "taught-table") -> str:
    """Relearning: success next to its control and the taught rate, one row per ``(model state
    label, attack name, summary)`` (the summary's post values when it has them, else pre);
    ``""`` when ``rows`` is empty."""
    if not rows:
        return ""
    body = []
    for state, name, s in rows:
        edited = get(s, "success_post") is not None
        ctl = get(s, "success_control") if edited else get(s, "success_control_pre", get(s, "success_control"))
        body.append(f"<tr><td>{_esc(state)}</td><td>{_esc(name)}</td><td>{get(s, 'budget', '—')}</td>"
                    f"<td>{pct(get(s, 'success_pre'))}</td><td>{pct(get(s, 'success_post'))}</td>"
                    f"<td>{pct(ctl)}</td><td>{pct(get(s, 'success_taught'))}</td>"
                    f"<td>{pct(get(s, 'excess'), signed=True)}</td></tr>")
    return (f"<table id=\"{table_id}\"><thead><tr><th>model</th><th>attack</th><th>B</th><th>success pre</th>"
            "<th>success post</th><th>control</th><th>taught</th><th>excess</th></tr></thead><tbody>"
            + "".join(body) + "</tbody></table>\n" + f"<p class=\"note\">{TAUGHT_NOTE}</p>\n")


def unedited_excess(cells: Sequence[Any]) -> float | None:
    """The unedited model's excess of one attack over a grid's cells: the mean over defenses of
    ``success_pre - success_control_pre`` (the cells differ only by the facts a defense failed
    on); None when no cell has both."""
    vals = [get(c, "success_pre") - get(c, "success_control_pre") for c in cells
            if get(c, "success_pre") is not None and get(c, "success_control_pre") is not None]
    return sum(vals) / len(vals) if vals else None
