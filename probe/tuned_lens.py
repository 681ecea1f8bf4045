"""The tuned lens: one learned affine translator per decoder layer in front of the logit lens.

Belrose et al. (2023), "Eliciting Latent Predictions from Transformers with the Tuned Lens",
section 3: for decoder layer l,

    TunedLens_l(h) = LogitLens(h + A_l h + b_l)        A_l: [d_model, d_model], b_l: [d_model]

with ``A_l`` and ``b_l`` initialised to zero (so an untrained tuned lens *is* the logit lens) and
trained to minimise KL(p_final || p_l) -- the final layer's next-token distribution against the
lens's at layer l -- over every token position of training text. ``LogitLens`` is
:class:`probe.lens.LogitLens` (the model's final norm + unembedding, fp32); both implement
:class:`probe.lens.Lens`. Our layer l is the output of decoder block l; the last layer's output
*is* what the model decodes, so its translator stays the identity (KL = 0 by construction for
both lenses).

This module holds the lens itself: the translators, binding to a model, decoding, the file format
(save / load with fingerprint and shape checks) and the training report stored with it. Training,
the per-layer KL and the on-disk cache (:func:`probe.lens_training.get_tuned_lens`) are in
:mod:`probe.lens_training`; the training text in :mod:`probe.corpus`.

Edited clones (:func:`probe.model.clone_model`) keep the fingerprint of the model they were copied
from, so an attacker on an edited model uses the lens trained on the *unedited* model, decoded
through the edited model's own final norm and unembedding (:meth:`TunedLens.bind`).
"""

from __future__ import annotations

import html
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ProbeAttackError
from .layers import resolve_layer
from .lens import Lens, LogitLens

FORMAT = "probe-attack/tuned-lens"
FORMAT_VERSION = 1


class TunedLensMismatchError(ProbeAttackError, ValueError):
    """A saved tuned lens does not belong to the model it is loaded for (fingerprint or shape)."""


# ----------------------------------------------------------------------------------------
# the lens


