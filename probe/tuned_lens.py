"""The tuned lens: one learned affine translator per decoder layer in front of the logit lens.

Belrose et al. (2023), "Eliciting Latent Predictions from Transformers with the Tuned Lens",
section 3: for decoder layer l,

    TunedLens_l(h) = LogitLens(h + A_l h + b_l)        A_l: [d_model, d_model], b_l: [d_model]

with ``A_l`` and ``b_l`` initialised to zero (so an untrained tuned lens *is* the logit lens) and
trained to minimise KL(p_final || p_l) -- the final layer's next-token distribution against the
lens's at layer l -- over every token position of training text. ``LogitLens`` is
:class:`probe.lens.LogitLens` (the model's final norm + unembedding, fp32). Our layer l is the
output of decoder block l; the last layer's output *is* what the model decodes, so its translator
stays the identity (KL = 0 by construction for both lenses).

Training (:func:`train_tuned_lens`) reads the residual stream of every layer once with nnsight
(no_grad) over packed windows of text (32k tokens by default), accumulating the statistics of a
ridge-regularised least-squares fit of the last layer's residual on each layer's (closed form:
30 x 577 x 577 fp64) and keeping a random 4k of the tokens as fp32 tensors (``n_layers x tokens x
d_model``: 30 x 4k x 576 x 4 B = 0.3 GB for SmolLM2); warm-starts each translator with that fit
(or the identity, whichever has the lower KL on a few training tokens), then refines with Adam on
the exact KL until the time or step budget runs out. The least-squares warm start is our addition
for the 2-CPU budget (the paper trains from identity with SGD-Nesterov, 250 steps of 2^18 tokens):
on SmolLM2 it does most of the work; ~45 Adam steps lower the KL by another ~10 %.

Training text (:func:`default_texts`): prose shipped with the Python interpreter -- the language
reference topics of ``pydoc_data.topics`` and the docstrings of the standard-library modules
(read with :mod:`ast`, nothing is imported or downloaded) -- with every paragraph that mentions a
fact's answer, alternative answer or subject (built-in facts and, when present, the CounterFact
file in ``../shared/data``) dropped, so the lens never sees an evaluated fact.

Lenses are cached per model fingerprint in ``cache_dir() / "tuned-lens" / f"{fingerprint}.pt"``
(:func:`get_tuned_lens`). Edited clones (:func:`probe.model.clone_model`) keep the fingerprint of
the model they were copied from, so an attacker on an edited model uses the lens trained on the
*unedited* model, decoded through the edited model's own final norm and unembedding.
"""

from __future__ import annotations

import argparse
import ast
import copy
import html
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import nnsight
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ProbeAttackError
from .interrupt import check as check_interrupt
from .layers import resolve_layer
from .lens import LogitLens
from .residual import get_resid

FORMAT = "probe-attack/tuned-lens"
FORMAT_VERSION = 1
#: CounterFact file used to filter the default training text when present.
COUNTERFACT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_filtered.json"


class TunedLensMismatchError(ProbeAttackError, ValueError):
    """A saved tuned lens does not belong to the model it is loaded for (fingerprint or shape)."""


# ----------------------------------------------------------------------------------------
# the lens


class TunedLens(nn.Module):
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

    def log_probs(self, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Tuned-lens log-probabilities (nats, fp32), shapes as :meth:`logits`."""
        return torch.log_softmax(self.logits(resid, layer), -1)

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
        text_source: where the training text came from.
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


# ----------------------------------------------------------------------------------------
# training text


def _excluded_strings() -> set[str]:
    """Answers, alternative answers and subjects of the built-in facts and of the CounterFact file."""
    from .facts import load_counterfact, load_facts

    facts = list(load_facts(None))
    if COUNTERFACT_FILE.is_file():
        facts += load_counterfact(COUNTERFACT_FILE)
    out: set[str] = set()
    for f in facts:
        for s in (f.answer, f.alt_answer, f.subject, *[n.get("answer") for n in f.neighborhood]):
            if isinstance(s, str) and s.strip():
                out.add(s.strip())
    return out


_WORD = re.compile(r"\w+")


def _phrase_filter(phrases: Iterable[str]):
    """A predicate: does a text contain any of ``phrases`` as a whole-word sequence (case-sensitive)?"""
    grams = {tuple(_WORD.findall(p)) for p in phrases}
    grams.discard(())
    lengths = sorted({len(g) for g in grams})

    def hit(text: str) -> bool:
        words = _WORD.findall(text)
        for n in lengths:
            for i in range(len(words) - n + 1):
                if tuple(words[i:i + n]) in grams:
                    return True
        return False

    return hit


def _stdlib_docstrings(min_chars: int = 300) -> list[str]:
    """Docstrings (module, class, function) of the standard library's ``.py`` files, parsed with
    :mod:`ast` (nothing is imported), tests and vendored packages skipped, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "ensurepip", "__pycache__",
            "pydoc_data", "turtledemo", "config-3", "venv"}
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in skip or p.startswith("config-") for p in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc)
    return out


