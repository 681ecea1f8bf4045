"""Built-in multimodal facts: outside-knowledge questions about procedurally drawn flags.

One fact per (country, relation): the image is the country's flag, the prompt asks about the
country without naming it ("The capital of this country is"), and the answer is the capital,
official language, continent or currency. Each fact carries what the [MM] UnLOK-VQA protocol
needs (the project's method notes, §6):

- ``paraphrases``: text rephrasings of the question, asked about the same image;
- ``image_paraphrases``: fresh renders of the same flag at three augmentation strengths
  (easy / medium / hard, :func:`probe.vlm.flags.render_image`): same answer, different image;
- ``neighborhood_images``: other countries' flags asked the same question, each with its own
  answer (chosen to differ from this fact's answer where possible);
- ``neighborhood``: the other relations of the same country, asked about the same image;
- ``alt_answer``: another country's answer for the relation (error-injection target);
- ``text_prompt``: the same question with the country named ("This is the flag of France.\\n
  The capital of this country is"), for the text-only ceiling; ``entity``: the country;
- ``relation``: the relation's name (:data:`RELATIONS`, e.g. ``"capital"``, the built-in text facts'
  name for the same question): attack controls are other answers of the same relation. No
  ``subject``: the prompt names no entity ("this country"), the image does.

Prompts are declarative, with no ``<image>`` placeholder (the image goes before the prompt): the
small LM behind the mini-VLM answers these, while "Question: ... Answer:" prompts get ``\\n``
(the project's mini-VLM notes).

Render seeds are >= 10**6 and derived from (seed, country, image role) by hashing, so they never
coincide with the small seeds a training pipeline uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import InputError
from ..facts import IMAGE_STRENGTHS, Fact, load_jsonl

SEED_OFFSET = 10**6
"""All render seeds are >= this, so they never coincide with a training pipeline's small seeds."""
_FORMAT_VERSION = 2  # bump when the written set changes for the same arguments (cache key)


@dataclass(frozen=True)
class Relation:
    """A question asked about a country's flag.

    Attributes:
        name: short name (``"capital"``).
        prompt: declarative prompt asked about the image, the answer follows it.
        paraphrases: text rephrasings of ``prompt`` with the same answer.
        text_prompt: the text-only form, ``{country}`` is replaced by the country's name.
        answer_of: the answer for a :class:`probe.vlm.flags.Country`.
    """

    name: str
    prompt: str
    paraphrases: tuple[str, ...]
    text_prompt: str
    answer_of: Callable[[Any], str]


def _relation(name: str, prompt: str, paraphrases: tuple[str, ...], attr: str) -> Relation:
    return Relation(name, prompt, paraphrases, "This is the flag of {country}.\n" + prompt,
                    lambda c, _a=attr: str(getattr(c, _a)))


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    _relation("capital", "The capital of this country is",
              ("The capital city of this country is", "This country's capital is",
               "The seat of government of this country is"), "capital"),
    _relation("language", "The official language of this country is",
              ("The main language spoken in this country is", "This country's official language is",
               "Most people in this country speak"), "language"),
    _relation("continent", "This country is located in the continent of",
              ("This country lies in the continent of", "This country is part of the continent of",
               "The continent this country belongs to is"), "continent"),
    _relation("currency", "The currency of this country is the",
              ("The official currency of this country is the", "This country's currency is the",
               "People in this country pay with the"), "currency"),
)}
DEFAULT_RELATIONS = tuple(RELATIONS)


def _flags():
    from . import flags

    return flags


