"""Defense building blocks: deletion objectives and model editors, registered by name.

A *defense* is an objective (what to minimise: e.g. the answer's probability) optimised by an
*editor* (which weights move and how: e.g. constrained fine-tuning of one MLP layer). Patil, Hase
& Bansal (ICLR 2024, section 4) combine each objective with each editor the same way; we keep the
two apart so a new objective is one small class in one file::

    @register_objective("my-objective")
    @dataclass
    class MyObjective(Objective):
        def loss(self, batch: EditBatch, logprobs) -> torch.Tensor: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

OBJECTIVES: dict[str, type] = {}
EDITORS: dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator registering a deletion objective under a CLI name."""
    def deco(cls: type) -> type:
        cls.cli_name = name
        OBJECTIVES[name] = cls
        return cls
    return deco


def register_editor(name: str) -> Callable[[type], type]:
    """Class decorator registering an editor under a CLI name."""
    def deco(cls: type) -> type:
        cls.cli_name = name
        EDITORS[name] = cls
        return cls
    return deco


def make_objective(name: str, **config):
    """Instantiate a registered objective.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown defense {name!r}; valid defenses: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**config)


def make_editor(name: str, **config):
    """Instantiate a registered editor.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; valid editors: {', '.join(EDITORS)}")
    return EDITORS[name](**config)


@dataclass
class DeletionRequest:
    """What to delete: prompts with the answer to remove, and prompts whose behaviour to keep.

    Attributes:
        prompts: prompts (one per fact for the one-at-a-time protocol; all facts at once otherwise).
        answers: the answers to delete, parallel to ``prompts``.
        retain_prompts: prompts whose next-token distribution must not change (KL retain loss):
            other facts' prompts of the same kind, never the evaluated neighbours.
    """

    prompts: list[str]
    answers: list[str]
    retain_prompts: list[str] = field(default_factory=list)


class Objective:
    """A deletion objective: ``loss(answer_logprobs) -> scalar`` to minimise.

    ``answer_logprobs`` is a list, one per deletion prompt, of per-token teacher-forced
    log-probabilities ``[n_answer_tokens]`` (nats, fp32, with gradients).
    """

    cli_name = "objective"

    def loss(self, answer_logprobs: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
