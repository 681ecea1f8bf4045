"""LoRA on one MLP output projection: UnLOK-VQA's editor.

UnLOK-VQA (TMLR 2025, section 5) and its reference code (R-MM ``lora_ft.py``; method.md section
4.2): the LLaVA runs behind the paper's tables fine-tune **only** ``model.layers.7.mlp.down_proj``
(layer 7 of 32) with a LoRA adapter of rank r = 2, alpha = 6, dropout 0.05, no bias, AdamW with
weight decay 0, lr 1e-2 for 5 epochs (one example: 5 steps), warm-up ratio 0.03 with HF Trainer's
linear schedule, in fp32; the adapter is then merged into the weight and the original weight is
put back after each fact.

Here the adapter is made by ``peft`` (:class:`peft.LoraModel` injected in place into the session's
clone, so module paths stay those of the model), trained for ``steps`` steps on the deletion
objective -- each step one nnsight trace (:func:`defenses.forward.objective_forward`) over the
deletion rows, the lens at the objective's defense layers and the retain prompts -- plus
``retain_weight`` times the KL retain loss as in constrained fine-tuning, then merged
(``merge_and_unload``: W <- W + (alpha / r) B A, transposed for GPT-2's Conv1D). The edited model
is a plain model with one changed weight and the module tree it was built with, so
``session.model`` (and its nnsight envoy) keeps working; :meth:`EditSession.restore` copies the
original weight back bit for bit.

Defaults: r, alpha, dropout, no bias, AdamW with weight decay 0 and lr 1e-2 are the reference's.
Its 5 steps with a linearly decaying lr are too few on SmolLM2-135M (after 5 constant-lr steps
p("Paris" | "The capital of France is") is still 0.47 of 0.77), so the default is up to 20 steps
at a constant lr, stopping early once the objective's threshold is reached (fact erasure:
p < 0.01; ~8 steps on average for CounterFact facts); ``schedule="linear"``, ``warmup_ratio=0.03``
and ``steps=5`` give the reference's schedule. Default layer: ``layer_frac`` 0.22 (layer 7 of
32 in the reference; 6 of 30 on SmolLM2).

Determinism: the adapter's random init (``lora_A``, Kaiming-uniform) and the LoRA dropout masks are
drawn inside ``torch.random.fork_rng`` seeded with ``seed``, so the same edit gives the same
weights and the global RNG is untouched. Only the LoRA dropout runs in training mode; the rest of
the model stays in eval mode (the reference trains LLaVA in train mode, whose dropouts are 0).
During training the adapted model is traced through a fresh nnsight envoy
(:func:`probe.model.wrap_model`), since injection changes the module tree; the session's own
envoy is never rebuilt.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from probe.arch import get_attr_path
from probe.model import only_trainable, wrap_model

from .base import DeletionRequest, Objective, register_editor
from .editor import Editor, EditSession, Steps
from .forward import objective_step_loss, prepare, retain_reference


def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def lr_factor(step: int, steps: int, warmup_ratio: float, schedule: str) -> float:
    """HF Trainer's learning-rate multiplier at optimiser step ``step`` (0-based) of ``steps``:
    linear warm-up over ``ceil(warmup_ratio * steps)`` steps, then constant (``"constant"``) or
    linear decay to 0 (``"linear"``, the Trainer default)."""
    warm = math.ceil(warmup_ratio * steps)
    if step < warm:
        return step / max(1, warm)
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - warm))


@register_editor("lora")
@dataclass
class LoRA(Editor):
    """LoRA fine-tuning of one layer's MLP output projection, merged after training.

    Attributes:
        layer: decoder layer to edit; None = ``layer_frac`` of depth (:func:`probe.layers.layer_at_depth`).
        layer_frac: relative depth of the default layer (UnLOK-VQA: layer 7 of 32, ~0.22;
            SmolLM2-135M: layer 6 of 30).
        rank: LoRA rank r.
        alpha: LoRA alpha (scale alpha / r).
        dropout: LoRA dropout probability (seeded, see the module docstring).
        lr: AdamW learning rate.
        steps: optimisation steps (one batch of all deletion rows per step: the reference's
            epochs).
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of ``steps`` of linear warm-up.
        schedule: ``"linear"`` (decay to 0, HF Trainer default) or ``"constant"`` after warm-up.
        retain_weight: weight of the KL retain loss on ``request.retain_prompts`` (0 disables it).
        early_stop: stop once the objective's loss is below this value; ``"auto"`` (default) uses
            the objective's threshold (fact erasure: p < 0.01); None runs every step.
        seed: seed of the adapter init and the dropout masks.
    """

    layer: int | None = None
    layer_frac: float = 0.22
    rank: int = 2
    alpha: float = 6.0
    dropout: float = 0.05
    lr: float = 1e-2
    steps: int = 20
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    retain_weight: float = 1.0
    early_stop: float | str | None = "auto"
    seed: int = 0

    #: the edit size: adapter rank and steps (lr 1e-2)
    calibration_ladder: ClassVar[tuple[dict, ...]] = (
        {"rank": 1, "steps": 5}, {"rank": 1, "steps": 10}, {"rank": 2, "steps": 10}, {"rank": 2, "steps": 20},
        {"rank": 4, "steps": 20}, {"rank": 8, "steps": 30})
    #: below the ladder: the lr halved, up to 4 times (SmolLM2's empty response and error injection
    #: break the damage target at rank 1, 5 steps)
    calibration_max_descent: ClassVar[int] = 4

    @classmethod
    def calibration_weaker(cls, rung: dict) -> dict | None:
        return {**rung, "lr": rung.get("lr", cls.lr) / 2}

    @contextlib.contextmanager
    def _run(self, session: EditSession, objective: Objective, request: DeletionRequest):
        """Train a LoRA adapter on ``objective`` (AdamW, the lr schedule set before every step),
        then merge it into ``session.model``'s weight. On error the adapter is removed (the base
        restores the weight).

        Raises:
            ValueError: unknown ``schedule``.
        """
        from peft import LoraConfig, LoraModel

        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use linear or constant")
        model = session.model
        hf = model.hf
        module_name = session.param_name.rsplit(".", 1)[0]
        conv1d = _is_conv1d(get_attr_path(hf, module_name))
        prep = prepare(model, objective, request, retain=bool(self.retain_weight))
        retain_ref = retain_reference(model, prep)
        stop = self._stop(objective)

        flags = {p: p.requires_grad for p in hf.parameters()}
        modes = {m: m.training for m in hf.modules()}
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                         target_modules=[module_name], fan_in_fan_out=conv1d)
        tuner = None
        merged = False
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                tuner = LoraModel(hf, cfg, "default")
                lora_layer = get_attr_path(hf, module_name)
                params = [p for n, p in lora_layer.named_parameters() if "lora_" in n]
                # the adapted tree, traced through its own envoy (wrap_model also sets eval mode)
                adapted = wrap_model(hf, model.tokenizer, name=model.name, fingerprint=model.fingerprint,
                                     processor=model.processor)
                lora_layer.lora_dropout.train()
                opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

                lr_at = {"step": 0, "scale": 1.0}

                def apply_lr() -> None:
                    factor = lr_factor(lr_at["step"], self.steps, self.warmup_ratio, self.schedule)
                    for group in opt.param_groups:
                        group["lr"] = self.lr * lr_at["scale"] * factor

                def set_lr(scale: float) -> None:  # the loop's backtracking, on top of the schedule
                    lr_at["scale"] = scale
                    apply_lr()

                def loss(step: int):
                    lr_at["step"] = step
                    apply_lr()
                    return objective_step_loss(adapted, prep, objective, retain_ref, self.retain_weight)

                with only_trainable(adapted, params), torch.enable_grad():
                    yield Steps(self.steps, loss, opt.step, params, opt, set_lr, stop=stop)
            with torch.no_grad():
                tuner.merge_and_unload()  # W <- W + (alpha / r) B A, module tree back to the original
            merged = True
        except BaseException:
            if tuner is not None and not merged:
                tuner.unload()
            raise
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)
            for m, t in modes.items():
                m.train(t)