def slug(name: str) -> str:
    """``"Côte d'Ivoire"`` -> ``"cote-d-ivoire"`` (ASCII, lower case, dashes)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-") or "x"


def render_seed(seed: int, country: str, role: str) -> int:
    """The render seed of one image: ``>= 10**6``, a hash of (seed, country, role)."""
    h = hashlib.sha256(f"{seed}|{country}|{role}".encode()).digest()
    return SEED_OFFSET + int.from_bytes(h[:4], "big")


def _resolve_args(relations, countries, n_per_strength, n_neighborhood_images, seed, size):
    """Validate the writer's arguments; ``(relation names, Country objects)``."""
    if isinstance(relations, str):
        relations = [r.strip() for r in relations.split(",") if r.strip()]
    relations = list(relations)
    if not relations:
        raise InputError("no relations given", field="relations")
    for r in relations:
        if r not in RELATIONS:
            raise InputError(f"unknown relation {r!r}; valid relations: {', '.join(RELATIONS)}", field="relations")
    if len(set(relations)) != len(relations):
        raise InputError("a relation is listed twice", field="relations")
    flags = _flags()
    if countries is None:
        cs = list(flags.COUNTRIES)
    else:
        if isinstance(countries, str):
            countries = [c.strip() for c in countries.split(",") if c.strip()]
        cs = []
        for c in countries:
            name = getattr(c, "name", c)
            try:
                cs.append(flags.country(name))
            except (KeyError, ValueError, LookupError):
                known = ", ".join(c.name for c in flags.COUNTRIES)
                raise InputError(f"unknown country {name!r}; known countries: {known}", field="countries") from None
    if len(cs) < 2:
        raise InputError("need at least 2 countries (neighbourhood images and alt answers come from others)",
                         field="countries")
    names = [c.name for c in cs]
    if len(set(names)) != len(names):
        raise InputError("a country is listed twice", field="countries")
    if len({slug(n) for n in names}) != len(names):
        raise InputError("two countries have the same file-name slug", field="countries")
    for fld, value, low in (("n_per_strength", n_per_strength, 0),
                            ("n_neighborhood_images", n_neighborhood_images, 0), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"must be an integer >= {low}, got {value!r}", field=fld)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"must be an integer, got {seed!r}", field="seed")
    return relations, cs


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _pick_neighbors(own, others: Sequence, answer_of, n: int, rng: random.Random) -> list:
    """``n`` other countries, preferring answers different from ``own``'s and from each other."""
    pool = list(others)
    rng.shuffle(pool)
    own_answer = answer_of(own)
    chosen, used = [], set()
    for strict in (True, False):  # first distinct new answers, then any different answer
        for c in pool:
            if len(chosen) >= n:
                return chosen
            a = answer_of(c).strip().casefold()
            if c in chosen or _same(a, own_answer) or (strict and a in used):
                continue
            chosen.append(c)
            used.add(a)
    for c in pool:  # only same-answer countries left
        if len(chosen) >= n:
            break
        if c not in chosen:
            chosen.append(c)
    return chosen


def _records(relations: list[str], cs: list, n_per_strength: int, n_neighborhood_images: int, seed: int,
             save_image: Callable[[str, str, int], str]) -> Iterable[dict]:
    """The fact objects (JSON-ready, image paths relative to the facts file)."""
    main = {c.name: save_image(c.name, "easy", render_seed(seed, c.name, "main")) for c in cs}
    for c in cs:
        s = slug(c.name)
        paraphrase_images = {
            strength: [save_image(c.name, strength, render_seed(seed, c.name, f"{strength}-{k}"), f"{s}-{strength}-{k}")
                       for k in range(n_per_strength)]
            for strength in IMAGE_STRENGTHS} if n_per_strength else {}
        others = [o for o in cs if o.name != c.name]
        for rname in relations:
            rel = RELATIONS[rname]
            answer = rel.answer_of(c)
            rng = random.Random(f"{seed}|neighbors|{rname}|{c.name}")
            neigh = _pick_neighbors(c, others, rel.answer_of, n_neighborhood_images, rng)
            different = []
            for o in others:
                a = rel.answer_of(o)
                if not _same(a, answer) and not any(_same(a, d) for d in different):
                    different.append(a)
            alt = random.Random(f"{seed}|alt|{rname}|{c.name}").choice(different) if different else None
            yield {
                "id": f"flag-{rname}-{s}",
                "prompt": rel.prompt,
                "answer": answer,
                "paraphrases": list(rel.paraphrases),
                "neighborhood": [{"prompt": r.prompt, "answer": r.answer_of(c), "image": main[c.name]}
                                 for r in RELATIONS.values() if r.name != rname],
                "alt_answer": alt,
                "image": main[c.name],
                "image_paraphrases": paraphrase_images,
                "neighborhood_images": [{"image": main[o.name], "answer": rel.answer_of(o), "strength": "easy"}
                                        for o in neigh],
                "text_prompt": rel.text_prompt.format(country=c.name),
                "entity": c.name,
                "relation": rname,
            }


