"""The one forward pass per optimisation step that every editor shares.

One nnsight trace over the deletion rows (``prompt + supervised[:-1]``, where the supervised
sequence is the answer for erasure objectives and the target for empty response / error
injection) followed by the retain prompts. Inside that same trace, with gradients flowing, it
reads the residual stream at each deletion prompt's last token at the objective's defense layers;
the logit lens of those residuals feeds the hidden-state losses (head-projection and max-entropy
defenses; Patil, Hase & Bansal, ICLR 2024, section 4). No second forward pass per step.

An editor that intervenes on activations (ROME adds a vector to one MLP output) passes
``intervene(batch)``, called inside the trace before any read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import nnsight
import torch

from probe.lens import lens_logits
from probe.readout import answer_logprobs
from probe.residual import gather_resid, get_resid
from probe.tokens import Batch, answer_ids, encode_ids, tokenize

from .base import DeletionRequest, Objective, ObjectiveInputs


@dataclass
class PreparedRequest:
    """Token rows of a :class:`DeletionRequest` for one objective (built once per edit).

    Attributes:
        rows: deletion rows ``prompt + supervised[:-1]`` then retain prompts (token ids).
        seq_ids: per deletion row, the supervised sequence's ids.
        prompt_lens: per deletion row, the prompt's token count.
        answer_first: ``[n_del]`` first token id of the true answer in context.
        n_del: number of deletion rows.
        layers: the objective's defense layers.
    """

    rows: list[list[int]]
    seq_ids: list[list[int]]
    prompt_lens: list[int]
    answer_first: torch.Tensor
    n_del: int
    layers: list[int]


def prepare(model, objective: Objective, request: DeletionRequest, *, retain: bool = True) -> PreparedRequest:
    """Tokenise a request for :func:`objective_forward`.

    Raises:
        ValueError: a target objective got a request without targets, or lengths differ.
    """
    tok = model.tokenizer
    if objective.target_kind == "target" and request.targets is None:
        raise ValueError(f"{objective.cli_name}: the deletion request has no targets")
    seqs = request.supervised
    if len(seqs) != len(request.prompts) or len(request.answers) != len(request.prompts):
        raise ValueError("prompts, answers and targets must have the same length")
    p_ids = [tokenize(tok, p) for p in request.prompts]
    s_ids = [answer_ids(tok, p, s) for p, s in zip(request.prompts, seqs)]
    first = [answer_ids(tok, p, a)[0] for p, a in zip(request.prompts, request.answers)]
    rows = [p + s[:-1] for p, s in zip(p_ids, s_ids)]
    if retain:
        rows += [tokenize(tok, p) for p in request.retain_prompts]
    layers = sorted({int(l) % model.n_layers for l in objective.layers(model.n_layers)})
    return PreparedRequest(rows, s_ids, [len(p) for p in p_ids], torch.tensor(first, device=model.device),
                           len(p_ids), layers)


def objective_forward(model, prep: PreparedRequest, *, intervene: Callable[[Batch], None] | None = None,
                      with_retain: bool = True) -> tuple[ObjectiveInputs, torch.Tensor | None]:
    """One traced forward: the objective's inputs and the retain prompts' next-token log-probs.

    Gradients flow to whatever parameters require them (call under ``torch.enable_grad``).

    Returns:
        ``(inputs, retain_logprobs)``: :class:`~defenses.base.ObjectiveInputs`; retain
        log-probabilities ``[n_retain, vocab]`` (fp32, nats) at each retain prompt's last token,
        or None when there are no retain rows (or ``with_retain=False``).
    """
    rows = prep.rows if with_retain else prep.rows[:prep.n_del]
    batch = encode_ids(model, rows)
    T, B = batch.seq_len, len(rows)
    n_del = prep.n_del
    s_len = torch.tensor([len(s) for s in prep.seq_ids], device=batch.lengths.device)
    max_s = int(s_len.max())
    last = T - s_len  # column of the last prompt token of each deletion row (left padding)
    ridx = torch.arange(n_del, device=last.device)
    with model.nn.trace(**batch.model_inputs(), logits_to_keep=max_s):
        if intervene is not None:
            intervene(batch)
        saved = nnsight.save([gather_resid(get_resid(model.layer_envoy(i).output, B)[:n_del], ridx, last,
                                           last.device).save() for i in prep.layers])
        logits = model.nn.output.logits.save()  # [B, max_s, V]
    lp = torch.log_softmax(logits.float(), -1)
    seq_lps, _ = answer_logprobs(lp, prep.seq_ids)
    lens = lens_logits(model, torch.stack(list(saved), 1)) if prep.layers else None
    retain_lp = lp[n_del:, -1] if B > n_del else None
    return ObjectiveInputs(seq_lps, lens, prep.answer_first, list(prep.layers)), retain_lp


def retain_reference(model, prep: PreparedRequest) -> torch.Tensor | None:
    """The retain prompts' next-token log-probabilities before the edit (no grad), or None."""
    if len(prep.rows) <= prep.n_del:
        return None
    with torch.no_grad():
        return objective_forward(model, prep)[1]


@dataclass
class StepLoss:
    """The loss of one optimisation step (one forward pass), as the editor loop needs it.

    Attributes:
        total: the loss to minimise (scalar tensor with gradients): the objective plus the
            editor's regularisers (``retain_weight`` x retain KL; ROME also its essence KL and
            weight decay).
        objective: the objective's own value (what early stopping compares; its unit is the
            objective's: a probability, nats, or a hinge; may be negative).
        retain_kl: the retain prompts' KL(unedited || current) (nats, batch mean, unweighted), or
            None when the step has no retain term. The loop accepts a step whose ``total`` rose
            while this stays under :data:`defenses.editor.RETAIN_KL_CAP`.
    """

    total: torch.Tensor
    objective: float
    retain_kl: float | None = None


def objective_step_loss(model, prep: PreparedRequest, objective: Objective, retain_ref: torch.Tensor | None,
                        retain_weight: float) -> StepLoss:
    """One traced forward's :class:`StepLoss`: the total loss (objective + ``retain_weight`` x
    retain KL, with gradients), the objective's own value and the unweighted retain KL (nats;
    None without retain prompts)."""
    inputs, retain_lp = objective_forward(model, prep)
    loss = objective.loss(inputs)
    obj_val = float(loss.detach())
    kl = None
    if retain_ref is not None:
        kl_t = retain_kl(retain_lp, retain_ref)
        kl = float(kl_t.detach())
        loss = loss + retain_weight * kl_t
    return StepLoss(loss, obj_val, kl)


def retain_kl(retain_lp: torch.Tensor, retain_ref: torch.Tensor) -> torch.Tensor:
    """KL(ref || current) of the retain prompts' next-token distributions, batch mean (nats)."""
    return torch.nn.functional.kl_div(retain_lp, retain_ref, log_target=True, reduction="batchmean")


def stop_threshold(editor_value, objective: Objective) -> float | None:
    """The early-stopping threshold: the editor's explicit value, or the objective's default
    when the editor's is ``"auto"``."""
    if editor_value == "auto":
        return objective.stop_below
    return editor_value

