"""Residual-stream capture with nnsight.

One nnsight trace per batch reads each requested decoder layer's output (the residual stream
after that layer) and keeps only the requested token positions, so memory scales with
``batch x layers x positions x d_model``, never with the full sequence.
"""

from __future__ import annotations

from typing import Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from .layers import resolve_layers
from .tokens import Batch, encode


def get_resid(layer_output, batch_size: int | None = None) -> torch.Tensor:
    """The residual-stream tensor of a decoder layer's output.

    Decoder layers return a bare tensor in transformers 5 and a tuple ``(hidden, ...)`` in older
    versions and some families; indexing ``[0]`` on a bare tensor would silently take batch row 0
    (nnterp PR #17). This accessor unwraps only containers.

    Returns:
        ``[batch, seq, d_model]``.

    Raises:
        ValueError: the result is not 3-D or its batch size is not ``batch_size``.
    """
    h = layer_output[0] if isinstance(layer_output, (tuple, list)) else layer_output
    if h.ndim != 3 or (batch_size is not None and h.shape[0] != batch_size):
        raise ValueError(f"unexpected residual shape {tuple(h.shape)} (batch {batch_size})")
    return h


def gather_resid(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, device) -> torch.Tensor:
    """``h[rows, cols]`` moved to ``device``: the indices go to ``h``'s device first, since under a
    ``device_map`` a layer may sit on another device than the unembedding (``model.device``).

    Returns:
        ``[*rows.shape broadcast with cols.shape, d_model]`` on ``device``.
    """
    return h[rows.to(h.device), cols.to(h.device)].to(device)


def normalize_layers(model, layers: int | Sequence[int] | None) -> list[int]:
    """Sorted, de-duplicated, non-negative layer indices (``None`` = all layers).

    Raises:
        IndexError: a layer outside ``[-n_layers, n_layers)``.
    """
    return resolve_layers(layers, model.n_layers, "layer", error=IndexError)


def capture(model, batch: Batch, layers: Sequence[int], pos_index: torch.Tensor, *,
            with_logits: bool = False, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one nnsight trace and gather the residual stream at ``pos_index``.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        batch: the encoded, left-padded batch.
        layers: sorted decoder-layer indices.
        pos_index: ``[batch, n_positions]`` absolute column indices into the padded sequence.
        with_logits: also return the model's own logits at those positions.
        grad: keep the autograd graph (for defenses); otherwise runs under ``torch.no_grad``.

    Returns:
        ``(resid, logits)``: resid ``[batch, n_layers, n_positions, d_model]`` in the model's
        dtype; logits ``[batch, n_positions, vocab]`` or None.
    """
    B = batch.input_ids.shape[0]
    rows = torch.arange(B, device=pos_index.device)[:, None]
    ctx = torch.enable_grad() if grad else torch.no_grad()
    last = max(layers) if layers else -1
    with ctx:
        with model.nn.trace(**batch.model_inputs(), logits_to_keep=0 if with_logits else 1) as tracer:
            saved = []
            for layer in layers:
                h = get_resid(model.layer_envoy(layer).output, B)
                saved.append(gather_resid(h, rows, pos_index, pos_index.device).save())
            saved = nnsight.save(saved)
            if with_logits:
                logits = model.nn.output.logits[rows, pos_index].save()
            elif last < model.n_layers - 1 and not grad:
                tracer.stop()
    resid = torch.stack(list(saved), dim=1) if saved else torch.empty(B, 0, pos_index.shape[1], model.d_model)
    return resid, (logits if with_logits else None)


def residual_stream(model, prompts: str | Sequence[str], layers: int | Sequence[int] | None = None,
                    positions: int | Sequence[int] = -1, *, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    """The residual stream (each decoder layer's output) at chosen layers and token positions.

    One nnsight trace per batch; prompts are left-padded with mask-derived ``position_ids`` so
    batched results equal unbatched ones, also for absolute-position models (GPT-2).

    Args:
        model: a :class:`~probe.model.ProbeModel` (see :func:`probe.load_model`).
        prompts: a prompt or a list of prompts.
        layers: decoder-layer indices (negative allowed); None = all layers, in order.
        positions: token position(s) within each prompt's real tokens: ``-1`` (default) is the
            last prompt token, ``0`` the first. An int gives one position; a list gives several.
        batch_size: prompts per trace.
        progress: show a tqdm bar.

    Returns:
        float32 CPU tensor ``[batch, n_layers, d_model]`` for an int ``positions``, or
        ``[batch, n_layers, n_positions, d_model]`` for a list. Layer axis follows the sorted,
        de-duplicated ``layers``.

    Raises:
        InputError: empty prompt; PromptTooLongError: prompt longer than the context window;
        IndexError: a layer or position out of range.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    layer_list = normalize_layers(model, layers)
    outs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="residual stream", disable=not progress):
        batch = encode(model, prompts[start:start + batch_size])
        pos_index = batch.positions(positions)
        resid, _ = capture(model, batch, layer_list, pos_index)
        outs.append(resid.float().cpu())
    resid = torch.cat(outs, 0)
    return resid[:, :, 0] if isinstance(positions, int) else resid
