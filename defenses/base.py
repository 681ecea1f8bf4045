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
    """Class decorator registering an editor under a CLI name (exposed as ``editor.name``)."""
    def deco(cls: type) -> type:
        cls.name = name
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


def editor_for(objective, editor: str, config: dict | None = None):
    """The editor ``editor`` configured for ``objective``: the objective's
    :attr:`Objective.editor_defaults` for that editor, overridden by ``config`` (the user's)."""
    return make_editor(editor, **{**getattr(objective, "editor_defaults", {}).get(editor, {}), **(config or {})})


@dataclass
class DeletionRequest:
    """What to delete: prompts with the answer to remove, and prompts whose behaviour to keep.

    Attributes:
        prompts: prompts (one per fact for the one-at-a-time protocol; all facts at once
            otherwise; several per fact for the input-rephrasing defense).
        answers: the answers to delete, parallel to ``prompts``.
        retain_prompts: prompts whose next-token distribution must not change (KL retain loss):
            other facts' prompts of the same kind, never the evaluated neighbours.
        targets: for target objectives (empty response, error injection), the sequence to
            make likely after each prompt; None for erasure objectives.
        subjects: the subject string of each prompt (ROME edits at its last token); None entries
            fall back to the prompt's last token.
    """

    prompts: list[str]
    answers: list[str]
    retain_prompts: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    subjects: list[str | None] | None = None

    @property
    def supervised(self) -> list[str]:
        """The sequences teacher-forced after each prompt: the targets if set, else the answers."""
        return list(self.targets) if self.targets is not None else list(self.answers)


@dataclass
class ObjectiveInputs:
    """What an objective's loss sees, all from one forward pass with gradients.

    Attributes:
        seq_logprobs: per deletion prompt, teacher-forced log-probabilities (nats, fp32)
            ``[n_tokens]`` of the supervised sequence (the answer, or the objective's target).
        lens_logits: logit-lens logits (fp32) at the last prompt token of every deletion prompt
            at the objective's defense layers, ``[n_prompts, n_defense_layers, vocab]``; None when
            the objective reads no hidden states.
        answer_first: ``[n_prompts]`` first-token id of the true answer (what must not be
            decodable), long.
        layers: the defense layers (decoder-layer indices) of ``lens_logits``.
    """

    seq_logprobs: list[torch.Tensor]
    lens_logits: torch.Tensor | None
    answer_first: torch.Tensor
    layers: list[int] = field(default_factory=list)


class Objective:
    """A deletion objective: ``loss(ObjectiveInputs) -> scalar`` to minimise.

    Class attributes:
        cli_name: the registered name.
        target_kind: ``None`` (erasure of the answer) or ``"target"`` (make ``request.targets``
            likely: empty response, error injection).
        target_from_pool: the target is another fact's answer (error injection).
        stop_below: default early-stopping threshold on the loss (None: run every step).
    """

    cli_name = "objective"
    target_kind: str | None = None
    #: the target is drawn from other facts' answers (error injection), so its pool is recorded
    #: (:mod:`probe.pool`)
    target_from_pool: bool = False
    stop_below: float | None = None
    #: per editor name, the editor settings this objective needs to reach its purpose (tuned on
    #: SmolLM2, see the README); the user's explicit settings override them.
    editor_defaults: dict = {}

    def layers(self, n_layers: int) -> list[int]:
        """Defense layers whose logit lens the loss reads (empty: output only)."""
        return []

    def request(self, fact, facts, retain: list[str]) -> DeletionRequest:
        """The :class:`DeletionRequest` deleting ``fact`` (``facts``: the run's pool, e.g. for
        another fact's answer)."""
        return DeletionRequest([fact.prompt], [fact.answer], list(retain),
                               subjects=[getattr(fact, "subject", None)])

    def target_for(self, fact, facts) -> str | None:
        """The target sequence whose probability the target rewrite score measures (None for
        erasure objectives)."""
        return None

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
