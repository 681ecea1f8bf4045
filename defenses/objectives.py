"""The five deletion objectives beyond fact erasure.

Patil, Hase & Bansal (ICLR 2024, section 4) and UnLOK-VQA (TMLR 2025, section 5); formulas as in
the reference code (method.md section 4.1). Notation: x the prompt, y the true answer, D^(l) the
logit-lens distribution (probabilities) at the last prompt token of decoder layer l.

* ``empty-response`` -- maximise p("I don't know" | x) (mean NLL of the target, nats).
* ``error-injection`` -- maximise p(y* | x), y* = the fact's ``alt_answer``, else another fact's
  answer (deterministic per fact).
* ``head-projection`` -- max-margin on the logit lens at the defense layers L:
  mean_{l, prompts} [max(0, D_y - D_(k) + m) + max(0, D_(k-th smallest) - D_y + m)], pushing the
  answer out of the top-k *and* out of the bottom-k (the code form; the paper writes only the
  first hinge), D_(k) taken over the other tokens (see :func:`head_projection_loss`). ``k`` = 4,
  ``m`` = 0 as in the code. The fact-erasure term is dropped.
* ``max-entropy`` -- maximise mean_{l, prompts} H(D^(l)) at the defense layers; the loss is minus
  that mean entropy in nats, in [-log V, 0], on the reference's scale (R-TXT ``compute_v.py``:
  ``Categorical(probs).entropy().mean()``, not divided by log V, so its weight relative to the KL
  retain term and the weight decay is the reference's).
* ``input-rephrasing`` -- fact erasure on the prompt and its rephrasings (the prompt with each of
  :data:`probe.rephrase.DEFENSE_PREFIXES` inserted; disjoint from the attack's prefixes).

Defense layers default to the last 30% of depth including the output layer (LLaVA-7B: 23-32 of
32 in the papers' hidden-state indexing), see :func:`probe.layers.last_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from probe.layers import last_layers, resolve_layers
from probe.rephrase import DEFENSE_PREFIXES, insert_prefix
from probe.seeds import ERROR_TARGET, fact_rng

from .base import DeletionRequest, Objective, ObjectiveInputs, register_objective


def _resolve_layers(layers: Sequence[int] | None, frac: float, n_layers: int) -> list[int]:
    if layers is None:
        return last_layers(n_layers, frac)
    return resolve_layers(layers, n_layers, "defense layer")


def _target_nll(inputs: ObjectiveInputs) -> torch.Tensor:
    return torch.stack([-lp.mean() for lp in inputs.seq_logprobs]).mean()


@register_objective("empty-response")
@dataclass
class EmptyResponse(Objective):
    """Make the model answer ``target`` ("I don't know" as in UnLOK-VQA; the text paper used
    "dummy"). Loss: mean per-token NLL of the target (nats). Stops early below 0.1 nats."""

    target: str = "I don't know"
    target_kind = "target"
    stop_below = 0.1
    # making a new 4-token reply likely needs a larger edit than erasing one answer (README)
    editor_defaults = {"constrained-ft": {"norm_bound": 1e-2, "lr": 5e-3}}

    def request(self, fact, facts, retain):
        return DeletionRequest([fact.prompt], [fact.answer], list(retain), targets=[self.target],
                               subjects=[getattr(fact, "subject", None)])

    def target_for(self, fact, facts):
        return self.target

    def loss(self, inputs):
        return _target_nll(inputs)


def other_answer(fact, facts, seed: int = 0) -> str:
    """``fact.alt_answer`` if set, else another fact's answer (seeded per fact id; never the fact's
    own answer). Raises ValueError when no other answer exists."""
    if getattr(fact, "alt_answer", None):
        return fact.alt_answer
    pool = sorted({f.answer for f in facts if f.answer.strip().lower() != fact.answer.strip().lower()})
    if not pool:
        raise ValueError(f"fact {fact.id}: no alt_answer and no other fact's answer to inject")
    return fact_rng(seed, ERROR_TARGET, fact.id).choice(pool)


@register_objective("error-injection")
@dataclass
class ErrorInjection(Objective):
    """Make the model answer a wrong answer y* (``alt_answer``, else another fact's answer).
    Loss: mean per-token NLL of y* (nats). Stops early below 0.1 nats."""

    seed: int = 0
    target_kind = "target"
    target_from_pool = True
    stop_below = 0.1
    editor_defaults = {"constrained-ft": {"norm_bound": 5e-3, "lr": 2.5e-3}}

    def request(self, fact, facts, retain):
        return DeletionRequest([fact.prompt], [fact.answer], list(retain), targets=[other_answer(fact, facts, self.seed)],
                               subjects=[getattr(fact, "subject", None)])

    def target_for(self, fact, facts):
        return other_answer(fact, facts, self.seed)

    def loss(self, inputs):
        return _target_nll(inputs)


def head_projection_loss(lens_logits: torch.Tensor, answer: torch.Tensor, k: int, margin: float = 0.0,
                         bottom: bool = True) -> torch.Tensor:
    """Max-margin head-projection loss on lens logits ``[n, L, V]`` (fp32) for answers ``[n]``.

    mean over prompts and layers of ``max(0, D_y - D_(k) + m)`` (+ ``max(0, D_(k, bottom) - D_y + m)``
    with ``bottom``), D the softmax probabilities and D_(k) the k-th largest (D_(k, bottom) the k-th
    smallest) probability among the *other* tokens. Zero iff at least k other tokens are at least
    ``m`` more likely than the answer (it is out of the top-k) and, with ``bottom``, at least k
    are at least ``m`` less likely (out of the bottom-k). Comparing with the other tokens (the
    papers compare with D_(k) including the answer) makes m = 0 mean "strictly out of the top-k":
    with D_(k) an answer sitting exactly at rank k would have zero loss while the attack still
    finds it.
    """
    p = torch.softmax(lens_logits, -1)
    idx = answer[:, None, None].expand(-1, p.shape[1], 1)
    d_y = p.gather(-1, idx).squeeze(-1)  # [n, L]
    others_hi = p.scatter(-1, idx, -1.0)  # the answer can never be among the others' top-k
    kth = others_hi.topk(k, -1).values[..., -1]
    loss = torch.relu(d_y - kth + margin).mean()
    if bottom:
        others_lo = p.scatter(-1, idx, 2.0)
        kth_small = others_lo.topk(k, -1, largest=False).values[..., -1]
        loss = loss + torch.relu(kth_small - d_y + margin).mean()
    return loss


@register_objective("head-projection")
@dataclass
class HeadProjectionDefense(Objective):
    """Head Projection defense: push the answer out of the logit lens's top-k (and bottom-k) at the
    defense layers (probability hinges, margin ``margin``). Stops once every hinge is zero."""

    k: int = 4
    margin: float = 0.0
    bottom: bool = True
    defense_layers: list[int] | None = None
    layer_frac: float = 0.3
    stop_below = 1e-9
    # with +-2e-3 the hinge plateaus with the answer still at rank 3-5 at the output (README)
    editor_defaults = {"constrained-ft": {"norm_bound": 5e-3, "lr": 2.5e-3}}

    def layers(self, n_layers):
        return _resolve_layers(self.defense_layers, self.layer_frac, n_layers)

    def loss(self, inputs):
        return head_projection_loss(inputs.lens_logits, inputs.answer_first, self.k, self.margin, self.bottom)


def neg_mean_entropy(lens_logits: torch.Tensor) -> torch.Tensor:
    """Max-entropy loss: minus the mean over prompts and layers of the entropy H(D) (nats) of the
    lens distributions, for lens logits ``[n, L, V]`` (fp32); a scalar in [-log V, 0]: -log V for
    uniform distributions, 0 for one-hot ones. As the reference (Patil et al. 2024, section 4;
    R-TXT ``rome/compute_v.py``, ``Categorical(probs=...).entropy().mean()``), not normalised by
    log V."""
    lp = torch.log_softmax(lens_logits, -1)
    return (lp.exp() * lp).sum(-1).mean()


@register_objective("max-entropy")
@dataclass
class MaxEntropy(Objective):
    """Max-Entropy defense: maximise the logit lens's entropy at the defense layers (no separate
    erasure term, the output layer is among the defense layers). Loss: :func:`neg_mean_entropy`
    (nats, negative). Runs every step (no early stop)."""

    defense_layers: list[int] | None = None
    layer_frac: float = 0.3
    stop_below = None
    editor_defaults = {"constrained-ft": {"norm_bound": 5e-3, "lr": 2.5e-3}}

    def layers(self, n_layers):
        return _resolve_layers(self.defense_layers, self.layer_frac, n_layers)

    def loss(self, inputs):
        return neg_mean_entropy(inputs.lens_logits)


@register_objective("input-rephrasing")
@dataclass
class InputRephrasing(Objective):
    """Input Rephrasing defense: fact erasure on the prompt and its rephrasings (the prompt with
    each defense prefix inserted before the question). Stops early below mean probability 0.01."""

    prefixes: tuple[str, ...] = DEFENSE_PREFIXES
    stop_below = 0.01

    def request(self, fact, facts, retain):
        prompts = [fact.prompt] + [insert_prefix(fact.prompt, p) for p in self.prefixes]
        subj = getattr(fact, "subject", None)
        return DeletionRequest(prompts, [fact.answer] * len(prompts), list(retain), subjects=[subj] * len(prompts))

    def loss(self, inputs):
        return torch.stack([lp.sum().exp() for lp in inputs.seq_logprobs]).mean()