def write_builtin_image_facts(out_dir: str | os.PathLike, *, relations: Sequence[str] | str = DEFAULT_RELATIONS,
                              countries: Sequence[str] | str | None = None, n_per_strength: int = 2,
                              n_neighborhood_images: int = 3, seed: int = 0, size: int = 64) -> Path:
    """Render the flag images and write the built-in image fact set; the path of its ``facts.jsonl``.

    Writes ``out_dir/images/*.png`` (each image once, shared by every fact using it: a country's
    main image serves its facts of every relation and the neighbourhood of other countries'
    facts) and ``out_dir/facts.jsonl`` (one fact per country x relation, in country order,
    image paths relative to ``out_dir``). Everything is written into a temporary directory next
    to ``out_dir`` that is renamed into place at the end: an interrupted call leaves nothing.
    The same arguments give a byte-identical ``facts.jsonl``.

    Args:
        out_dir: a new directory (or an empty one).
        relations: names from :data:`RELATIONS` (a list, or a comma-separated string).
        countries: country names from :data:`probe.vlm.flags.COUNTRIES` (default: all).
        n_per_strength: paraphrase images per strength (easy, medium, hard).
        n_neighborhood_images: other countries' flags per fact.
        seed: base seed of the renders (the actual seeds are >= 10**6, see :func:`render_seed`).
        size: image side in pixels.

    Raises:
        InputError: unknown relation or country, bad counts, ``out_dir`` exists and is not empty.
    """
    relations, cs = _resolve_args(relations, countries, n_per_strength, n_neighborhood_images, seed, size)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError("already exists and is not an empty directory; choose a new output directory",
                         file=str(out_dir))
    flags = _flags()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        (tmp / "images").mkdir()
        written: set[str] = set()

        def save_image(name: str, strength: str, render: int, stem: str | None = None) -> str:
            rel = f"images/{stem or slug(name) + '-main'}.png"
            if rel not in written:
                flags.render_image(name, strength, render, size=size).save(tmp / rel, format="PNG")
                written.add(rel)
            return rel

        lines = [json.dumps(r, ensure_ascii=False) for r in
                 _records(relations, cs, n_per_strength, n_neighborhood_images, seed, save_image)]
        with open(tmp / "facts.jsonl", "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "facts.jsonl"


def _cache_key(relations, countries, n_per_strength, n_neighborhood_images, seed, size) -> str:
    relations, cs = _resolve_args(relations, countries, n_per_strength, n_neighborhood_images, seed, size)
    h = hashlib.sha256()
    h.update(json.dumps({"version": _FORMAT_VERSION, "relations": relations, "countries": [c.name for c in cs],
                         "n_per_strength": n_per_strength, "n_neighborhood_images": n_neighborhood_images,
                         "seed": seed, "size": size}, sort_keys=True).encode())
    for src in (Path(__file__), Path(_flags().__file__)):  # new renderer or writer -> new cache entry
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def builtin_image_facts_dir(*, relations: Sequence[str] | str = DEFAULT_RELATIONS,
                            countries: Sequence[str] | str | None = None, n_per_strength: int = 2,
                            n_neighborhood_images: int = 3, seed: int = 0, size: int = 64) -> Path:
    """``<cache>/image-facts/<digest>``: where :func:`load_builtin_image_facts` keeps the set for
    these arguments (cache root from :func:`probe.model.cache_dir`). The digest covers the
    arguments and the source of this module and :mod:`probe.vlm.flags`."""
    from ..model import cache_dir

    key = _cache_key(relations, countries, n_per_strength, n_neighborhood_images, seed, size)
    return cache_dir() / "image-facts" / key


def load_builtin_image_facts(**kw) -> list[Fact]:
    """The built-in image facts (arguments as :func:`write_builtin_image_facts`), written to the
    cache on first use (:func:`builtin_image_facts_dir`) and loaded with the normal loader."""
    d = builtin_image_facts_dir(**kw)
    path = d / "facts.jsonl"
    if not path.exists():
        try:
            write_builtin_image_facts(d, **kw)
        except InputError:
            if not path.exists():  # not a concurrent writer that finished first
                raise
    return load_jsonl(path)
