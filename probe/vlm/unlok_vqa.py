"""Import UnLOK-VQA ([MM], HF ``vaidehi99/UnLOK-VQA``) records as multimodal facts.

Record fields (the project's method notes, §6): ``id``, ``src`` (the question), ``pred`` (the
answer to delete; ``answers[0]`` if ``pred`` is absent), ``rephrase`` (str or list of question
paraphrases), ``loc`` / ``loc_ans`` (neighbourhood questions, "nq question: ..." and their answers;
str or lists), ``image_id`` (COCO-2017), ``alt_ans`` (list of alternative answers), optional
``subject``, ``neigh_idx`` (default ``[0, 1, 2]``), ``answers``.

Files:

- main image: ``{coco}/train2017/{image_id:012d}.jpg``, else ``{coco}/val2017/{image_id:012d}.jpg``,
  else ``{coco}/{image_id:012d}.jpg`` (first that exists);
- paraphrase images (same answer) under ``paraphrase_root``: easy ``parap_images/okvqa/{id}.jpg``,
  medium ``parap_images_medium/okvqa/{id}.jpg``, hard
  ``paraphrase_images_hard/okvqa_yolo_dino_bert/processed_images/{id}.jpg``;
- neighbourhood images (same question, answer ``alt_ans[j]``) under ``neighborhood_root``, for j
  in ``neigh_idx``: easy ``neigh_easy/{id}_{j}.jpg``, medium ``neigh_med/{id}_{j}.jpg``, hard
  ``neighborhood_images_hard/okvqa/{id}_{j}.jpg``.

Missing paraphrase or neighbourhood images are skipped (the public release lacks some); a missing
COCO image is an error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..facts import Fact, _read_text, fact_from_dict

DEFAULT_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nAnswer the question in one word\n "
    "Question: {question} Answer: ASSISTANT:")
"""LLaVA-v1.5 prompt of the [MM] code (method.md §2): the Vicuna-v1 system prompt, then
``USER: <image>\\n`` + ``Answer the question in one word\\n Question: {q} Answer:`` + `` ASSISTANT:``."""

COCO_SUBDIRS = ("train2017", "val2017", "")
PARAPHRASE_IMAGES = {"easy": "parap_images/okvqa/{id}.jpg",
                     "medium": "parap_images_medium/okvqa/{id}.jpg",
                     "hard": "paraphrase_images_hard/okvqa_yolo_dino_bert/processed_images/{id}.jpg"}
NEIGHBORHOOD_IMAGES = {"easy": "neigh_easy/{id}_{j}.jpg",
                       "medium": "neigh_med/{id}_{j}.jpg",
                       "hard": "neighborhood_images_hard/okvqa/{id}_{j}.jpg"}
DEFAULT_NEIGH_IDX = (0, 1, 2)


def coco_image(coco_dir: str | os.PathLike, image_id: int) -> Path | None:
    """The COCO file of ``image_id``: train2017, then val2017, then ``coco_dir`` itself; None if absent."""
    name = f"{image_id:012d}.jpg"
    for sub in COCO_SUBDIRS:
        p = Path(coco_dir) / sub / name
        if p.is_file():
            return p
    return None


def read_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line, record)`` pairs of a JSON list (line = the record's 1-based index) or a JSONL file
    (line = its line number).

    Raises:
        InputError: missing/empty/binary file, invalid JSON, a JSON document that is not a list.
    """
    path = Path(path)
    text = _read_text(path)
    if text.lstrip()[:1] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg}; column {exc.colno})", file=str(path),
                             line=exc.lineno) from None
        return list(enumerate(data, 1))
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg}; column {exc.colno})", file=str(path),
                             line=lineno) from None
    return out


def _question(text: str) -> str:
    """``"nq question: who wrote hamlet"`` -> ``"Who wrote hamlet?"``."""
    q = re.sub(r"^\s*nq question:\s*", "", text, flags=re.IGNORECASE).strip()
    if q:
        q = q[0].upper() + q[1:]
        if q[-1] not in "?.!":
            q += "?"
    return q


