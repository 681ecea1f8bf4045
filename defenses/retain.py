"""Choosing retain prompts: what a deletion must leave alone, without leaking the deleted fact.

The KL retain term of an editor needs prompts whose next-token distribution should not move.
Specificity is hardest for prompts of the *same relation about other subjects* ("The capital of
France is" while deleting Tokyo as Japan's capital): their last-token MLP inputs look like the
deleted prompt's. So half (``sim_frac``) of the retain set is the leak-free pool prompts most
similar to the fact's prompt (word and word-bigram overlap) and the rest is drawn at random
(seeded per fact).

The pool is every other fact's prompt and neighbourhood prompt, minus every candidate that
*leaks* the deleted fact (:func:`leaks`; issue 12): a KL term on such a prompt pulls against the
erasure (on CounterFact, "Nintendo DS Lite, developed by" kept while deleting "Nintendo DS Lite,
created by -> Nintendo") and inflates the neighbourhood score. A candidate leaks when it

* is one of the deleted fact's own prompts: its prompt, a paraphrase, or an evaluated
  neighbourhood prompt (so the neighbourhood score stays an honest held-out measurement);
* asks the same relation about the same subject;
* has the deleted answer as its answer: the two answers match as whole words either way round
  after :func:`probe.matching.normalize_answer` ("Nintendo" vs "Nintendo EAD" leaks too: the
  retain KL acts on the next token, which both start with);
* shares the subject: equal subjects (case-insensitive, normalised as answers are), the deleted
  fact's subject occurs in the candidate's text, or the candidate's subject occurs in the deleted
  prompt (a neighbourhood prompt's subject is unknown, so the text test is what catches it);
* contains the deleted answer in its text (whole words, :func:`probe.matching.answer_matches`);
* is more similar than :data:`SIMILARITY_MAX` (word + word-bigram Jaccard) to any of the deleted
  fact's prompt, paraphrases or neighbourhood prompts.

:func:`leaks` is the one definition; :class:`RetainPool` precomputes the pool's features once and
only calls :func:`leaks` on the candidates a cheap prefilter cannot clear (token inverted
indexes: a candidate none of whose tests can fire is never flagged, so the result equals applying
:func:`leaks` to every candidate).
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from probe.facts import Fact
from probe.matching import answer_matches, normalize_answer
from probe.seeds import RETAIN, fact_rng

#: Largest word + word-bigram Jaccard similarity (:func:`similarity`) a retain prompt may have to
#: any of the deleted fact's prompt, paraphrases or neighbourhood prompts. Prompts of one template
#: about different subjects must stay available (they are what specificity needs): the most
#: similar such pairs are 0.78 on CounterFact ("Rayner Glacier is a part of the continent of" vs
#: "Hull Glacier is a part of the continent of") and 0.76 on the built-in facts ("Sydney is a city
#: in the country of" vs "Kyoto is ..."). Above 0.8 two prompts differ in at most about one word
#: in fifteen (one word swapped in a 16-word prompt gives 0.81): a near-copy of the deleted fact's
#: own wording, which the retain KL must not hold in place.
SIMILARITY_MAX = 0.8

_WORD = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    """Casefolded NFKC word tokens (``\\w+`` runs) of ``text``."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _features(text: str) -> frozenset:
    w = _tokens(text)
    return frozenset(w) | frozenset(zip(w, w[1:]))


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word + adjacent-word-bigram sets of ``a`` and ``b`` (casefolded
    NFKC ``\\w+`` tokens, so punctuation and case do not count); in [0, 1], 0 when both are empty."""
    fa, fb = _features(a), _features(b)
    union = len(fa | fb)
    return len(fa & fb) / union if union else 0.0


def _phrase_tokens(text: str) -> set:
    """The tokens :func:`probe.matching.answer_matches` needs all of (in the matched text) to find
    ``text``: those of its normalised form (articles and punctuation dropped)."""
    return set(_tokens(normalize_answer(text)))


def _norm(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    return normalize_answer(text)


@dataclass(frozen=True)
class _Target:
    """The deleted fact's pieces every leak test compares with (computed once per fact)."""

    fact: Fact
    banned: frozenset
    subject: str | None
    answer: str
    refs: tuple  # feature sets of the prompt, paraphrases, neighbourhood prompts

    @classmethod
    def of(cls, fact: Fact) -> "_Target":
        texts = [fact.prompt, *fact.paraphrases, *(n["prompt"] for n in fact.neighborhood)]
        return cls(fact, frozenset(texts), _norm(fact.subject), normalize_answer(fact.answer),
                   tuple(_features(t) for t in texts))


