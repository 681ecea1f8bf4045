"""probe-attack's hidden-state core: load a model, read and edit its residual stream, decode it.

Public API (shapes in each docstring):

- :func:`load_model` -> :class:`ProbeModel`
- :func:`residual_stream` -> ``[batch, n_layers, d_model]`` (or ``[..., n_positions, d_model]``)
- :func:`logit_lens` -> log-probabilities ``[..., vocab]`` (fp32, nats); :class:`Lens`, the common
  interface of :class:`LogitLens` and :class:`probe.tuned_lens.TunedLens`
- :func:`edit_residual` -- a context manager that edits the residual stream at given layers
- :func:`answer_ids`, :func:`encode` -- tokenisation helpers
- :class:`Architecture`, :func:`register_architecture` -- model-family adapters
- :mod:`probe.facts` -- the facts format and loaders
- :mod:`probe.vlm` -- the mini VLM, flags, built-in image facts, UnLOK-VQA (imported last: it
  registers the mini VLM with :func:`probe.model.register_model_loader`)
"""

from . import facts  # noqa: F401  (probe.facts.load_facts, ...)
from .arch import Architecture, UnsupportedArchitectureError, register_architecture, supported_model_types
from .edit import edit_residual
from .errors import InputError, ModelLoadError, ProbeAttackError, PromptTooLongError
from .lens import Lens, LogitLens, lens_logits, logit_lens
from .model import ProbeModel, cache_dir, load_model, register_model_loader, wrap_model
from .residual import get_resid, residual_stream
from .tokens import answer_ids, encode

__all__ = [
    "Architecture", "UnsupportedArchitectureError", "register_architecture", "supported_model_types",
    "edit_residual", "InputError", "ModelLoadError", "ProbeAttackError", "PromptTooLongError",
    "Lens", "LogitLens", "lens_logits", "logit_lens", "ProbeModel", "cache_dir", "load_model",
    "register_model_loader", "wrap_model",
    "get_resid", "residual_stream", "answer_ids", "encode",
]

from . import vlm  # noqa: E402,F401  (last: registers the mini VLM's model loaders)
