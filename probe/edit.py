"""Editing the residual stream for any code run inside a ``with`` block.

:func:`edit_residual` installs an nnsight in-place edit on chosen decoder layers (project out a
direction, add a steering vector, or any function) that applies to every nnsight trace or
generation of the model run inside the block -- including probe-attack's own
:func:`~probe.residual_stream`, lenses and attacks -- and removes exactly the edits it added on
exit, also when the block raises (TransformerLens PR #156 / issue #1636: pre-existing hooks and
edits are left untouched).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .residual import normalize_layers


def _as_direction(v: torch.Tensor, d_model: int) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != d_model:
        raise ValueError(f"direction(s) must be [d_model] or [k, d_model] with d_model={d_model}, got {tuple(v.shape)}")
    # orthonormal basis of the span, so projecting out several directions is exact
    q, _ = torch.linalg.qr(v.T)
    return q.T.contiguous()  # [k, d_model]


def _build_fn(model, fn, add, project_out, scale) -> Callable[[torch.Tensor, int], torch.Tensor]:
    steps: list[Callable[[torch.Tensor, int], torch.Tensor]] = []
    if project_out is not None:
        basis = _as_direction(project_out, model.d_model)

        def _project(h: torch.Tensor, layer: int) -> torch.Tensor:
            b = basis.to(device=h.device, dtype=h.dtype)
            return h - (h @ b.T) @ b

        steps.append(_project)
    if add is not None:
        def _add(h: torch.Tensor, layer: int) -> torch.Tensor:
            vec = add[layer] if isinstance(add, Mapping) else add
            vec = torch.as_tensor(vec).to(device=h.device, dtype=h.dtype)
            if vec.shape[-1] != h.shape[-1]:
                raise ValueError(f"steering vector has size {vec.shape[-1]}, residual has {h.shape[-1]}")
            return h + scale * vec

        steps.append(_add)
    if fn is not None:
        steps.append(fn)
    if not steps:
        raise ValueError("edit_residual needs fn, add or project_out")

    def _apply(h: torch.Tensor, layer: int) -> torch.Tensor:
        for step in steps:
            h = step(h, layer)
        return h

    return _apply


@contextmanager
def edit_residual(model, layers: int | Sequence[int], fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                  *, add: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
                  project_out: torch.Tensor | None = None, scale: float = 1.0) -> Iterator[None]:
    """Edit the residual stream at ``layers`` for everything run inside the block.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        layers: decoder-layer index or indices whose output (the residual stream) is edited.
        fn: ``fn(resid, layer) -> resid`` on ``[batch, seq, d_model]`` tensors (model dtype).
        add: a steering vector ``[d_model]`` (or a mapping layer -> vector) added at every
            position, times ``scale``.
        project_out: a direction ``[d_model]`` or directions ``[k, d_model]`` whose span is
            removed from the residual at every position (``h - h Q Q^T``).
        scale: multiplier for ``add``.

    Edits compose in the order project_out, add, fn. They apply to nnsight traces and
    generations of ``model`` (all probe-attack functions use them), and are removed on exit,
    also on error; edits or hooks installed before the block are untouched.

    Raises:
        ValueError: nothing to do, or a vector of the wrong size.
        IndexError: a layer out of range.

    Example::

        with probe.edit_residual(model, layers=[20], project_out=model.unembed.weight[paris_id]):
            resid = probe.residual_stream(model, "The Eiffel Tower is in")
    """
    layer_list = normalize_layers(model, layers)
    apply = _build_fn(model, fn, add, project_out, scale)
    envoy = model.nn
    before = list(getattr(envoy, "_edits", []))
    try:
        with envoy.edit(inplace=True):
            for layer in layer_list:
                layer_env = model.layer_envoy(layer)
                out = layer_env.output
                if isinstance(out, tuple):
                    layer_env.output = (apply(out[0], layer),) + tuple(out[1:])
                else:
                    layer_env.output = apply(out, layer)
        yield
    finally:
        envoy._edits = [e for e in getattr(envoy, "_edits", []) if any(e is b for b in before)]
