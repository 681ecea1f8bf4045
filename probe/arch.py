"""Architecture adapters: the one place that knows each model family's module paths.

Everything else in probe-attack asks an :class:`Architecture` for the decoder layers (whose
outputs are the residual stream), the final norm, the unembedding and any final-logit
soft-cap. Nothing is guessed from attribute names: a family is either registered here (or by
the user through :func:`register_architecture`) or rejected with
:class:`UnsupportedArchitectureError`, never silently decoded without its final norm
(tuned-lens issue #56).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import ProbeAttackError


class UnsupportedArchitectureError(ProbeAttackError):
    """Raised for a model whose family has no registered :class:`Architecture`."""


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps the parts a logit lens needs.

    Paths are dotted attribute paths from the top-level Hugging Face model (the module passed to
    nnsight), e.g. ``"model.layers"``.

    Attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values this adapter serves.
        layers: path of the ``nn.ModuleList`` of decoder blocks; block ``i``'s output is the
            residual stream after layer ``i`` (``[batch, seq, d_model]``).
        final_norm: path of the final norm applied before the unembedding.
        unembed: path of the output projection (``nn.Linear`` ``d_model -> vocab``).
        embed: path of the token-embedding module.
        absolute_positions: True for learned absolute position embeddings (GPT-2, OPT...):
            padding must then be compensated with explicit ``position_ids``. We pass
            mask-derived ``position_ids`` for every family anyway.
        text_config: attribute of ``config`` holding the language model's config for
            multimodal wrappers (``"text_config"`` for LLaVA), or None.
        mlp_out: path, relative to a decoder layer, of the MLP's output projection (the
            module defenses edit: ``down_proj`` / ``c_proj`` / ``fc_out`` / ``dense_4h_to_h``).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    unembed: str
    embed: str
    absolute_positions: bool = False
    text_config: str | None = None
    mlp_out: str = "mlp.down_proj"


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *, overwrite: bool = False) -> Architecture:
    """Register ``arch`` for each of its ``model_types``.

    Raises:
        ValueError: if a model type is already registered and ``overwrite`` is False.
    """
    for mt in arch.model_types:
        if mt in _REGISTRY and not overwrite and _REGISTRY[mt] != arch:
            raise ValueError(f"model_type {mt!r} is already registered as {_REGISTRY[mt].name}")
    for mt in arch.model_types:
        _REGISTRY[mt] = arch
    return arch


def supported_model_types() -> list[str]:
    """Sorted ``config.model_type`` values that have an adapter."""
    return sorted(_REGISTRY)


_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3")
register_architecture(Architecture("Llama-style decoder (Llama/Mistral/Qwen2/SmolLM2)", _LLAMA_LIKE,
                                   "model.layers", "model.norm", "lm_head", "model.embed_tokens"))
register_architecture(Architecture("Gemma family", ("gemma", "gemma2", "gemma3_text"),
                                   "model.layers", "model.norm", "lm_head", "model.embed_tokens"))
register_architecture(Architecture("Gemma-3 multimodal", ("gemma3",), "model.language_model.layers",
                                   "model.language_model.norm", "lm_head",
                                   "model.language_model.embed_tokens", text_config="text_config"))
register_architecture(Architecture("GPT-2", ("gpt2",), "transformer.h", "transformer.ln_f", "lm_head",
                                   "transformer.wte", absolute_positions=True, mlp_out="mlp.c_proj"))
register_architecture(Architecture("GPT-J", ("gptj",), "transformer.h", "transformer.ln_f", "lm_head",
                                   "transformer.wte", mlp_out="mlp.fc_out"))
register_architecture(Architecture("GPT-NeoX / Pythia", ("gpt_neox",), "gpt_neox.layers",
                                   "gpt_neox.final_layer_norm", "lm_head", "gpt_neox.embed_in",
                                   mlp_out="mlp.dense_4h_to_h"))
register_architecture(Architecture("LLaVA (language model inside)", ("llava", "llava_next"),
                                   "model.language_model.layers", "model.language_model.norm", "lm_head",
                                   "model.language_model.embed_tokens", text_config="text_config"))

_HOW_TO_REGISTER = (
    "register it with probe.register_architecture(probe.Architecture(name=..., model_types=(<model_type>,), "
    "layers='<path to decoder ModuleList>', final_norm='<path to final norm>', unembed='<path to lm head>', "
    "embed='<path to token embedding>', mlp_out='<MLP output projection, relative to a layer>'))"
)


def get_attr_path(root: object, path: str) -> object:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``.

    Raises:
        AttributeError: naming the first missing component.
    """
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {path!r})")
        obj = getattr(obj, part)
    return obj


