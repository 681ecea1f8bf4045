"""Fact Erasure: minimise the probability of the true answer.

Patil, Hase & Bansal (ICLR 2024), section 4 ("Fact Erasure"); UnLOK-VQA (TMLR 2025) section 5.
The loss is the answer's sequence *probability* p(y | x) = exp(sum_t log p(y_t | x, y_<t)), not its
log-probability, as in the reference code (``baselines/ft/ft_main.py``): it vanishes once the
answer is unlikely instead of pushing log-probabilities to minus infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Objective, ObjectiveInputs, register_objective


@register_objective("fact-erasure")
@dataclass
class FactErasure(Objective):
    """Minimise mean_i p(y_i | x_i) over the deletion prompts (probability, 0..1).

    Stops early (editor ``early_stop="auto"``) once the mean probability is below 0.01.
    """

    stop_below = 0.01

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        lps = inputs.seq_logprobs if isinstance(inputs, ObjectiveInputs) else inputs
        return torch.stack([lp.sum().exp() for lp in lps]).mean()
