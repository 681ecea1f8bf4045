"""Stable edits on Gemma-3-270M (issue 12 item 2): deleting "The chemical symbol for gold is ->
Au" with each editor's default fact-erasure settings keeps the neighbouring element symbols.

Before the editor loop checked each update, the first constrained-FT update (SmolLM2-tuned lr
1e-3, +-2e-3) raised the total loss from 0.274 to 5.64 nats -- the answer's p fell to ~0 but the
retain KL jumped to 5.64 -- and early stopping accepted it (p < 0.01): "The chemical symbol for
silver / iron is" then answered ":" (KL 7.3 / 6.1 nats). LoRA (pass 2: 0.148 -> 3.22) and ROME
(pass 1: 0.385 -> 11.9; also "Water is made of hydrogen and" -> " is") did the same. Now such an
update is undone and redone at half the lr (:func:`defenses.editor.accepted`), so the edit reaches
p < 0.01 with the neighbours' top-1 intact. "... silver is" is not among the retain prompts
(a held-out neighbour); "... iron is" is.
"""

from __future__ import annotations

import pytest

from defenses import make_objective
from defenses.base import editor_for
from defenses.retain import retain_prompts
from probe.facts import load_facts
from probe.jobs import RunConfig
from probe.readout import last_token_logprobs
from probe.tokens import answer_ids

pytestmark = pytest.mark.real

GOLD = "bf-element-symbol-gold"
KEEP = [("The chemical symbol for silver is", "Ag"), ("The chemical symbol for iron is", "Fe"),
        ("Water is made of hydrogen and", "oxygen")]


def first_token_probs(model, pairs):
    """(top-1 is the answer's first token, p of that token) per (prompt, answer)."""
    lps = last_token_logprobs(model, [p for p, _ in pairs])
    out = []
    for lp, (p, a) in zip(lps, pairs):
        tid = answer_ids(model.tokenizer, p, a)[0]
        out.append((int(lp.argmax()) == tid, float(lp[tid].exp())))
    return out


@pytest.mark.parametrize("editor_name", ["constrained-ft", "lora", "rome"])
def test_gemma_gold_deletion_keeps_neighbours(gemma, editor_name):
    facts = load_facts()
    gold = next(f for f in facts if f.id == GOLD)
    cfg = RunConfig()  # the job's retain-set defaults
    retain = retain_prompts(gold, facts, cfg.retain_size, sim_frac=cfg.retain_similar, seed=cfg.seed)
    assert KEEP[0][0] not in retain
    objective = make_objective("fact-erasure")
    editor = editor_for(objective, editor_name)
    pairs = [(gold.prompt, gold.answer)] + KEEP
    pre = first_token_probs(gemma, pairs)
    assert all(top for top, _ in pre), pre  # the unedited model knows all four (p(Au) 0.27, others > 0.8)
    with editor.applied(gemma, objective, objective.request(gold, facts, retain)) as edit:
        post = first_token_probs(edit.model, pairs)
        info = edit.info
    # the SmolLM2-tuned step size blows up on Gemma's MLP: the loop rejected it and shrank the lr
    assert info.extra["rejected_steps"] and info.extra["lr_scale"] < 1, info.extra
    assert post[0][1] < 0.1 * pre[0][1], (pre[0], post[0], info.losses)  # measured: 0.27 -> <= 0.009
    for (prompt, answer), (top, p) in zip(KEEP, post[1:]):
        assert top, (editor_name, prompt, answer, p, info.extra)  # measured: p(Ag) 0.43-0.63, p(Fe) >= 0.78