def resolve_architecture(hf_model: nn.Module) -> Architecture:
    """Find the adapter for a Hugging Face model and check that every path exists.

    Raises:
        UnsupportedArchitectureError: for a model without ``config.model_type``, an unregistered
            model type, or a registered one whose module paths are missing (e.g. a custom wrapper
            that hides them). The message lists the supported types and how to register.
    """
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"cannot identify the architecture of {type(hf_model).__name__}: it has no config.model_type. "
            f"Supported model types: {', '.join(supported_model_types())}; to add one, {_HOW_TO_REGISTER}")
    arch = _REGISTRY.get(model_type)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({type(hf_model).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}; to add one, {_HOW_TO_REGISTER}")
    for field in ("layers", "final_norm", "unembed", "embed"):
        path = getattr(arch, field)
        try:
            get_attr_path(hf_model, path)
        except AttributeError as exc:
            raise UnsupportedArchitectureError(
                f"{type(hf_model).__name__} (model_type {model_type!r}) has no {field} module at {path!r}: {exc}. "
                f"Supported model types: {', '.join(supported_model_types())}; for a custom layout, "
                f"{_HOW_TO_REGISTER} with overwrite=True") from None
    if not isinstance(get_attr_path(hf_model, arch.layers), (nn.ModuleList, list, tuple)):
        raise UnsupportedArchitectureError(f"{arch.layers!r} of {type(hf_model).__name__} is not a ModuleList")
    return arch


def text_config(hf_model: nn.Module, arch: Architecture):
    """The language model's config (the top-level config for text-only models)."""
    cfg = hf_model.config
    if arch.text_config is not None:
        cfg = getattr(cfg, arch.text_config, cfg)
    return cfg


def final_logit_softcap(hf_model: nn.Module, arch: Architecture) -> float | None:
    """Gemma-2/3 style ``final_logit_softcapping`` (logits -> cap * tanh(logits / cap)), or None."""
    for cfg in (text_config(hf_model, arch), hf_model.config):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def ties_word_embeddings(hf_model: nn.Module, arch: Architecture) -> bool:
    """Whether the config asks for tied input/output embeddings, checking the top-level config and
    ``text_config`` (transformers PR #43429: the flag may live only in ``text_config``)."""
    flags: Iterable = (getattr(c, "tie_word_embeddings", None) for c in (hf_model.config, text_config(hf_model, arch)))
    return any(bool(f) for f in flags)


def check_unembedding(hf_model: nn.Module, arch: Architecture) -> None:
    """Verify the unembedding the lens will use is the model's real output layer.

    For a model whose config asks for tied embeddings, the output and input embedding weights
    must share storage (pitfall 4: an untied, randomly initialised lm_head gives gibberish).

    Raises:
        UnsupportedArchitectureError: if tying was requested but the weights are separate tensors.
    """
    unembed = get_attr_path(hf_model, arch.unembed)
    embed = get_attr_path(hf_model, arch.embed)
    w_out = getattr(unembed, "weight", None)
    w_in = getattr(embed, "weight", None)
    if not isinstance(w_out, torch.Tensor):
        raise UnsupportedArchitectureError(f"{arch.unembed!r} has no weight tensor")
    if ties_word_embeddings(hf_model, arch) and isinstance(w_in, torch.Tensor) and w_in.shape == w_out.shape:
        if w_out.data_ptr() != w_in.data_ptr():
            raise UnsupportedArchitectureError(
                f"{type(hf_model).__name__}: the config ties word embeddings but {arch.unembed}.weight and "
                f"{arch.embed}.weight are different tensors; the output layer may be randomly initialised. "
                "Call model.tie_weights() or fix the checkpoint.")


def mlp_out_path(model, layer: int) -> str:
    """Module path (from ``model.hf``) of decoder layer ``layer``'s MLP output projection
    (``down_proj`` / ``c_proj`` / ``fc_out``), e.g. ``model.layers.7.mlp.down_proj``."""
    return f"{model.arch.layers}.{int(layer)}.{model.arch.mlp_out}"


def mlp_out_weight_name(model, layer: int) -> str:
    """Fully-qualified parameter name of layer ``layer``'s MLP output weight
    (``model.layers.7.mlp.down_proj.weight``)."""
    return mlp_out_path(model, layer) + ".weight"


def mlp_out_module(model, layer: int) -> nn.Module:
    """Layer ``layer``'s MLP output projection module (raises AttributeError naming the path)."""
    return get_attr_path(model.hf, mlp_out_path(model, layer))


def mlp_out_envoy(model, layer: int):
    """The nnsight envoy of layer ``layer``'s MLP output projection (for ``.input``/``.output``)."""
    return get_attr_path(model.layer_envoy(layer), model.arch.mlp_out)


def mlp_linear_paths(model, layer: int) -> list[str]:
    """Module paths (from ``model.hf``) of every linear map of decoder layer ``layer``'s MLP: the
    ``nn.Linear`` and GPT-2 ``Conv1D`` modules under the parent of :attr:`Architecture.mlp_out`
    (Llama/Gemma: ``gate_proj``, ``up_proj``, ``down_proj``; GPT-2: ``c_fc``, ``c_proj``; GPT-J:
    ``fc_in``, ``fc_out``; GPT-NeoX: ``dense_h_to_4h``, ``dense_4h_to_h``), sorted by name. When
    ``mlp_out`` names a module directly on the layer (no parent), only that module.

    Raises:
        AttributeError: the MLP path does not exist (naming it).
        ValueError: the MLP holds no linear module.
    """
    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple = (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (nn.Linear,)
    layer_path = f"{model.arch.layers}.{int(layer)}"
    if "." not in model.arch.mlp_out:
        return [mlp_out_path(model, layer)]
    mlp_path = f"{layer_path}.{model.arch.mlp_out.rsplit('.', 1)[0]}"
    mlp = get_attr_path(model.hf, mlp_path)
    paths = sorted(f"{mlp_path}.{name}" for name, m in mlp.named_modules() if name and isinstance(m, kinds))
    if not paths:
        raise ValueError(f"{mlp_path} ({type(mlp).__name__}) has no nn.Linear / Conv1D module")
    return paths