def _reasons(t: _Target, prompt: str, answer: str | None, subject: str | None, relation: str | None,
             feats: frozenset | None = None) -> Iterator[str]:
    """Every reason the candidate leaks ``t`` (lazily, in the order of :func:`leaks`)."""
    fact = t.fact
    if prompt in t.banned:
        yield "own prompt"
    subj = _norm(subject)
    if t.subject and subj == t.subject and relation is not None and relation == fact.relation:
        yield "same relation and subject"
    if t.subject and subj == t.subject:
        yield "same subject"
    if answer and answer.strip() and (_norm(answer) == t.answer or answer_matches(answer, fact.answer)
                                      or answer_matches(fact.answer, answer)):
        yield "same answer"
    if fact.subject and fact.subject.strip() and answer_matches(prompt, fact.subject):
        yield "subject in text"
    if subj and answer_matches(fact.prompt, subject):
        yield "candidate subject in deleted prompt"
    if answer_matches(prompt, fact.answer):
        yield "answer in text"
    f = _features(prompt) if feats is None else feats
    for r in t.refs:
        union = len(f | r)
        if union and len(f & r) / union > SIMILARITY_MAX:
            yield "similar"
            break


def _leaks(t: _Target, prompt: str, answer: str | None, subject: str | None, relation: str | None,
           feats: frozenset | None = None) -> str | None:
    return next(_reasons(t, prompt, answer, subject, relation, feats), None)


def leaks(fact: Fact, prompt: str, answer: str | None = None, subject: str | None = None,
          relation: str | None = None) -> str | None:
    """Why a retain candidate leaks the deleted ``fact`` (the reasons of the module docstring,
    first match: ``"own prompt"``, ``"same relation and subject"``, ``"same subject"``,
    ``"same answer"``, ``"subject in text"``, ``"candidate subject in deleted prompt"``,
    ``"answer in text"``, ``"similar"``), or None when it is safe to retain. (The cheap tests come
    first: the pool calls this on every candidate its prefilter flags.)

    Args:
        fact: the fact being deleted.
        prompt: the candidate retain prompt.
        answer: the candidate's answer (another fact's ``answer`` or a neighbourhood entry's
            ``answer``); None when unknown.
        subject: the candidate's subject; None when unknown (neighbourhood prompts).
        relation: the candidate's relation; None when unknown.

    Raises:
        ValueError: ``fact.answer`` is empty or whitespace-only.
    """
    return _leaks(_Target.of(fact), prompt, answer, subject, relation)


def leak_reasons(fact: Fact, prompt: str, answer: str | None = None, subject: str | None = None,
                 relation: str | None = None) -> list[str]:
    """All the reasons of :func:`leaks` that apply (in its order; empty when none), for
    measurements that count each reason separately. Same arguments and errors as :func:`leaks`."""
    return list(_reasons(_Target.of(fact), prompt, answer, subject, relation))


@dataclass(frozen=True)
class Candidate:
    """One way a pool prompt occurs: as another fact's prompt (with that fact's ``subject`` and
    ``relation``) or as a neighbourhood prompt (``subject`` and ``relation`` None)."""

    prompt: str
    answer: str | None
    subject: str | None
    relation: str | None
    source: str  # the id of the fact it comes from


