"""Second-moment statistics of an MLP's keys for ROME: C = E[k k^T] at one layer, cached on disk.

Meng et al. (2022), "Locating and Editing Factual Associations in GPT", section 3.1 (eq. 2): the
rank-one update is whitened by C, the uncentred covariance of the keys k (the inputs of the MLP
output projection ``down_proj`` / ``c_proj``) over generic text. The reference code estimates C
from 100k Wikipedia samples; nothing may be downloaded here, so the text is the **docstrings of a
fixed list of Python standard-library modules** (parsed from their source files with
:mod:`probe.corpus`, which also supplies the tuned lens's text; English technical prose shipped with every
Python, deterministic for a Python version, no generation cost), shuffled by document with a
fixed seed and cut into ``seq_len``-token windows. The token count (``n_tokens``, default 20480)
is much smaller than ROME's; :class:`defenses.rome.ROME` adds a small ridge to C before solving.

The matrix is computed once per (model fingerprint, edited parameter, token count, corpus digest)
and stored with an atomic write under ``probe.model.cache_dir() / "rome-stats"``; later calls,
in this or any other process, load it. All reads go through nnsight (the module's ``.input``),
and the trace stops right after the edited layer.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import torch

from probe.arch import mlp_out_envoy
from probe.atomic import save_torch_atomic
from probe.corpus import module_docstrings
from probe.model import cache_dir
from probe.tokens import encode_ids, tokenize

#: Standard-library modules whose docstrings form the statistics corpus (their source files are
#: parsed, never imported; a module without a ``.py`` source is skipped).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext", "glob",
    "gzip", "hashlib", "heapq", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "typing", "unittest", "uuid", "warnings", "weakref", "zipfile",
)

STATS_DIR = "rome-stats"
_CORPUS: str | None = None


def stats_corpus() -> str:
    """The statistics text: unique docstrings (> 80 characters) of :data:`STDLIB_MODULES` -- the
    module's and those of its public classes, functions and methods -- read from the modules'
    *source files* with :mod:`ast` (:func:`probe.corpus.module_docstrings`: nothing is imported or
    executed, so runtime patching, e.g. by pytest, cannot change the text), shuffled by document
    (``random.Random(0)``) and separated by blank lines. Deterministic for a given Python installation."""
    global _CORPUS
    if _CORPUS is None:
        docs = module_docstrings(STDLIB_MODULES, min_chars=81, public_only=True)
        random.Random(0).shuffle(docs)
        _CORPUS = "\n\n".join(docs)
    return _CORPUS


def corpus_digest() -> str:
    """First 12 hex digits of the SHA-256 of :func:`stats_corpus` (part of the cache key)."""
    return hashlib.sha256(stats_corpus().encode()).hexdigest()[:12]


def stats_path(model, param_name: str, n_tokens: int) -> Path:
    """Cache file of the key covariance of ``param_name`` (a weight's fully-qualified name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", param_name)
    fp = model.fingerprint or "nofp"
    return cache_dir() / STATS_DIR / f"{fp}-{safe}-{n_tokens}tok-{corpus_digest()}.pt"


def _windows(model, n_tokens: int, seq_len: int) -> list[list[int]]:
    tok = model.tokenizer
    prefix = tokenize(tok, "")  # the tokenizer's own BOS (Gemma), none for SmolLM2 / GPT-2
    ids = list(tok(stats_corpus(), add_special_tokens=False)["input_ids"])
    body = seq_len - len(prefix)
    rows, used = [], 0
    for start in range(0, len(ids) - body + 1, body):
        if used >= n_tokens:
            break
        rows.append(prefix + ids[start:start + body])
        used += body
    if not rows:
        raise ValueError(f"the statistics corpus has fewer than {body} tokens")
    return rows


def compute_key_covariance(model, layer: int, *, n_tokens: int = 20480, seq_len: int = 128,
                           batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """Estimate C = E[k k^T] of the MLP output projection's input at decoder layer ``layer``.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        layer: decoder-layer index (non-negative).
        n_tokens: number of corpus tokens (keys) to average over (BOS positions excluded).
        seq_len: window length in tokens (capped at the model's context length).

    Returns:
        ``(C, n)``: C float32 ``[d_in, d_in]`` (``d_in`` = the projection's input width,
        ``intermediate_size``) on the model's device; ``n`` the number of keys averaged.
    """
    ctx = model.context_length
    seq_len = min(seq_len, ctx) if ctx else seq_len
    rows = _windows(model, n_tokens, seq_len)
    n_prefix = len(tokenize(model.tokenizer, ""))
    env = mlp_out_envoy(model, layer)
    acc, count = None, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = encode_ids(model, rows[start:start + batch_size])
            with model.nn.trace(**batch.model_inputs()) as tracer:
                keys = env.input.save()
                tracer.stop()
            k = keys[:, n_prefix:].reshape(-1, keys.shape[-1]).to(torch.float64)
            acc = k.T @ k if acc is None else acc + k.T @ k
            count += k.shape[0]
    return (acc / count).float(), count


def key_covariance(model, layer: int, param_name: str, *, n_tokens: int = 20480) -> torch.Tensor:
    """C = E[k k^T] at ``layer`` (see :func:`compute_key_covariance`), from the on-disk cache
    (:func:`stats_path`: keyed by model fingerprint, parameter, token count and corpus digest) or
    computed and then stored atomically (temporary file + ``os.replace``).

    Returns:
        float32 ``[d_in, d_in]`` on the model's device.
    """
    path = stats_path(model, param_name, n_tokens)
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["mom2"].to(model.device)
        except Exception:  # a corrupt cache file is recomputed and replaced
            pass
    mom2, count = compute_key_covariance(model, layer, n_tokens=n_tokens)
    save_torch_atomic({"mom2": mom2.cpu(), "n_tokens": count, "layer": layer, "param": param_name,
                       "fingerprint": model.fingerprint, "corpus": corpus_digest()}, path)
    return mom2


__all__ = ["STDLIB_MODULES", "stats_corpus", "corpus_digest", "stats_path", "compute_key_covariance",
           "key_covariance"]