@lru_cache(maxsize=1)
def _default_texts_cached() -> tuple[tuple[str, ...], int, int]:
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
        docs += [topics[k] for k in sorted(topics)]
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        pass
    docs += _stdlib_docstrings()
    hit = _phrase_filter(_excluded_strings())
    kept, dropped = [], 0
    for doc in docs:
        paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
        good = [p for p in paras if not hit(p)]
        dropped += len(paras) - len(good)
        if good:
            kept.append("\n\n".join(good))
    n_paras = sum(len([p for p in re.split(r"\n\s*\n", d) if p.strip()]) for d in docs)
    return tuple(kept), dropped, n_paras


def default_texts() -> list[str]:
    """The default training text: Python's own documentation, shipped with the interpreter.

    The language-reference topics of ``pydoc_data.topics`` (the text of ``help('if')`` etc.) and
    the standard library's docstrings of at least 300 characters (read with :mod:`ast`, never
    imported). Every paragraph that contains (as whole words, case-sensitively) an answer,
    alternative answer or subject of any built-in fact, or of the CounterFact file
    (:data:`COUNTERFACT_FILE`) when it exists, is dropped. Offline, deterministic for a given
    Python installation.

    Returns:
        A list of documents (strings), in a fixed order.
    """
    return list(_default_texts_cached()[0])