class RetainPool:
    """The retain pool of a fact set with its features precomputed, for many :meth:`select` calls.

    Candidate prompts are the facts' prompts and neighbourhood prompts; a prompt text that occurs
    several times (several facts' neighbourhoods) is one candidate that leaks if any occurrence
    does.
    """

    def __init__(self, facts: Sequence[Fact]):
        by_prompt: dict[str, list[Candidate]] = defaultdict(list)
        for g in facts:
            by_prompt[g.prompt].append(Candidate(g.prompt, g.answer, g.subject, g.relation, g.id))
            for n in g.neighborhood:
                by_prompt[n["prompt"]].append(Candidate(n["prompt"], n.get("answer"), None, None, g.id))
        self.prompts: list[str] = sorted(by_prompt)
        self.occurrences: list[list[Candidate]] = [by_prompt[p] for p in self.prompts]
        n = len(self.prompts)
        self._feats = [_features(p) for p in self.prompts]
        self._n_feats = np.array([len(f) for f in self._feats], dtype=np.float64)
        # inverted indexes: feature -> candidates; text token / answer token / subject token -> candidates
        feat_post, tok_post = defaultdict(list), defaultdict(list)
        ans_post, subj_tok_post = defaultdict(list), defaultdict(list)
        self._subj_eq: dict[str, list[int]] = defaultdict(list)
        self._always: list[int] = []  # candidates the token prefilters cannot reason about
        self._subj_toks: dict[int, list[set]] = defaultdict(list)
        for i, (p, occ) in enumerate(zip(self.prompts, self.occurrences)):
            for f in self._feats[i]:
                feat_post[f].append(i)
            for w in set(_tokens(p)):
                tok_post[w].append(i)
            for c in occ:
                if c.answer and c.answer.strip():
                    aw = set(_tokens(c.answer))  # raw tokens: whole-word containment either way shares one
                    if not aw:
                        self._always.append(i)
                    for w in aw:
                        ans_post[w].append(i)
                if c.subject and c.subject.strip():
                    self._subj_eq[normalize_answer(c.subject)].append(i)
                    sw = _phrase_tokens(c.subject)
                    if not sw:
                        self._always.append(i)
                    else:
                        self._subj_toks[i].append(sw)
                    for w in sw:
                        subj_tok_post[w].append(i)
        as_arr = lambda d: {k: np.unique(np.array(v, dtype=np.int64)) for k, v in d.items()}  # noqa: E731
        self._feat_post, self._tok_post = as_arr(feat_post), as_arr(tok_post)
        self._ans_post, self._subj_tok_post = as_arr(ans_post), as_arr(subj_tok_post)
        self._index = {p: i for i, p in enumerate(self.prompts)}
        self._n = n
        self._masks: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return self._n

    def where(self, prompt: str) -> list[Candidate]:
        """Every occurrence of the pool prompt ``prompt`` (KeyError when it is not in the pool)."""
        return self.occurrences[self._index[prompt]]

    def _overlap(self, feats: Iterable) -> np.ndarray:
        """Number of shared features of each candidate with ``feats``, ``[n_candidates]``."""
        posts = [self._feat_post[f] for f in feats if f in self._feat_post]
        if not posts:
            return np.zeros(self._n)
        return np.bincount(np.concatenate(posts), minlength=self._n).astype(np.float64)

    def _containing_all(self, words: Iterable[str]) -> np.ndarray:
        """Candidates whose text has every token in ``words`` (all candidates when it is empty)."""
        words = set(words)
        if not words:
            return np.arange(self._n)
        out = None
        for w in sorted(words, key=lambda w: len(self._tok_post.get(w, ()))):
            post = self._tok_post.get(w)
            if post is None:
                return np.zeros(0, dtype=np.int64)
            out = post if out is None else np.intersect1d(out, post, assume_unique=True)
        return out

    def _flagged(self, t: _Target) -> set:
        """A superset of the candidates :func:`_leaks` rejects for ``t`` (see the module docstring)."""
        fact = t.fact
        flag = set(self._always)
        flag |= {self._index[p] for p in t.banned if p in self._index}
        if t.subject:
            flag.update(self._subj_eq.get(t.subject, ()))
        if fact.subject and fact.subject.strip():
            flag.update(self._containing_all(_phrase_tokens(fact.subject)).tolist())
        prompt_toks = set(_tokens(fact.prompt))
        for w in prompt_toks:  # candidate subject inside the deleted prompt
            for i in self._subj_tok_post.get(w, ()):
                if any(sw <= prompt_toks for sw in self._subj_toks[int(i)]):
                    flag.add(int(i))
        ans_toks = set(_tokens(fact.answer))
        if ans_toks:
            for w in ans_toks:  # answers sharing a token (superset of whole-word matches either way)
                flag.update(self._ans_post.get(w, np.zeros(0, dtype=np.int64)).tolist())
            flag.update(self._containing_all(_phrase_tokens(fact.answer)).tolist())
        else:
            flag.update(range(self._n))
        for r in t.refs:
            inter = self._overlap(r)
            jac = inter / np.maximum(self._n_feats + len(r) - inter, 1.0)
            flag.update(np.nonzero(jac > SIMILARITY_MAX - 1e-9)[0].tolist())
        return flag

    def _free(self, fact: Fact) -> np.ndarray:
        """Boolean mask ``[len(self)]``: the candidates that do not leak ``fact`` (cached for the
        last few facts, by value: a grid asks once per defense)."""
        key = (fact.id, fact.prompt, fact.answer, fact.subject, fact.relation, tuple(fact.paraphrases),
               tuple((n["prompt"], n.get("answer")) for n in fact.neighborhood))
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            return hit
        t = _Target.of(fact)
        free = np.ones(self._n, dtype=bool)
        for i in self._flagged(t):
            if any(_leaks(t, c.prompt, c.answer, c.subject, c.relation, self._feats[i]) for c in self.occurrences[i]):
                free[i] = False
        self._masks[key] = free
        while len(self._masks) > 8:
            self._masks.popitem(last=False)
        return free

    def leak_free(self, fact: Fact) -> list[str]:
        """The pool prompts that do not leak ``fact`` (:func:`leaks` is None for every occurrence),
        sorted."""
        return [self.prompts[i] for i in np.nonzero(self._free(fact))[0]]

    def leak_free_all(self, deleted: Sequence[Fact]) -> list[str]:
        """The pool prompts that leak none of ``deleted`` (one edit deleting several facts), sorted."""
        free = np.ones(self._n, dtype=bool)
        for f in deleted:
            free &= self._free(f)
        return [self.prompts[i] for i in np.nonzero(free)[0]]

    def select(self, fact: Fact, size: int, *, sim_frac: float = 0.5, seed: int = 0) -> list[str]:
        """:func:`retain_prompts` on this pool."""
        if size <= 0:
            return []
        free = np.nonzero(self._free(fact))[0]  # indexes in prompt (alphabetical) order
        if len(free) <= size:
            return [self.prompts[i] for i in free]
        score = self._overlap(_features(fact.prompt))[free] / (1 + self._n_feats[free])
        n_sim = int(round(size * sim_frac))
        top = free[np.lexsort((free, -score))[:n_sim]]  # most similar first, ties alphabetical
        chosen = set(top.tolist())
        rest = [self.prompts[i] for i in free if i not in chosen]
        return [self.prompts[i] for i in top] + fact_rng(seed, RETAIN, fact.id).sample(rest, size - n_sim)


