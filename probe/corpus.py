"""Offline training text: Python's own documentation, filtered against facts, cut into token windows.

Nothing is downloaded: the text is prose shipped with the Python interpreter -- the language
reference topics of ``pydoc_data.topics`` and the docstrings of the standard library, read from
the modules' *source files* with :mod:`ast` (nothing is imported or executed, so runtime
patching, e.g. by pytest, cannot change the text). Deterministic for a given Python installation.

Two users:

- the tuned lens (:func:`probe.lens_training.train_tuned_lens`): :func:`default_texts` -- the
  pydoc topics and every stdlib docstring of at least 300 characters, with each paragraph that
  mentions a fact's answer, alternative answer or subject dropped (:func:`phrase_filter`), then
  :func:`split_windows` (whole documents held out) and :func:`pack_windows`;
- ROME's key covariance (:mod:`defenses.rome_stats`): :func:`module_docstrings` of a fixed list
  of modules.

This module never reads the development folder: facts to keep out of the text beyond the built-in
ones (e.g. CounterFact) are passed in by the caller (``exclude``).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
import re
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from .facts import Fact

# ----------------------------------------------------------------------------------------
# docstrings, read with ast

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def tree_docstrings(tree: ast.Module, *, min_chars: int = 1, public_only: bool = False) -> list[str]:
    """Docstrings of a parsed module: the module's, then its classes', functions' and methods' in
    :func:`ast.walk` order, those of at least ``min_chars`` characters; with ``public_only`` the
    classes and functions whose names start with ``_`` are skipped."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_NODES):
            continue
        if public_only and not isinstance(node, ast.Module) and node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if doc and len(doc) >= min_chars:
            out.append(doc)
    return out


def stdlib_docstrings(min_chars: int = 300) -> list[str]:
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
        out += tree_docstrings(tree, min_chars=min_chars)
    return out


def module_docstrings(modules: Iterable[str], *, min_chars: int = 81, public_only: bool = True) -> list[str]:
    """Unique docstrings of the named modules' source files (module first, then its public
    classes, functions and methods, :func:`tree_docstrings`), in module order, each kept once.
    A module without a ``.py`` source, or one that cannot be read, is skipped."""
    docs, seen = [], set()
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
            if not origin or not origin.endswith(".py"):
                continue
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except Exception:  # pragma: no cover - platform-specific or unreadable module
            continue
        for doc in tree_docstrings(tree, min_chars=min_chars, public_only=public_only):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def python_docs() -> list[str]:
    """The language-reference topics of ``pydoc_data.topics`` (sorted by topic) followed by
    :func:`stdlib_docstrings` -- unfiltered."""
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
        docs += [topics[k] for k in sorted(topics)]
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        pass
    return docs + stdlib_docstrings()


# ----------------------------------------------------------------------------------------
# keeping facts out of the text


def fact_phrases(facts: Iterable[Fact]) -> set[str]:
    """The answers, alternative answers, subjects and neighbourhood answers of ``facts`` (stripped)."""
    out: set[str] = set()
    for f in facts:
        for s in (f.answer, f.alt_answer, f.subject, *[n.get("answer") for n in f.neighborhood]):
            if isinstance(s, str) and s.strip():
                out.add(s.strip())
    return out


@lru_cache(maxsize=1)
def _builtin_phrases() -> frozenset[str]:
    from .facts import load_facts

    return frozenset(fact_phrases(load_facts(None)))


def excluded_phrases(exclude: Iterable[Fact | str] = ()) -> frozenset[str]:
    """The phrases :func:`default_texts` filters out: those of the built-in facts, of every
    :class:`~probe.facts.Fact` in ``exclude`` (:func:`fact_phrases`) and every string in it."""
    items = list(exclude)
    extra = fact_phrases(x for x in items if isinstance(x, Fact))
    extra |= {x.strip() for x in items if isinstance(x, str) and x.strip()}
    return _builtin_phrases() | extra


_WORD = re.compile(r"\w+")


def phrase_filter(phrases: Iterable[str]):
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