def _first_word(text: str) -> str:
    """The neighbourhood label: the first word of ``loc_ans`` (method.md §5), trailing punctuation off."""
    words = text.split()
    if not words:
        return ""
    return words[0].rstrip(",.;:!?") or words[0]


def _str_list(value: Any, err) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise err(f"must be a string or a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise err(f"item {i} must be a string, got {type(v).__name__}")
    return list(value)


def _fill(template: str, q: str) -> str:
    """The prompt of question ``q``: ``template`` with ``{question}`` replaced by ``q`` (stripped)."""
    return template.replace("{question}", q.strip())


def _record_id_src(rec: dict, err) -> tuple[str, str]:
    """``(id, src)`` of a record; the required fields (``id``, ``src``, ``image_id``) must be present."""
    for req in ("id", "src", "image_id"):
        if req not in rec:
            raise err(req)("missing required field")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise err("id")("must be a non-empty string or integer")
    rid = str(rid).strip()
    src = rec["src"]
    if not isinstance(src, str) or not src.strip():
        raise err("src")("must be a non-empty string")
    return rid, src


def _record_answer(rec: dict, err) -> str:
    """The record's answer: ``pred``, or ``answers[0]`` when ``pred`` is missing."""
    answer = rec.get("pred")
    if not (isinstance(answer, str) and answer.strip()):
        answers = rec.get("answers")
        if answer is None and isinstance(answers, list) and answers and isinstance(answers[0], str) \
                and answers[0].strip():
            answer = answers[0]
        elif answer is None:
            raise err("pred")("missing required field (and no answers[0] to fall back on)")
        else:
            raise err("pred")("must be a non-empty string")
    return answer


def _record_image(rec: dict, err, coco_dir: str | os.PathLike) -> Path:
    """The COCO image file of the record's ``image_id`` (an int or a digit string)."""
    image_id = rec["image_id"]
    if isinstance(image_id, str) and image_id.strip().isdigit():
        image_id = int(image_id.strip())
    if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
        raise err("image_id")(f"must be a COCO image id (a non-negative integer), got {image_id!r}")
    image = coco_image(coco_dir, image_id)
    if image is None:
        tried = ", ".join(str(Path(coco_dir) / s / f"{image_id:012d}.jpg") for s in COCO_SUBDIRS)
        raise err("image_id")(f"COCO image not found (tried {tried})")
    return image


def _record_neighborhood(rec: dict, err, template: str, image: Path) -> list[dict]:
    """Neighbourhood prompts from ``loc`` / ``loc_ans`` (labels: first word), on the fact's own image."""
    locs = _str_list(rec.get("loc"), err("loc"))
    loc_ans = _str_list(rec.get("loc_ans"), err("loc_ans"))
    if len(locs) != len(loc_ans) and any(q.strip() for q in locs):
        raise err("loc_ans")(f"{len(loc_ans)} answers for {len(locs)} loc questions")
    neighborhood = []
    for i, (q, a) in enumerate(zip(locs, loc_ans)):
        q = _question(q)
        if not q:
            continue
        label = _first_word(a)
        if not label:
            raise err(f"loc_ans[{i}]" if isinstance(rec.get("loc_ans"), list) else "loc_ans")("empty answer")
        neighborhood.append({"prompt": _fill(template, q), "answer": label, "image": str(image)})
    return neighborhood


def _image_paraphrases(paraphrase_root: str | os.PathLike | None, rid: str) -> dict[str, list[str]]:
    """``{strength: [absolute path]}`` of the record's paraphrase images that exist."""
    image_paraphrases: dict[str, list[str]] = {}
    if paraphrase_root is not None:
        for strength, pattern in PARAPHRASE_IMAGES.items():
            p = Path(paraphrase_root) / pattern.format(id=rid)
            if p.is_file():
                image_paraphrases[strength] = [str(p.absolute())]
    return image_paraphrases


def _neighborhood_images(rec: dict, err, neighborhood_root: str | os.PathLike | None, rid: str,
                         alt_ans: list[str]) -> list[dict]:
    """The record's existing neighbourhood images (``neigh_idx``, default :data:`DEFAULT_NEIGH_IDX`),
    each answered by ``alt_ans[j]``."""
    neighborhood_images = []
    if neighborhood_root is not None:
        neigh_idx = rec.get("neigh_idx")
        neigh_idx = list(DEFAULT_NEIGH_IDX) if neigh_idx is None else neigh_idx
        if isinstance(neigh_idx, int) and not isinstance(neigh_idx, bool):
            neigh_idx = [neigh_idx]
        if not isinstance(neigh_idx, list) or any(isinstance(j, bool) or not isinstance(j, int) or j < 0
                                                  for j in neigh_idx):
            raise err("neigh_idx")(f"must be a list of non-negative integers, got {neigh_idx!r}")
        for strength, pattern in NEIGHBORHOOD_IMAGES.items():
            for j in neigh_idx:
                p = Path(neighborhood_root) / pattern.format(id=rid, j=j)
                if not p.is_file():
                    continue
                if j >= len(alt_ans) or not alt_ans[j]:
                    raise err("alt_ans")(f"no alt_ans[{j}] for the neighbourhood image {p}")
                neighborhood_images.append({"image": str(p.absolute()), "answer": alt_ans[j], "strength": strength})
    return neighborhood_images


def _record_subject(rec: dict, main_prompt: str) -> str | None:
    """The record's ``subject`` (stripped) if it occurs in the main prompt, else None."""
    subject = rec.get("subject")
    return subject.strip() if isinstance(subject, str) and subject.strip() and subject.strip() in main_prompt \
        else None


def record_to_fact(rec: Any, *, file: str, line: int, coco_dir: str | os.PathLike,
                   paraphrase_root: str | os.PathLike | None = None,
                   neighborhood_root: str | os.PathLike | None = None, template: str = DEFAULT_TEMPLATE,
                   image_cache: dict | None = None) -> Fact:
    """One UnLOK-VQA record as a :class:`Fact` (image paths absolute; see the module docstring).

    Raises:
        InputError: naming ``file``, ``line`` and the record field (missing field, wrong type,
            COCO image not found, unreadable image, no ``alt_ans`` for a neighbourhood image).
    """
    def err(field):
        return lambda msg: InputError(msg, file=file, line=line, field=field)

    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}", file=file, line=line)
    rid, src = _record_id_src(rec, err)
    answer = _record_answer(rec, err)
    image = _record_image(rec, err, coco_dir)
    paraphrases = [_fill(template, p) for p in _str_list(rec.get("rephrase"), err("rephrase")) if p.strip()]
    neighborhood = _record_neighborhood(rec, err, template, image)
    alt_ans = [a.strip() for a in _str_list(rec.get("alt_ans"), err("alt_ans"))]
    alt = next((a for a in alt_ans if a), None)
    image_paraphrases = _image_paraphrases(paraphrase_root, rid)
    neighborhood_images = _neighborhood_images(rec, err, neighborhood_root, rid, alt_ans)
    main_prompt = _fill(template, src)
    obj = {"id": rid, "prompt": main_prompt, "answer": answer, "paraphrases": paraphrases,
           "neighborhood": neighborhood, "alt_answer": alt, "image": str(image.absolute()),
           "image_paraphrases": image_paraphrases, "neighborhood_images": neighborhood_images,
           "subject": _record_subject(rec, main_prompt)}
    try:
        return fact_from_dict(obj, file=file, line=line, base_dir=Path.cwd(), image_cache=image_cache)
    except InputError as exc:  # name the record's own field, not the converted fact's
        raise InputError(exc.message, file=exc.file, line=exc.line, field=record_field(exc.field)) from None


