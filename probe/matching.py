"""Answer matching for sampled text (blackbox attacks and generation accuracy).

The reference code tests a case-sensitive substring match of the answer in each sample
(UnLOK-VQA ``evaluate_llava_mm_parap.py``). Substring tests are fragile: "US" occurs inside
"USB", and a normalisation that strips articles or punctuation can reduce a gold answer such as
"A" to the empty string, which is a substring of everything (UltraRAG issue #509). We therefore
normalise both sides the same way and match whole words:

1. Unicode NFKC, ``casefold``, internal whitespace collapsed, stripped;
2. optionally drop the articles "a", "an", "the" and punctuation -- *unless* that would leave
   nothing, in which case the un-stripped form is kept;
3. the answer matches if its normalised token sequence occurs in the prediction's on word
   boundaries.

An empty gold answer is rejected (never matched vacuously).
"""

from __future__ import annotations

import re
import unicodedata

_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_answer(text: str, *, drop_articles: bool = True) -> str:
    """Normalised form of ``text`` (see module docstring). Never empty for non-blank input.

    Raises:
        ValueError: ``text`` is empty or whitespace-only.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("answer is empty or whitespace-only")
    base = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    if not drop_articles:
        return base
    words = _PUNCT.sub(" ", base).split()
    stripped = [w for w in words if w not in _ARTICLES]
    if stripped:
        return " ".join(stripped)
    if words:
        return " ".join(words)
    return base


def answer_matches(prediction: str, gold: str, *, drop_articles: bool = True) -> bool:
    """Whether ``gold`` occurs in ``prediction`` as whole words after normalisation.

    Raises:
        ValueError: ``gold`` is empty or whitespace-only.
    """
    g = normalize_answer(gold, drop_articles=drop_articles)
    if not isinstance(prediction, str) or not prediction.strip():
        return False
    base = " ".join(unicodedata.normalize("NFKC", prediction).casefold().split())
    spaced = " ".join(_PUNCT.sub(" ", base).split()) if drop_articles else base
    for candidate in (spaced, base):
        if re.search(r"(?<!\w)" + re.escape(g) + r"(?!\w)", candidate):
            return True
    return False
