"""Decoder-layer indices: resolving user-given layers and spreading layers over depth.

The one home of every layer rule of the project (attacks, defenses, lenses):

* :func:`resolve_layers`: user-given indices (negative allowed) -> sorted, distinct, non-negative.
* :func:`spread_layers`: ``count`` layers evenly spaced (``linspace`` rounded half-to-even) from a
  start layer to the last layer; the start is given as a fraction of depth measured from the end
  (``span_frac``: the attacks' "last 25% of depth") or from the start (``start_frac``: the linear
  probes' "from a third of depth"). The two rules round their start differently, so each caller
  names the one it uses.
* :func:`last_layers`: the last ``round(frac * n_layers)`` layers (defense layers).
* :func:`layer_at_depth`: one layer at relative depth ``frac`` (edit layers, relearning layers).
"""

from __future__ import annotations

from typing import Iterable

import torch


def resolve_layers(layers: int | Iterable[int] | None, n_layers: int, what: str = "layer", *,
                   error: type[Exception] = ValueError) -> list[int]:
    """Sorted, distinct, non-negative decoder-layer indices of ``layers`` (negative allowed;
    ``None`` = every layer; a single int = one layer).

    Raises:
        ``error`` (ValueError by default): a layer outside ``[-n_layers, n_layers)``; the message
        is ``"{what} {layer} out of range for {n_layers} layers"``.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise error(f"{what} {layer} out of range for {n_layers} layers")
        out.append(layer % n_layers)
    return sorted(set(out))


def resolve_layer(layer: int, n_layers: int, what: str = "layer", *, error: type[Exception] = ValueError) -> int:
    """One layer index (negative allowed) made non-negative; raises like :func:`resolve_layers`."""
    return resolve_layers([layer], n_layers, what, error=error)[0]


def spread_layers(n_layers: int, count: int, *, span_frac: float | None = None,
                  start_frac: float | None = None) -> list[int]:
    """``count`` distinct layers evenly spaced from a start layer to the last layer.

    Exactly one of:

    * ``span_frac``: start at ``n_layers - max(count, round(span_frac * n_layers))`` (the last
      ``span_frac`` of depth, widened to at least ``count`` layers);
    * ``start_frac``: start at ``min(round(start_frac * n_layers), n_layers - count)``.

    Models with at most ``count`` layers use all of them. Rounding collisions are filled with the
    nearest unused layers below the last one.
    """
    if (span_frac is None) == (start_frac is None):
        raise TypeError("spread_layers: give exactly one of span_frac and start_frac")
    if n_layers <= count:
        return list(range(n_layers))
    if span_frac is not None:
        start = n_layers - max(count, int(round(span_frac * n_layers)))
    else:
        start = min(int(round(start_frac * n_layers)), n_layers - count)
    pts = torch.linspace(start, n_layers - 1, count).round().long().tolist()
    out = sorted(set(int(p) for p in pts))
    cand = n_layers - 1
    while len(out) < count and cand >= 0:
        if cand not in out:
            out.append(cand)
        cand -= 1
    return sorted(out)


def last_layers(n_layers: int, frac: float) -> list[int]:
    """The last ``round(frac * n_layers)`` layers (at least one), ending at the output layer."""
    n = max(1, int(round(frac * n_layers)))
    return list(range(n_layers - n, n_layers))


def layer_at_depth(n_layers: int, frac: float) -> int:
    """The layer at relative depth ``frac``: ``round(frac * (n_layers - 1))`` (0 = first layer,
    1 = last)."""
    return int(round(frac * (n_layers - 1)))
