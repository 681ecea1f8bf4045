"""Layer indices: resolving user-given layer lists and spreading layers relative to depth.

Our layer ``l`` is the output of decoder block ``l`` (the papers' ``hidden_states[l + 1]``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def resolve_layers(layers: Sequence[int], n_layers: int, what: str) -> list[int]:
    """Sorted, distinct, non-negative decoder-layer indices of ``layers`` (negative allowed).

    Raises:
        ValueError: a layer outside ``[-n_layers, n_layers)`` (the message names ``what``).
    """
    out = []
    for layer in layers:
        if not -n_layers <= int(layer) < n_layers:
            raise ValueError(f"{what}: layer {layer} out of range for {n_layers} layers")
        out.append(int(layer) % n_layers)
    return sorted(set(out))


def spread_layers(n_layers: int, count: int, span_frac: float) -> list[int]:
    """``count`` layers evenly spaced over the last ``span_frac`` of depth, ending at the last layer.

    The span is widened to at least ``count`` layers so the layers are distinct; models with at
    most ``count`` layers use all of them.
    """
    if n_layers <= count:
        return list(range(n_layers))
    start = n_layers - max(count, int(round(span_frac * n_layers)))
    pts = torch.linspace(start, n_layers - 1, count).round().long().tolist()
    out = sorted(set(int(p) for p in pts))
    cand = n_layers - 1  # rounding can merge neighbours on short spans: fill from the end
    while len(out) < count and cand >= 0:
        if cand not in out:
            out.append(cand)
        cand -= 1
    return sorted(out)