class TunedLens(nn.Module, Lens):
    """Per-layer affine translators + the logit lens (Belrose et al. 2023, section 3).

    ``lens.logits(h, l) = LogitLens(h + h @ A_l.T + b_l)``; all arithmetic in fp32.

    Attributes:
        weight: ``[n_layers, d_model, d_model]`` the A_l (out x in), zero-initialised.
        bias: ``[n_layers, d_model]`` the b_l, zero-initialised.
        fingerprint: ``model.fingerprint`` of the model the lens was trained on.
        report: the :class:`TunedLensReport` of its training, if known.

    The unembedding (final norm + W_U) belongs to the model the lens is bound to and is never a
    parameter or part of the ``state_dict``.
    """

    def __init__(self, n_layers: int, d_model: int, vocab_size: int, *, unembed: LogitLens | None = None,
                 fingerprint: str = "", model_name: str = ""):
        super().__init__()
        self.n_layers, self.d_model, self.vocab_size = int(n_layers), int(d_model), int(vocab_size)
        self.fingerprint, self.model_name = fingerprint, model_name
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))
        self.report: TunedLensReport | None = None
        object.__setattr__(self, "_unembed", unembed)  # not a submodule: no model weights in state_dict

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_model(cls, model) -> "TunedLens":
        """An identity-initialised (untrained) tuned lens for a :class:`~probe.model.ProbeModel`;
        its outputs equal the logit lens's exactly."""
        lens = cls(model.n_layers, model.d_model, model.vocab_size, fingerprint=model.fingerprint,
                   model_name=model.name)
        return lens.to(model.device).bind(model)

    def bind(self, model) -> "TunedLens":
        """Decode through ``model``'s final norm and unembedding (the model under attack); returns self.

        Raises:
            TunedLensMismatchError: ``model`` has other ``n_layers`` / ``d_model`` / ``vocab_size``.
        """
        _check_shape(self._meta(), model)
        object.__setattr__(self, "_unembed", LogitLens.from_model(model))
        return self

    @property
    def unembed(self) -> LogitLens:
        if self._unembed is None:
            raise RuntimeError("this TunedLens is not bound to a model: call lens.bind(model)")
        return self._unembed

    # -- decoding --------------------------------------------------------------------------
    def translate(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The translated residual ``h + A_l h + b_l`` (fp32).

        Args:
            resid: ``[..., d_model]`` residual of decoder layer ``layer``; or, with ``layer=None``,
                ``[..., n_layers, d_model]`` holding every layer in order.
        Returns:
            a tensor of the same shape, fp32.
        """
        h = resid.to(device=self.weight.device, dtype=torch.float32)
        if layer is None:
            if h.shape[-2] != self.n_layers:
                raise ValueError(f"expected [..., {self.n_layers}, {self.d_model}] residuals, got {tuple(h.shape)}")
            return h + torch.einsum("...li,loi->...lo", h, self.weight) + self.bias
        layer = self._layer(layer)
        return h + torch.nn.functional.linear(h, self.weight[layer], self.bias[layer])

    def logits(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Tuned-lens logits (fp32): ``[..., vocab]`` for ``[..., d_model]`` residuals of ``layer``,
        or ``[..., n_layers, vocab]`` for ``[..., n_layers, d_model]`` with ``layer=None``."""
        return self.unembed(self.translate(resid, layer))

    def forward(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Same as :meth:`logits` (logits, fp32)."""
        return self.logits(resid, layer)

    def _layer(self, layer: int) -> int:
        return resolve_layer(layer, self.n_layers, "layer", error=IndexError)

    # -- persistence -----------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"fingerprint": self.fingerprint, "n_layers": self.n_layers, "d_model": self.d_model,
                "vocab_size": self.vocab_size, "model_name": self.model_name}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the translators, the model fingerprint and shapes (and the training report) to
        ``path`` atomically (temporary file + ``os.replace``); returns the path."""
        blob = {"format": FORMAT, "version": FORMAT_VERSION, **self._meta(),
                "weight": self.weight.detach().cpu().clone(), "bias": self.bias.detach().cpu().clone(),
                "report": self.report.to_json() if self.report is not None else None}
        return _save_atomic(blob, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "TunedLens":
        """Load a lens saved by :meth:`save` and bind it to ``model``.

        Raises:
            TunedLensMismatchError: the file was trained for another model (fingerprints differ) or
                its n_layers / d_model / vocab do not match ``model``; or it is not a tuned-lens file.
            FileNotFoundError: no such file.
        """
        path = Path(path)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise TunedLensMismatchError(f"{path}: not a probe-attack tuned-lens file ({type(exc).__name__}: {exc})") \
                from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise TunedLensMismatchError(f"{path}: not a probe-attack tuned-lens file")
        if blob["fingerprint"] != model.fingerprint:
            raise TunedLensMismatchError(
                f"{path}: tuned lens trained for model fingerprint {blob['fingerprint']!r} "
                f"({blob.get('model_name') or '?'}), cannot be used with model fingerprint "
                f"{model.fingerprint!r} ({model.name})")
        _check_shape(blob, model, where=str(path))
        lens = cls(blob["n_layers"], blob["d_model"], blob["vocab_size"], fingerprint=blob["fingerprint"],
                   model_name=blob.get("model_name", ""))
        with torch.no_grad():
            lens.weight.copy_(blob["weight"])
            lens.bias.copy_(blob["bias"])
        if blob.get("report"):
            lens.report = TunedLensReport.from_json(blob["report"])
        return lens.to(model.device).bind(model)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, d_model={self.d_model}, vocab={self.vocab_size}, " \
               f"fingerprint={self.fingerprint!r}"


def _check_shape(meta: dict, model, where: str = "tuned lens") -> None:
    want = {"n_layers": model.n_layers, "d_model": model.d_model, "vocab_size": model.vocab_size}
    bad = {k: (meta[k], v) for k, v in want.items() if int(meta[k]) != int(v)}
    if bad:
        desc = ", ".join(f"{k} {a} != {b}" for k, (a, b) in bad.items())
        raise TunedLensMismatchError(f"{where}: lens shape does not match model {model.name!r} "
                                     f"(fingerprint {model.fingerprint!r}): {desc}")


def _save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (:func:`probe.atomic.save_torch_atomic`)."""
    from .atomic import save_torch_atomic

    return save_torch_atomic(obj, path)


# ----------------------------------------------------------------------------------------
# the training report


@dataclass
class TunedLensReport:
    """Held-out quality of a tuned lens against the logit lens.

    Attributes:
        kl_logit, kl_tuned: per decoder layer, mean over held-out tokens of
            KL(p_final || p_lens) in nats (logit lens, tuned lens).
        n_train_tokens, n_heldout_tokens: token positions used (the first position of every
            window, an attention sink, is excluded); the least-squares warm start sees all
            training tokens, Adam a random subset of ``n_adam_tokens``.
        init: per layer, ``"identity"`` or ``"lstsq"``: the warm start that was kept.
        steps: Adam steps on the KL; ``tokens_per_step`` tokens each, all layers.
        seconds: wall time per phase (``texts``, ``collect``, ``eval_before``, ``init``, ``train``,
            ``eval_after``) and ``total``.
        text_source: where the training text came from, and which facts were filtered out of it
            (:func:`probe.corpus.default_text_source`; lenses trained before the filter became a
            parameter say "built-in facts + CounterFact" when CounterFact was filtered out).
    """

    kl_logit: list[float]
    kl_tuned: list[float]
    n_train_tokens: int
    n_heldout_tokens: int
    n_adam_tokens: int = 0
    init: list[str] = field(default_factory=list)
    steps: int = 0
    tokens_per_step: int = 0
    seq_len: int = 0
    lr: float = 0.0
    seed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    text_source: str = ""
    model_name: str = ""
    fingerprint: str = ""
    torch_threads: int = 0

    @property
    def layers(self) -> list[int]:
        return list(range(len(self.kl_logit)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TunedLensReport":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def table(self) -> str:
        """The per-layer KL table as fixed-width text (nats)."""
        lines = [f"{'layer':>5}  {'logit-lens KL':>13}  {'tuned-lens KL':>13}  {'ratio':>6}  init"]
        for i, (a, b) in enumerate(zip(self.kl_logit, self.kl_tuned)):
            ratio = f"{b / a:6.3f}" if a > 1e-6 else "     -"
            lines.append(f"{i:5d}  {a:13.4f}  {b:13.4f}  {ratio}  {self.init[i] if i < len(self.init) else ''}")
        lines.append(f"(nats; mean over {self.n_heldout_tokens} held-out tokens; trained on {self.n_train_tokens} "
                     f"tokens, {self.steps} steps; {self.seconds.get('total', float('nan')):.1f} s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{i}</td><td>{a:.4f}</td><td>{b:.4f}</td></tr>"
                       for i, (a, b) in enumerate(zip(self.kl_logit, self.kl_tuned)))
        cap = html.escape(f"KL(final || lens) in nats, {self.n_heldout_tokens} held-out tokens; "
                          f"{self.model_name} ({self.fingerprint})")
        return (f"<table><caption>{cap}</caption><tr><th>layer</th><th>logit lens</th><th>tuned lens</th></tr>"
                f"{rows}</table>")


__all__ = ["FORMAT", "FORMAT_VERSION", "TunedLensMismatchError", "TunedLens", "TunedLensReport"]