_POOLS: "OrderedDict[tuple, tuple[tuple, RetainPool]]" = OrderedDict()
_POOL_CACHE = 2


def pool_for(facts: Sequence[Fact]) -> RetainPool:
    """The :class:`RetainPool` of ``facts``, built once per fact list (a small cache keyed by the
    fact objects, which it keeps alive, so a run's per-fact calls share one pool)."""
    key = tuple(map(id, facts))
    hit = _POOLS.get(key)
    if hit is not None:
        _POOLS.move_to_end(key)
        return hit[1]
    pool = RetainPool(facts)
    _POOLS[key] = (tuple(facts), pool)
    while len(_POOLS) > _POOL_CACHE:
        _POOLS.popitem(last=False)
    return pool


def retain_prompts(fact: Fact, facts: Sequence[Fact], size: int, *, sim_frac: float = 0.5,
                   seed: int = 0, pool: RetainPool | None = None) -> list[str]:
    """Up to ``size`` leak-free retain prompts for deleting ``fact``, drawn from the other facts'
    prompts and neighbourhood prompts (see the module docstring): the ``round(size * sim_frac)``
    most similar to the fact's prompt, then a seeded random draw. Deterministic for a given
    ``seed`` and fact id; fewer than ``size`` when the leak-free pool is smaller.

    Args:
        pool: a prebuilt :class:`RetainPool` of ``facts`` (default: :func:`pool_for`).

    Raises:
        ValueError: ``fact.answer`` is empty or whitespace-only.
    """
    if size <= 0:
        return []
    return (pool if pool is not None else pool_for(facts)).select(fact, size, sim_frac=sim_frac, seed=seed)
