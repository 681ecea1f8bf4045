"""The logit lens: decode any layer's residual stream with the model's own final norm and unembedding.

D^(l) = softmax(W_U . Norm(h^(l))) -- Patil, Hase & Bansal (ICLR 2024) section 3; the "head
projection" of the papers; nostalgebraist (2020). The final norm is applied *freshly* to each
layer's residual with its own statistics (TransformerLens issue #1076), exactly once (the
output of the last decoder layer is pre-norm, unlike ``hidden_states[-1]``: transformers PR
#40994), and all arithmetic runs in fp32 (genlm-backend PR #66). On the last layer the lens
reproduces the model's own logits.

:class:`Lens` is what every lens offers -- :meth:`Lens.logits` and :meth:`Lens.log_probs` of a
layer's residual -- implemented by :class:`LogitLens` and :class:`probe.tuned_lens.TunedLens`; any
of them can be passed as ``lens=`` to :func:`probe.readout.lens_readout`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Lens:
    """A decoder of residual-stream vectors into next-token distributions (fp32).

    ``lens(resid)`` returns logits for residuals ``[..., n_layers, d_model]`` holding every
    decoder layer in order (shape ``[..., n_layers, vocab]``), as :meth:`logits` with
    ``layer=None``.
    """

    def logits(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logits (fp32) ``[..., vocab]`` for residuals ``[..., d_model]`` of decoder layer
        ``layer``; ``layer=None``: ``[..., n_layers, d_model]`` -> ``[..., n_layers, vocab]``."""
        raise NotImplementedError

    def log_probs(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Log-probabilities (nats, fp32), shapes as :meth:`logits`."""
        return torch.log_softmax(self.logits(resid, layer), -1)


class LogitLens(nn.Module, Lens):
    """Final norm + unembedding (+ soft-cap) of a model, in fp32: the same decoder at every layer.

    Build with :meth:`from_model`; ``lens(resid)`` returns logits.
    """

    def __init__(self, norm: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
        super().__init__()
        self.norm = norm
        self.weight = weight
        self.bias = bias
        self.softcap = softcap

    @classmethod
    def from_model(cls, model) -> "LogitLens":
        """The lens of a :class:`~probe.model.ProbeModel` (cached on the model; rebuilt when the
        final norm or unembedding parameters are replaced)."""
        unembed = model.unembed
        norm = model.final_norm
        key = ("logit_lens", id(norm), id(unembed.weight), unembed.weight.dtype)
        lens = model._lens_cache.get(key)
        if lens is None:
            if unembed.weight.dtype != torch.float32:
                norm = copy.deepcopy(norm).float()
                weight = unembed.weight.detach().float()
                bias = unembed.bias.detach().float() if getattr(unembed, "bias", None) is not None else None
            else:
                weight, bias = unembed.weight, getattr(unembed, "bias", None)
            lens = cls(norm, weight, bias, model.softcap)
            model._lens_cache.clear()
            model._lens_cache[key] = lens
        return lens

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` (fp32) for residuals ``[..., d_model]``."""
        x = resid.to(device=self.weight.device, dtype=torch.float32)
        x = self.norm(x).float()
        logits = torch.nn.functional.linear(x, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logits ``[..., vocab]`` (fp32) for residuals ``[..., d_model]`` of any layer (``layer``
        is ignored: the logit lens decodes every layer alike)."""
        return self(resid)


def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """Logit-lens logits (fp32) ``[..., vocab]`` for residuals ``[..., d_model]``."""
    return LogitLens.from_model(model)(resid)


def logit_lens(model, resid: torch.Tensor) -> torch.Tensor:
    """Logit-lens log-probabilities (nats, fp32).

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        resid: residual stream ``[..., d_model]``, e.g. ``[batch, n_layers, d_model]`` or
            ``[batch, n_layers, n_positions, d_model]`` from :func:`probe.residual_stream`.

    Returns:
        ``[..., vocab]`` log-probabilities in fp32: ``log_softmax(W_U . Norm(resid))``.

    Source: the logit lens / head projection of Patil et al. (ICLR 2024, section 3;
    TMLR 2025, section 3.1).
    """
    return torch.log_softmax(lens_logits(model, resid), dim=-1)