_FIELD_MAP = (("neighborhood", "loc"), ("paraphrases", "rephrase"),
              ("prompt", "src"), ("answer", "pred"), ("alt_answer", "alt_ans"), ("image", "image_id"))


def record_field(field: str | None) -> str | None:
    """The UnLOK-VQA record field behind a fact field (``paraphrases[1]`` -> ``rephrase[1]``,
    ``neighborhood[0].prompt`` -> ``loc[0]``, ``prompt`` -> ``src``)."""
    if not field:
        return field
    for ours, theirs in _FIELD_MAP:
        if field == ours or field.startswith((ours + "[", ours + ".")):
            rest = field[len(ours):]
            if ours == "neighborhood":
                rest = re.sub(r"\.prompt$", "", rest)
                rest = re.sub(r"\.answer$", "", rest)
                if field.endswith(".answer"):
                    return "loc_ans" + rest
            return theirs + rest
    return field


def import_unlok_vqa(records_path: str | os.PathLike, coco_dir: str | os.PathLike, *,
                     paraphrase_root: str | os.PathLike | None = None,
                     neighborhood_root: str | os.PathLike | None = None, template: str = DEFAULT_TEMPLATE,
                     limit: int | None = None, out: str | os.PathLike | None = None) -> list[Fact]:
    """Read UnLOK-VQA records (JSON list or JSONL) and return them as facts.

    The prompt of the question ``src`` (and of each ``rephrase`` and ``loc`` question) is
    ``template`` with ``{question}`` replaced (default :data:`DEFAULT_TEMPLATE`, LLaVA-1.5).
    ``answer`` = ``pred``; ``alt_answer`` = the first non-empty ``alt_ans``; ``neighborhood`` =
    the ``loc`` questions ("nq question: " stripped, capitalised, "?" added) asked about the same
    image, each labelled with the first word of its ``loc_ans``. File layout: module docstring.

    Args:
        records_path: the records file.
        coco_dir: the COCO-2017 root (with ``train2017/`` and/or ``val2017/``).
        paraphrase_root: root of the paraphrase images (optional).
        neighborhood_root: root of the neighbourhood images (optional).
        template: prompt template containing ``{question}``.
        limit: keep the first N records.
        out: also write the facts as JSONL here (atomically, image paths absolute) so that
            :func:`probe.facts.load_facts` reads them back.

    Raises:
        InputError: naming the records file, the record's line (1-based index for a JSON list)
            and the field; or a bad directory / template / limit argument.
    """
    if not isinstance(template, str) or "{question}" not in template:
        raise InputError("the prompt template must contain {question}", field="template")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"must be a positive integer, got {limit!r}", field="limit")
    for name, d in (("coco_dir", coco_dir), ("paraphrase_root", paraphrase_root),
                    ("neighborhood_root", neighborhood_root)):
        if d is not None and not Path(d).is_dir():
            raise InputError("not a directory" if Path(d).exists() else "directory not found", file=str(d),
                             field=name)
    file = str(records_path)
    records = read_records(records_path)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise InputError("no records in file", file=file)
    facts, seen, cache = [], {}, {}
    for line, rec in records:
        fact = record_to_fact(rec, file=file, line=line, coco_dir=coco_dir, paraphrase_root=paraphrase_root,
                              neighborhood_root=neighborhood_root, template=template, image_cache=cache)
        if fact.id in seen:
            raise InputError(f"duplicate id {fact.id!r} (first seen at {seen[fact.id]})", file=file, line=line,
                             field="id")
        seen[fact.id] = line
        facts.append(fact)
    if out is not None:
        from ..atomic import write_text_atomic

        write_text_atomic(out, "".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n" for f in facts))
    return facts


__all__: Sequence[str] = ("DEFAULT_TEMPLATE", "import_unlok_vqa", "record_to_fact", "read_records", "coco_image")