def default_text_source() -> str:
    kept, dropped, total = _default_texts_cached()
    return (f"python{sys.version_info.major}.{sys.version_info.minor} pydoc_data.topics + stdlib docstrings: "
            f"{len(kept)} documents; {dropped} of {total} paragraphs dropped for mentioning a fact's answer or "
            f"subject (built-in facts{' + CounterFact' if COUNTERFACT_FILE.is_file() else ''})")


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of every prompt (e.g. Gemma's BOS; none for SmolLM2)."""
    from .tokens import tokenize

    plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    full = tokenize(tokenizer, "hello")
    n = len(full) - len(plain)
    return full[:n] if n > 0 and full[n:] == plain else []


def pack_windows(tokenizer, docs: Sequence[str], seq_len: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """Tokenise ``docs`` in order, join them with blank lines and cut the stream into windows of
    exactly ``seq_len`` ids (each starting with the tokenizer's special prefix, if any), until the
    windows hold ``max_tokens`` scored positions (``seq_len - 1`` per window: the first is not scored).

    Returns:
        ``(windows, n_docs)``: the windows and how many documents were read.
    """
    prefix = _special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len {seq_len} too short")
    sep = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    windows: list[list[int]] = []
    buf: list[int] = []
    need = max(1, math.ceil(max_tokens / (seq_len - 1)))
    n_docs = 0
    for doc in docs:
        if len(windows) >= need:
            break
        n_docs += 1
        buf += list(tokenizer(doc, add_special_tokens=False)["input_ids"]) + sep
        while len(buf) >= body and len(windows) < need:
            windows.append(prefix + buf[:body])
            buf = buf[body:]
    return windows, n_docs


# ----------------------------------------------------------------------------------------
# residual collection and KL


def iter_residuals(model, windows: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                   desc: str = "residuals"):
    """Every decoder layer's output at every position but the first of each window, batch by batch.

    One nnsight trace per batch of windows (no_grad, ``logits_to_keep=1``). The first real token of
    each window is dropped: it is an attention sink (residual norm ~50x the others in SmolLM2) and
    never the last token of a prompt worth decoding.

    Args:
        windows: token-id rows (any lengths; padded on the left).

    Yields:
        fp32 CPU tensors ``[n_layers, n_tokens_in_batch, d_model]``, tokens in window order.
    """
    from .tokens import encode_ids

    L = model.n_layers
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        check_interrupt()
        rows = windows[start:start + batch_size]
        batch = encode_ids(model, rows, check_length=False)
        B, T = len(rows), batch.seq_len
        keep = batch.attention_mask.bool().clone()
        keep[torch.arange(B), T - batch.lengths] = False
        keep = keep.cpu()
        with torch.no_grad():
            with model.nn.trace(**batch.model_inputs(), logits_to_keep=1):
                saved = nnsight.save([get_resid(model.layer_envoy(i).output, B).save() for i in range(L)])
        yield torch.stack([h.detach().float().cpu()[keep] for h in saved], 0)


def collect_residuals(model, windows: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                      desc: str = "residuals") -> torch.Tensor:
    """All of :func:`iter_residuals` at once: fp32 CPU ``[n_layers, n_tokens, d_model]``
    (``n_tokens = sum(len(w) - 1)``)."""
    parts = list(iter_residuals(model, windows, batch_size=batch_size, progress=progress, desc=desc))
    if not parts:
        return torch.empty(model.n_layers, 0, model.d_model)
    return torch.cat(parts, 1)


def _frozen(unembed: LogitLens) -> LogitLens:
    """A copy of the final norm + unembedding that autograd never differentiates (the model's own
    tensors have ``requires_grad=True``: without this every backward would also compute, and
    accumulate into the model, a ``[vocab, d_model]`` gradient)."""
    norm = copy.deepcopy(unembed.norm).requires_grad_(False)
    bias = unembed.bias.detach() if unembed.bias is not None else None
    return LogitLens(norm, unembed.weight.detach(), bias, unembed.softcap)


class _Target:
    """The final layer's next-token distribution p for a set of token positions, prepared so that
    KL(p || q_lens) costs one unembedding matmul and one logsumexp per layer.

    KL(p || softmax(x)) = logsumexp(x) - sum_v p_v x_v + sum_v p_v log p_v; without a logit
    soft-cap, x = W_U z + c is affine in the normed residual z, so sum_v p_v x_v = (p W_U) . z + p . c
    with ``p W_U`` computed once and shared by every layer.
    """

    def __init__(self, unembed: LogitLens, last_resid: torch.Tensor):
        self.unembed = unembed
        logp = torch.log_softmax(unembed(last_resid), -1)
        p = logp.exp()
        self.neg_entropy = (p * logp).sum(-1)  # [n]
        self.affine = not unembed.softcap
        if self.affine:
            self.pw = p @ unembed.weight  # [n, d]
            self.pb = p @ unembed.bias if unembed.bias is not None else None
            self.p = None
        else:
            self.p = p

    def kl(self, h: torch.Tensor) -> torch.Tensor:
        """``[n]`` KL(p || lens(h)) in nats for translated residuals ``h`` ``[n, d_model]``."""
        u = self.unembed
        if self.affine:
            z = u.norm(h.to(dtype=torch.float32)).float()
            logits = torch.nn.functional.linear(z, u.weight, u.bias)
            cross = (z * self.pw).sum(-1) + (self.pb if self.pb is not None else 0.0)
        else:
            logits = u(h)
            cross = (self.p * logits).sum(-1)
        return torch.logsumexp(logits, -1) - cross + self.neg_entropy


@torch.no_grad()
def layer_kl(lens: TunedLens, resid: torch.Tensor, *, chunk: int = 256, layers: Sequence[int] | None = None,
             identity: bool = False, progress: bool = False, desc: str = "KL") -> list[float]:
    """Mean KL(p_final || p_lens) per layer (nats) over the tokens of ``resid``.

    Args:
        lens: a bound :class:`TunedLens`.
        resid: ``[n_layers, n_tokens, d_model]`` (e.g. from :func:`collect_residuals`); the target
            p_final is the logit lens of the last layer, i.e. the model's own next-token
            distribution.
        identity: evaluate the plain logit lens instead (translators ignored).

    Returns:
        ``len(layers)`` floats (all layers by default).
    """
    L, N, _ = resid.shape
    layers = list(range(L)) if layers is None else [int(x) % L for x in layers]
    sums = torch.zeros(len(layers), dtype=torch.float64)
    unembed = _frozen(lens.unembed)
    dev = unembed.weight.device
    for s in tqdm(range(0, N, chunk), desc=desc, disable=not progress, leave=False):
        check_interrupt()
        tgt = _Target(unembed, resid[L - 1, s:s + chunk].to(dev))
        for j, layer in enumerate(layers):
            h = resid[layer, s:s + chunk].to(dev)
            sums[j] += tgt.kl(h if identity else lens.translate(h, layer)).clamp_min(0).double().sum().cpu()
    return [float(x) / max(1, N) for x in sums]


class _LstsqStats:
    """Sufficient statistics of the closed-form warm start, accumulated over token batches, so the
    warm start can use many more tokens than fit in memory.

    For every layer l: weighted ridge least squares of the last layer's residual y on ``[h_l, 1]``
    with weights 1 / ||y||^2 (every token counts by its direction, which is all the final RMS/Layer
    norm keeps), shrunk towards the identity: ``A_l = W_l - I`` and ``b_l``.
    """

    def __init__(self, n_layers: int, d_model: int):
        self.n = 0
        self.xtx = torch.zeros(n_layers - 1, d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_layers - 1, d_model + 1, d_model, dtype=torch.float64)

    def add(self, resid: torch.Tensor) -> None:
        """Accumulate ``[n_layers, n_tokens, d_model]`` (fp32 products per batch, fp64 sums)."""
        L, N, _ = resid.shape
        y = resid[L - 1]
        w = 1.0 / y.double().pow(2).sum(-1).clamp_min(1e-12)
        sw = w.sqrt().float()[:, None]
        xa = torch.cat([resid[:L - 1], torch.ones(L - 1, N, 1)], -1) * sw  # [L-1, N, d+1]
        self.xtx += torch.bmm(xa.transpose(1, 2), xa).double()
        self.xty += torch.matmul(xa.transpose(1, 2), y * sw).double()
        self.n += N

    def solve(self, layer: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` for ``layer`` (fp32), with ridge ``ridge * mean(diag(X^T X))`` towards A = 0."""
        xtx, xty = self.xtx[layer], self.xty[layer]
        d = xty.shape[1]
        lam = ridge * float(torch.diagonal(xtx).mean())
        eye = torch.zeros(d + 1, d, dtype=torch.float64)
        eye[:d] = torch.eye(d, dtype=torch.float64)
        beta = torch.linalg.solve(xtx + lam * torch.eye(d + 1, dtype=torch.float64), xty + lam * eye)
        return (beta[:d].T - torch.eye(d, dtype=torch.float64)).float(), beta[d].float()


def train_tuned_lens(model, *, texts: Sequence[str] | None = None, minutes: float | None = 8.0,
                     steps: int | None = None, seq_len: int = 128, batch: int = 64,
                     train_tokens: int = 32768, heldout_tokens: int = 512, adam_tokens: int = 4096,
                     lr: float = 3e-4, init: str = "auto", seed: int = 0, progress: bool = False,
                     collect_batch: int = 8, collect_share: float = 0.55) -> tuple[TunedLens, TunedLensReport]:
    """Train a tuned lens for ``model`` (Belrose et al. 2023, section 3).

    Phases: pack text into windows (whole documents held out); read every layer's residuals once
    with nnsight (no_grad) and evaluate the logit lens's KL on the held-out windows; stream the
    training windows through the model, accumulating least-squares statistics over all their
    tokens and keeping a random ``adam_tokens`` of them in memory; warm-start every translator but
    the last (identity, or ridge least squares -- the better on 128 kept tokens with
    ``init="auto"``); minimise the mean over layers of KL(p_final || p_l) with Adam (linearly
    decaying learning rate) on random batches of ``batch`` kept positions, all layers per step;
    evaluate again.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        texts: training documents (strings); default :func:`default_texts`. They are shuffled
            (seeded); the first documents fill the held-out windows, the rest the training ones,
            so no document is in both.
        minutes: wall-clock budget of the whole call, including data collection and both
            evaluations; optimisation stops early enough to finish on time (None = no limit).
        steps: maximum number of Adam steps (None = until ``minutes``; one of the two is needed).
        seq_len: tokens per window (the first position of each window is not scored).
        batch: token positions per Adam step.
        train_tokens, heldout_tokens: scored positions to read for training (at most; with
            ``minutes`` reading stops after ``collect_share`` of the time left) / evaluation.
        adam_tokens: training positions kept in memory for Adam (memory:
            ``n_layers * (adam_tokens + heldout_tokens) * d_model * 4`` bytes, 0.6 GB for SmolLM2).
        collect_share: share of the time left after the first evaluation that reading training
            text may take (the rest goes to Adam and the final evaluation).
        lr: peak Adam learning rate (decays linearly to 10 % of it).
        init: ``"auto"``, ``"identity"`` or ``"lstsq"``.
        seed: seeds the document split and the token sampling.
        progress: tqdm bars and phase messages on stderr.

    Returns:
        ``(lens, report)``: the trained lens, bound to ``model``, and a :class:`TunedLensReport`
        (per-layer held-out KL of the logit lens vs the tuned lens, nats).

    Raises:
        ValueError: no budget (``minutes`` and ``steps`` both None), an unknown ``init``, or too
            little text for one training and one held-out window.
    """
    if minutes is None and steps is None:
        raise ValueError("give minutes or steps")
    if init not in ("auto", "identity", "lstsq"):
        raise ValueError(f"unknown init {init!r}; use auto, identity or lstsq")
    t0 = time.perf_counter()
    deadline = t0 + minutes * 60 if minutes is not None else math.inf
    secs: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        secs[name] = round(now - since, 2)
        if progress:
            print(f"tuned lens: {name} {now - since:.1f} s", file=sys.stderr)
        return now

    # -- text
    source = "user texts"
    if texts is None:
        texts = default_texts()
        source = default_text_source()
    docs = list(texts)
    rng = random.Random(seed)
    rng.shuffle(docs)
    tok = model.tokenizer
    ctx = model.context_length
    seq_len = min(seq_len, ctx) if ctx else seq_len
    w_held, n_held = pack_windows(tok, docs, seq_len, heldout_tokens)  # whole documents held out
    w_train, _ = pack_windows(tok, docs[n_held:], seq_len, train_tokens)
    if not w_train or not w_held:
        raise ValueError(f"too little text for one training and one held-out window of {seq_len} tokens")
    t = phase("texts", t0)

    # -- held-out residuals and the logit lens's KL
    L = model.n_layers
    lens = TunedLens.from_model(model)
    H_eval = collect_residuals(model, w_held, batch_size=collect_batch, progress=progress, desc="held-out residuals")
    t_eval = time.perf_counter()
    kl_logit = layer_kl(lens, H_eval, identity=True, progress=progress, desc="KL logit lens")
    eval_s = time.perf_counter() - t_eval
    t = phase("eval_before", t)
    reserve = 1.15 * eval_s + 2.0  # the final evaluation and saving

    # -- training residuals: least-squares statistics over all of them, a random subset kept for Adam
    stats = _LstsqStats(L, model.d_model) if init != "identity" and L > 1 else None
    n_windows = len(w_train)
    keep_frac = min(1.0, adam_tokens / max(1, n_windows * (seq_len - 1)))
    collect_end = t + collect_share * max(0.0, deadline - reserve - t)
    gen = torch.Generator().manual_seed(seed)
    kept, n_train = [], 0
    for Hb in iter_residuals(model, w_train, batch_size=collect_batch, progress=progress, desc="train residuals"):
        if stats is not None:
            stats.add(Hb)
        n_train += Hb.shape[1]
        sel = torch.rand(Hb.shape[1], generator=gen) < keep_frac
        kept.append(Hb[:, sel].clone())
        if time.perf_counter() > collect_end and sum(k.shape[1] for k in kept) >= batch:
            break
    H = torch.cat(kept, 1)
    del kept
    t = phase("collect", t)

    # -- warm start
    chosen = ["identity"] * L
    if stats is not None:
        probe_idx = torch.randperm(H.shape[1], generator=torch.Generator().manual_seed(seed))[:128]
        H_probe = H[:, probe_idx]
        base = layer_kl(lens, H_probe, identity=True)
        for layer in range(L - 1):
            check_interrupt()
            A, b = stats.solve(layer)
            with torch.no_grad():
                lens.weight[layer].copy_(A)
                lens.bias[layer].copy_(b)
        ls = layer_kl(lens, H_probe)
        with torch.no_grad():
            for layer in range(L - 1):
                if init == "lstsq" or ls[layer] < base[layer]:
                    chosen[layer] = "lstsq"
                else:
                    lens.weight[layer].zero_()
                    lens.bias[layer].zero_()
        del stats
    t = phase("init", t)

    # -- Adam on the KL
    train_layers = list(range(L - 1))
    unembed = _frozen(lens.unembed)
    opt = torch.optim.Adam([lens.weight, lens.bias], lr=lr)
    dev = lens.weight.device
    N = H.shape[1]
    n_steps, step_s = 0, 0.0
    bar = tqdm(total=steps, desc="tuned lens", disable=not progress, leave=False)
    train_end = deadline - reserve
    t_train = time.perf_counter()
    while train_layers and (steps is None or n_steps < steps):
        now = time.perf_counter()
        if now + step_s > train_end:
            break
        check_interrupt()
        if steps is not None:
            frac = n_steps / steps
        else:
            frac = min(1.0, (now - t_train) / max(1e-6, train_end - t_train))
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 - 0.9 * frac)
        s0 = time.perf_counter()
        idx = torch.randint(0, N, (batch,), generator=gen)
        with torch.no_grad():
            tgt = _Target(unembed, H[L - 1, idx].to(dev))
            h = H[:L - 1, idx].to(dev)  # [L-1, batch, d]
        # translate all layers in one batched matmul; the per-layer vocab-sized losses backprop
        # into a small leaf, whose gradient then flows through the translators once
        moved = torch.baddbmm(lens.bias[:L - 1, None], h, lens.weight[:L - 1].transpose(1, 2)) + h
        leaf = moved.detach().requires_grad_(True)
        total = 0.0
        for layer in train_layers:
            loss = tgt.kl(leaf[layer]).mean() / len(train_layers)
            loss.backward()
            total += float(loss.detach())
        moved.backward(leaf.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_steps += 1
        dt = time.perf_counter() - s0
        step_s = dt if n_steps == 1 else 0.8 * step_s + 0.2 * dt
        bar.update(1)
        bar.set_postfix(kl=f"{total:.3f}")
    bar.close()
    t = phase("train", t)

    kl_tuned = layer_kl(lens, H_eval, progress=progress, desc="KL tuned lens")
    t = phase("eval_after", t)
    secs["total"] = round(t - t0, 2)
    report = TunedLensReport(kl_logit=kl_logit, kl_tuned=kl_tuned, n_train_tokens=int(n_train), n_adam_tokens=int(N),
                             n_heldout_tokens=int(H_eval.shape[1]), init=chosen, steps=n_steps,
                             tokens_per_step=batch, seq_len=seq_len, lr=lr, seed=seed, seconds=secs,
                             text_source=source, model_name=model.name, fingerprint=model.fingerprint,
                             torch_threads=torch.get_num_threads())
    lens.report = report
    del H, H_eval
    return lens, report


# ----------------------------------------------------------------------------------------
# the cache


_LOADED: dict[str, TunedLens] = {}


def lens_path(model) -> Path:
    """``cache_dir() / "tuned-lens" / f"{model.fingerprint}.pt"``."""
    from .model import cache_dir

    return cache_dir() / "tuned-lens" / f"{model.fingerprint}.pt"


def get_tuned_lens(model, *, train_if_missing: bool = True, retrain: bool = False,
                   **train_kwargs) -> TunedLens:
    """The tuned lens of ``model``'s fingerprint: from memory, else from the on-disk cache
    (:func:`lens_path`), else trained with :func:`train_tuned_lens` (``train_kwargs``) and saved
    there atomically.

    The lens is bound to ``model`` (its final norm and unembedding). An edited clone shares its
    original's fingerprint and therefore gets the lens trained on the *unedited* model -- so call
    this on the unedited model first, or the lens would be trained on the edited one.

    Raises:
        FileNotFoundError: no cached lens and ``train_if_missing=False``.
        TunedLensMismatchError: the cached file does not fit the model.
    """
    path = lens_path(model)
    key = str(path.resolve())
    lens = None if retrain else _LOADED.get(key)
    if lens is None and not retrain and path.is_file():
        lens = TunedLens.load(path, model)
    if lens is None:
        if not train_if_missing:
            raise FileNotFoundError(f"no tuned lens for model {model.name!r} (fingerprint {model.fingerprint}) at "
                                    f"{path}; train one with `probe-attack tuned-lens`")
        lens, _ = train_tuned_lens(model, **train_kwargs)
        lens.save(path)
    _LOADED[key] = lens
    if lens._unembed is not LogitLens.from_model(model):
        lens.bind(model)
    return lens


# ----------------------------------------------------------------------------------------
# readout


def tuned_lens_readout(model, prompts: Sequence[str], answers: Sequence[str], lens: TunedLens, *,
                       scorers: dict | None = None, batch_size: int | None = None, progress: bool = False,
                       desc: str = "tuned lens") -> list:
    """Tuned-lens readout of the answer at every layer, for each (prompt, answer).

    The tuned-lens twin of :func:`probe.readout.lens_readout`: one nnsight trace per batch over
    ``prompt + answer[:-1]`` (teacher forcing), every layer's residual at the last prompt token,
    decoded by ``lens`` (fp32, one batched matmul) and reduced at once to ranks and probabilities.

    Args:
        lens: a :class:`TunedLens` (bound to ``model`` or to a model with its fingerprint).
        scorers: name -> :data:`probe.readout.Scorer` evaluated on a :class:`probe.readout.LensBatch`
            holding the *tuned-lens* logits ``[batch, n_layers, vocab]``.

    Returns:
        One :class:`~probe.results.LayerReadout` per prompt: ``rank`` per layer (1-based) and
        ``prob`` per layer (tuned-lens probability) of the first answer token at the last prompt
        token; the model's own first-token probability, answer log-probability (nats), exact
        match and the scorers' values.

    Raises:
        ValueError: lengths differ; InputError / PromptTooLongError: bad prompt or answer.
    """
    from .readout import lens_readout

    return lens_readout(model, prompts, answers, scorers=scorers, batch_size=batch_size, progress=progress,
                        desc=desc, lens=lens.logits)


# ----------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="probe-attack tuned-lens",
        description="Train (or load from the cache) the tuned lens of a model and print, per decoder layer, the "
                    "held-out KL(final || lens) in nats of the logit lens and of the tuned lens.")
    p.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m)")
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget (default 8)")
    p.add_argument("--steps", type=int, default=None, help="maximum Adam steps (default: until --minutes)")
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    p.add_argument("--retrain", action="store_true", help="train even if a cached lens exists (and replace it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def tuned_lens_main(argv: list[str] | None = None) -> int:
    """``probe-attack tuned-lens [--model M] [--minutes X] [--steps N] [--out FILE] [--retrain]``.

    Trains (or loads) the tuned lens, saves it to the cache, prints the per-layer KL table and,
    with ``--out``, writes the :class:`TunedLensReport` as JSON. Returns the exit status (0; 2 for
    bad input, with one line on stderr).
    """
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .model import load_model

    try:
        if args.minutes is not None and args.minutes <= 0:
            raise ValueError("--minutes must be > 0")
        model = load_model(args.model, device=args.device)
        path = lens_path(model)
        cached = path.is_file() and not args.retrain
        lens = get_tuned_lens(model, retrain=args.retrain, minutes=args.minutes, steps=args.steps, seed=args.seed,
                              progress=not args.quiet)
    except (ProbeAttackError, ValueError) as exc:
        print(f"probe-attack: error: {exc}", file=sys.stderr)
        return 2
    report = lens.report
    print(f"tuned lens for {model.name} (fingerprint {model.fingerprint}): {path}"
          f"{' (cached)' if cached else ''}")
    if report is None:
        print("(no training report stored with this lens)")
    else:
        print(report.table())
        if args.out:
            from .atomic import write_text_atomic

            write_text_atomic(args.out, json.dumps({**report.to_json(), "path": str(path)}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(tuned_lens_main())