def _paragraphs(doc: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def drop_paragraphs(docs: Sequence[str], phrases: Iterable[str]) -> tuple[list[str], int, int]:
    """Drop every paragraph (blank-line separated) of ``docs`` that mentions one of ``phrases``
    (:func:`phrase_filter`); documents left without a paragraph are dropped.

    Returns:
        ``(kept documents, dropped paragraphs, total paragraphs)``.
    """
    hit = phrase_filter(phrases)
    kept, dropped = [], 0
    for doc in docs:
        paras = _paragraphs(doc)
        good = [p for p in paras if not hit(p)]
        dropped += len(paras) - len(good)
        if good:
            kept.append("\n\n".join(good))
    return kept, dropped, sum(len(_paragraphs(d)) for d in docs)


@lru_cache(maxsize=2)
def _default_texts_cached(phrases: frozenset[str]) -> tuple[tuple[str, ...], int, int]:
    kept, dropped, n_paras = drop_paragraphs(python_docs(), phrases)
    return tuple(kept), dropped, n_paras


def default_texts(exclude: Iterable[Fact | str] = ()) -> list[str]:
    """The default training text of the tuned lens: Python's own documentation.

    The language-reference topics of ``pydoc_data.topics`` (the text of ``help('if')`` etc.) and
    the standard library's docstrings of at least 300 characters (:func:`python_docs`). Every
    paragraph that contains (as whole words, case-sensitively) an answer, alternative answer or
    subject of a built-in fact or of a fact in ``exclude``, or a string in ``exclude``, is dropped
    (:func:`excluded_phrases`). Offline, deterministic for a given Python installation.

    Callers that evaluate other facts pass them: the tests and benchmarks pass CounterFact
    (``load_facts(".../counterfact_filtered.json")``), ``probe-attack tuned-lens --exclude-facts
    FILE`` a facts file. (Before ``exclude`` existed the library read CounterFact itself from the
    development folder when present; a lens trained then names its filter in
    ``report.text_source``, e.g. "built-in facts + CounterFact".)

    Returns:
        A list of documents (strings), in a fixed order.
    """
    return list(_default_texts_cached(excluded_phrases(exclude))[0])


def default_text_source(exclude: Iterable[Fact | str] = ()) -> str:
    """One line describing :func:`default_texts` (``exclude`` as there), for training reports."""
    items = list(exclude)
    kept, dropped, total = _default_texts_cached(excluded_phrases(items))
    n_facts = sum(isinstance(x, Fact) for x in items)
    n_terms = sum(isinstance(x, str) for x in items)
    given = (f" + {n_facts} given facts" if n_facts else "") + (f" + {n_terms} given terms" if n_terms else "")
    return (f"python{sys.version_info.major}.{sys.version_info.minor} pydoc_data.topics + stdlib docstrings: "
            f"{len(kept)} documents; {dropped} of {total} paragraphs dropped for mentioning a fact's answer or "
            f"subject (built-in facts{given})")


# ----------------------------------------------------------------------------------------
# token windows


def special_prefix(tokenizer) -> list[int]:
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
    prefix = special_prefix(tokenizer)
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


def split_windows(tokenizer, texts: Iterable[str], seq_len: int, *, heldout_tokens: int, train_tokens: int,
                  seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Shuffle the documents (``random.Random(seed)``), fill held-out windows from the first ones
    and training windows from the rest (:func:`pack_windows`), so no document is in both.

    Returns:
        ``(heldout_windows, train_windows)``.
    """
    docs = list(texts)
    random.Random(seed).shuffle(docs)
    w_held, n_held = pack_windows(tokenizer, docs, seq_len, heldout_tokens)
    w_train, _ = pack_windows(tokenizer, docs[n_held:], seq_len, train_tokens)
    return w_held, w_train


__all__ = ["tree_docstrings", "stdlib_docstrings", "module_docstrings", "python_docs", "fact_phrases",
           "excluded_phrases", "phrase_filter", "drop_paragraphs", "default_texts", "default_text_source",
           "special_prefix", "pack_windows", "split_windows"]
