"""Facts: the JSONL format, the CounterFact loader, the built-in set and the known-fact filter.

JSONL format, one fact per line (field names fixed)::

    {"id": "capital-japan", "prompt": "The capital of Japan is", "answer": "Tokyo",
     "paraphrases": ["Japan's capital city is"],
     "neighborhood": [{"prompt": "The capital of France is", "answer": "Paris"}],
     "alt_answer": "Osaka", "image": null, "relation": "capital", "subject": "Japan"}

``id``, ``prompt`` and ``answer`` are required; ``paraphrases`` (list of prompts),
``neighborhood`` (list of ``{"prompt", "answer"}``), ``alt_answer``, ``image`` (a path,
relative to the file, for multimodal facts), ``relation`` and ``subject`` are optional.
``relation`` names the question the fact asks (a non-empty string; CounterFact's ``relation_id``):
facts of one relation ask the same kind of question, so another fact's answer of the same relation
is a plausible wrong answer, and attack controls are drawn from those answers. ``subject`` is the
entity the fact is about, a substring of ``prompt`` (ROME and causal tracing key on its tokens).
Every built-in fact has both (34 relations, each with at least 2 facts and 2 distinct answers).
Every problem is reported as an :class:`~probe.errors.InputError` naming the file, the line and
the field.

Multimodal facts (all optional; see :mod:`probe.vlm.image_facts` for a built-in set)::

    {"id": "flag-capital-france", "prompt": "The capital of this country is", "answer": "Paris",
     "image": "images/france-main.png",
     "image_paraphrases": {"easy": ["images/france-easy-0.png"], "medium": [...], "hard": [...]},
     "neighborhood_images": [{"image": "images/japan-main.png", "answer": "Tokyo"}],
     "neighborhood": [{"prompt": "The official language of this country is", "answer": "French",
                       "image": "images/france-main.png"}],
     "text_prompt": "This is the flag of France.\nThe capital of this country is", "entity": "France"}

- ``image_paraphrases``: other images with the same answer, by strength (keys ``easy``,
  ``medium``, ``hard``, any subset).
- ``neighborhood_images``: images of other entities asked the same question, each with its own
  answer (and an optional ``strength``).
- a ``neighborhood`` item may carry an ``image``: a neighbourhood question asked about that image;
  without one it is a text-only question.
- ``text_prompt``: the fact in text-only form naming the entity (the text-only ceiling).
- ``entity``: what the image shows.

Image paths are relative to the JSONL file's directory (absolute paths allowed); the loader
turns them into absolute paths and checks that each one exists and is a readable image (decoded once
with PIL). A prompt may contain the placeholder ``<image>`` (where the image goes; without it
the image comes before the prompt) once, and only on a fact that has an ``image`` (for a
neighbourhood item: that item's ``image``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError
from .images import IMAGE_TOKEN  # the image placeholder inside a prompt (LLaVA convention)

BUILTIN_FACTS = Path(__file__).parent / "data" / "builtin_facts.jsonl"
IMAGE_STRENGTHS = ("easy", "medium", "hard")
"""Keys of ``Fact.image_paraphrases``, from the closest to the furthest paraphrase image."""


@dataclass
class Fact:
    """One (prompt, answer) fact to delete and attack.

    Attributes:
        id: unique identifier.
        prompt: completion-style prompt whose continuation is the answer.
        answer: the answer string (no leading space).
        paraphrases: other prompts with the same answer (paraphrase score, rephrasing attacks).
        neighborhood: ``{"prompt", "answer"}`` facts that must survive the deletion.
        alt_answer: a wrong answer (error-injection target), optional.
        image: image path for multimodal facts, optional.
        source: ``"file:line"`` the fact was read from (for error messages).
        subject: the entity the fact is about, a substring of ``prompt`` (ROME edits at its
            last token); optional.
        image_paraphrases: ``{"easy"|"medium"|"hard": [absolute image path, ...]}``: other images
            with the same answer (image-rephrase attacks, [MM] §6).
        neighborhood_images: ``[{"image", "answer"(, "strength")}]``: other entities' images asked
            the same question, each with its own answer.
        text_prompt: the fact in text-only form naming the entity (text-only ceiling), optional.
        entity: what the image shows (e.g. ``"France"``), optional.
        relation: the relation the fact instantiates (CounterFact's ``relation_id``, e.g.
            ``"P36"``; the built-in facts' ``"capital"``), optional. Attack controls are drawn from
            the other answers of the same relation (:mod:`probe.controls`).
    """

    id: str
    prompt: str
    answer: str
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[dict[str, str]] = field(default_factory=list)
    alt_answer: str | None = None
    image: str | None = None
    source: str = ""
    subject: str | None = None
    image_paraphrases: dict[str, list[str]] = field(default_factory=dict)
    neighborhood_images: list[dict[str, str]] = field(default_factory=list)
    text_prompt: str | None = None
    entity: str | None = None
    relation: str | None = None

    @property
    def has_image(self) -> bool:
        """True for a multimodal fact (one with an ``image``)."""
        return self.image is not None

    def where(self) -> tuple[str | None, int | None]:
        """``(file, line)`` this fact was read from (parsed from :attr:`source`; None when unknown)."""
        file, _, line = (self.source or "").rpartition(":")
        return file or None, int(line) if line.isdigit() else None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


def _is_text(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def _check_text(value: Any, *, file: str, line: int, fld: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {type(value).__name__}", file=file, line=line, field=fld)
    if not value.strip():
        raise InputError("must not be empty or whitespace-only", file=file, line=line, field=fld)
    if "\x00" in value:
        raise InputError("contains a NUL character", file=file, line=line, field=fld)
    return value


def _check_image(value: Any, *, base: Path, cache: dict, file: str, line: int, fld: str) -> str:
    """Resolve an image path against ``base`` and check it is a readable image; the absolute path."""
    value = _check_text(value, file=file, line=line, fld=fld)
    path = Path(os.path.abspath(base / Path(value.strip()).expanduser()))
    key = str(path)
    if key not in cache:
        cache[key] = _image_problem(path)
    if cache[key]:
        raise InputError(cache[key], file=file, line=line, field=fld)
    return key


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or None (PIL ``open`` + a full ``load``, so truncated or
    corrupt pixel data is caught here, with the file and line, not halfway through a run)."""
    if not path.exists():
        return f"image file not found: {path}"
    if path.is_dir():
        return f"image path is a directory: {path}"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() alone passes truncated or corrupt pixel data
    except UnidentifiedImageError:
        return f"not a readable image (unknown or corrupt format): {path}"
    except OSError as exc:
        return f"cannot read image {path}: {exc.strerror or exc}"
    except Exception as exc:  # PIL raises SyntaxError, ValueError, struct.error... on broken files
        return f"not a readable image ({type(exc).__name__}: {exc}): {path}"
    return None


def _check_placeholder(text: str, has_image: bool, *, file: str, line: int, fld: str, what: str = "fact") -> None:
    n = text.count(IMAGE_TOKEN)
    if n > 1:
        raise InputError(f"{IMAGE_TOKEN} occurs {n} times; at most once", file=file, line=line, field=fld)
    if n and not has_image:
        raise InputError(f"contains {IMAGE_TOKEN} but the {what} has no image", file=file, line=line, field=fld)


def _image_fields(obj: dict, prompt: str, *, file: str, line: int, base_dir: str | Path | None,
                  cache: dict | None) -> dict:
    """Validate the multimodal fields of a fact object (see the module docstring)."""
    if base_dir is None:
        base_dir = Path(file).parent if file and not file.startswith("<") else Path.cwd()
    where = {"base": Path(base_dir), "cache": {} if cache is None else cache, "file": file, "line": line}
    out: dict = {}
    image = obj.get("image")
    if image is not None:
        image = _check_image(image, fld="image", **where)
    out["image"] = image
    _check_placeholder(prompt, image is not None, file=file, line=line, fld="prompt")
    if not prompt.replace(IMAGE_TOKEN, "").strip():
        raise InputError(f"has no text besides {IMAGE_TOKEN}", file=file, line=line, field="prompt")
    for i, p in enumerate(obj.get("paraphrases") or []):
        _check_placeholder(p, image is not None, file=file, line=line, fld=f"paraphrases[{i}]")

    ip = obj.get("image_paraphrases")
    ip = {} if ip is None else ip
    if not isinstance(ip, dict):
        raise InputError('must be an object {"easy"|"medium"|"hard": [image paths]}', file=file, line=line,
                         field="image_paraphrases")
    if ip and image is None:
        raise InputError("image paraphrases need the fact's own image", file=file, line=line,
                         field="image_paraphrases")
    for key in ip:
        if key not in IMAGE_STRENGTHS:
            raise InputError(f"unknown strength {key!r}; use {', '.join(IMAGE_STRENGTHS)}", file=file, line=line,
                             field=f"image_paraphrases.{key}")
    paraphrase_images = {}
    for key in IMAGE_STRENGTHS:  # canonical order
        if key not in ip:
            continue
        paths = ip[key]
        if not isinstance(paths, list):
            raise InputError("must be a list of image paths", file=file, line=line, field=f"image_paraphrases.{key}")
        paraphrase_images[key] = [_check_image(p, fld=f"image_paraphrases.{key}[{i}]", **where)
                                  for i, p in enumerate(paths)]
    out["image_paraphrases"] = paraphrase_images

    ni = obj.get("neighborhood_images")
    ni = [] if ni is None else ni
    if not isinstance(ni, list):
        raise InputError('must be a list of {"image", "answer"} objects', file=file, line=line,
                         field="neighborhood_images")
    if ni and image is None:
        raise InputError("neighbourhood images need the fact's own image", file=file, line=line,
                         field="neighborhood_images")
    neigh_images = []
    for i, item in enumerate(ni):
        fld = f"neighborhood_images[{i}]"
        if not isinstance(item, dict):
            raise InputError('must be an object with "image" and "answer"', file=file, line=line, field=fld)
        for key in ("image", "answer"):
            if key not in item:
                raise InputError("missing required field", file=file, line=line, field=f"{fld}.{key}")
        entry = {"image": _check_image(item["image"], fld=f"{fld}.image", **where),
                 "answer": _check_text(item["answer"], file=file, line=line, fld=f"{fld}.answer").strip()}
        strength = item.get("strength")
        if strength is not None:
            if strength not in IMAGE_STRENGTHS:
                raise InputError(f"unknown strength {strength!r}; use {', '.join(IMAGE_STRENGTHS)}", file=file,
                                 line=line, field=f"{fld}.strength")
            entry["strength"] = strength
        neigh_images.append(entry)
    out["neighborhood_images"] = neigh_images

    neigh_image_paths = []
    for i, n in enumerate(obj.get("neighborhood") or []):
        n_image = n.get("image")
        if n_image is not None:
            n_image = _check_image(n_image, fld=f"neighborhood[{i}].image", **where)
        _check_placeholder(n["prompt"], n_image is not None, file=file, line=line, fld=f"neighborhood[{i}].prompt",
                           what="neighbourhood item")
        neigh_image_paths.append(n_image)
    out["neighborhood_image_paths"] = neigh_image_paths

    text_prompt = obj.get("text_prompt")
    if text_prompt is not None:
        text_prompt = _check_text(text_prompt, file=file, line=line, fld="text_prompt")
        _check_placeholder(text_prompt, False, file=file, line=line, fld="text_prompt", what="text-only prompt")
    out["text_prompt"] = text_prompt
    entity = obj.get("entity")
    if entity is not None:
        entity = _check_text(entity, file=file, line=line, fld="entity").strip()
    out["entity"] = entity
    return out


def fact_from_dict(obj: Any, *, file: str = "<input>", line: int = 1, base_dir: str | Path | None = None,
                   image_cache: dict | None = None) -> Fact:
    """Validate one decoded JSON object into a :class:`Fact`.

    Args:
        obj: the decoded JSON object.
        file, line: where it came from (for error messages and ``Fact.source``).
        base_dir: directory relative image paths are resolved against (default: ``file``'s
            directory, or the working directory when ``file`` is not a path).
        image_cache: ``{absolute path: problem or None}`` shared across facts so that an image
            used by many facts is checked once.

    Raises:
        InputError: a missing or wrongly typed field, an empty prompt/answer, a missing or
            unreadable image, an unknown image-paraphrase strength, a misplaced ``<image>``.
    """
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=file, line=line)
    for req in ("id", "prompt", "answer"):
        if req not in obj:
            raise InputError("missing required field", file=file, line=line, field=req)
    fid = obj["id"]
    if isinstance(fid, bool) or not isinstance(fid, (str, int)) or not str(fid).strip():
        raise InputError("must be a non-empty string", file=file, line=line, field="id")
    prompt = _check_text(obj["prompt"], file=file, line=line, fld="prompt")
    answer = _check_text(obj["answer"], file=file, line=line, fld="answer").strip()
    paraphrases = obj.get("paraphrases") or []
    if not isinstance(paraphrases, list):
        raise InputError("must be a list of prompts", file=file, line=line, field="paraphrases")
    for i, p in enumerate(paraphrases):
        _check_text(p, file=file, line=line, fld=f"paraphrases[{i}]")
    neighborhood = obj.get("neighborhood") or []
    if not isinstance(neighborhood, list):
        raise InputError("must be a list of {\"prompt\", \"answer\"} objects", file=file, line=line,
                         field="neighborhood")
    neigh = []
    for i, n in enumerate(neighborhood):
        if not isinstance(n, dict):
            raise InputError("must be an object with \"prompt\" and \"answer\"", file=file, line=line,
                             field=f"neighborhood[{i}]")
        for key in ("prompt", "answer"):
            if key not in n:
                raise InputError("missing required field", file=file, line=line, field=f"neighborhood[{i}].{key}")
            _check_text(n[key], file=file, line=line, fld=f"neighborhood[{i}].{key}")
        neigh.append({"prompt": n["prompt"], "answer": n["answer"].strip()})
    alt = obj.get("alt_answer")
    if alt is not None:
        alt = _check_text(alt, file=file, line=line, fld="alt_answer").strip()
    mm = _image_fields(obj, prompt, file=file, line=line, base_dir=base_dir, cache=image_cache)
    image = mm["image"]
    for n, n_image in zip(neigh, mm["neighborhood_image_paths"]):
        if n_image is not None:
            n["image"] = n_image
    subject = obj.get("subject")
    if subject is not None:
        subject = _check_text(subject, file=file, line=line, fld="subject").strip()
        if subject not in prompt:
            raise InputError(f"subject {subject!r} does not occur in the prompt", file=file, line=line,
                             field="subject")
    relation = obj.get("relation")
    if relation is not None and (not isinstance(relation, str) or not relation.strip()):
        raise InputError("must be a non-empty string", file=file, line=line, field="relation")
    return Fact(id=str(fid), prompt=prompt, answer=answer, paraphrases=list(paraphrases), neighborhood=neigh,
                alt_answer=alt, image=image, source=f"{file}:{line}", subject=subject,
                relation=relation.strip() if relation is not None else None,
                image_paraphrases=mm["image_paraphrases"], neighborhood_images=mm["neighborhood_images"],
                text_prompt=mm["text_prompt"], entity=mm["entity"])


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError("file not found", file=str(path))
    if path.is_dir():
        raise InputError("is a directory, expected a file", file=str(path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path)) from None
    if not raw.strip():
        raise InputError("file is empty", file=str(path))
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise InputError("binary data (NUL byte), not a text JSON file", file=str(path), line=line)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError("not valid UTF-8 text", file=str(path), line=line) from None


def load_jsonl(path: str | Path) -> list[Fact]:
    """Load and validate a JSONL facts file.

    Blank lines are skipped. Duplicate ids are rejected.

    Raises:
        InputError: file missing/empty/binary/not UTF-8, a line that is not JSON, a missing or
            wrongly typed field, an empty prompt or answer, a duplicate id.
    """
    path = Path(path)
    text = _read_text(path)
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    image_cache: dict = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg}; column {exc.colno})", file=str(path), line=lineno) from None
        fact = fact_from_dict(obj, file=str(path), line=lineno, base_dir=path.parent, image_cache=image_cache)
        if fact.id in seen:
            raise InputError(f"duplicate id {fact.id!r} (first seen on line {seen[fact.id]})", file=str(path),
                             line=lineno, field="id")
        seen[fact.id] = lineno
        facts.append(fact)
    if not facts:
        raise InputError("no facts in file", file=str(path))
    return facts


def load_counterfact(path: str | Path) -> list[Fact]:
    """Load the CounterFact JSON shape (a list of records, Meng et al. 2022).

    Mapping: ``id`` = ``case_id``; ``prompt`` = ``requested_rewrite.prompt`` formatted with the
    subject; ``answer`` = ``target_true.str``; ``alt_answer`` = ``target_new.str``;
    ``paraphrases`` = ``paraphrase_prompts``; ``relation`` = ``requested_rewrite.relation_id``;
    ``neighborhood`` = ``neighborhood_prompts``, each with the fact's true answer (CounterFact neighbours share the relation and the answer).
    The error's line is the line where the bad record starts.

    Raises:
        InputError: unreadable file, not JSON, not a list, or a record missing a field.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; is it a JSONL file? use --format jsonl" if exc.msg == "Extra data" else ""
        raise InputError(f"not valid CounterFact JSON ({exc.msg} at column {exc.colno}){hint}", file=str(path),
                         line=exc.lineno) from None
    if not isinstance(data, list):
        raise InputError("CounterFact format expects a JSON list of records", file=str(path), line=1)
    line_starts = _record_lines(text, len(data))
    facts, seen = [], set()
    for i, rec in enumerate(data):
        line = line_starts[i] if i < len(line_starts) else 1
        where = {"file": str(path), "line": line}
        if not isinstance(rec, dict):
            raise InputError(f"record {i} is not an object", **where)
        try:
            rw = rec["requested_rewrite"]
            subject = rw["subject"]
            template = rw["prompt"]
            answer = rw["target_true"]["str"]
        except (KeyError, TypeError) as exc:
            raise InputError(f"record {i} lacks {exc}", field="requested_rewrite", **where) from None
        if not isinstance(template, str) or "{}" not in template:
            raise InputError(f"record {i}: prompt has no '{{}}' for the subject", field="requested_rewrite.prompt",
                             **where)
        cid = str(rec.get("case_id", i))
        if cid in seen:
            raise InputError(f"duplicate case_id {cid!r}", field="case_id", **where)
        seen.add(cid)
        obj = {
            "id": cid,
            "prompt": template.format(subject),
            "answer": answer,
            "paraphrases": [p for p in rec.get("paraphrase_prompts", []) if _is_text(p)],
            "neighborhood": [{"prompt": p, "answer": answer} for p in rec.get("neighborhood_prompts", [])
                             if _is_text(p)],
            "alt_answer": (rw.get("target_new") or {}).get("str") or None,
            "subject": subject if isinstance(subject, str) and subject.strip() else None,
            "relation": rw.get("relation_id") if _is_text(rw.get("relation_id")) else None,
        }
        facts.append(fact_from_dict(obj, file=str(path), line=line))
    if not facts:
        raise InputError("no records in file", file=str(path))
    return facts


def _record_lines(text: str, n: int) -> list[int]:
    """Best-effort start line of each top-level record of a JSON list (for error messages)."""
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if depth == 1 and ch == "{":
                lines.append(line)
                if len(lines) >= n:
                    break
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def load_facts(path: str | Path | None = None, fmt: str = "auto") -> list[Fact]:
    """Load facts: the built-in set when ``path`` is None, else JSONL or CounterFact JSON.

    Args:
        path: a facts file, or None for the built-in set.
        fmt: ``"jsonl"``, ``"counterfact"`` or ``"auto"`` (CounterFact if the file starts with
            ``[``, else JSONL).

    Raises:
        InputError: see :func:`load_jsonl` / :func:`load_counterfact`; an unknown ``fmt``.
    """
    if path is None:
        return load_jsonl(BUILTIN_FACTS)
    if fmt not in ("auto", "jsonl", "counterfact"):
        raise InputError(f"unknown facts format {fmt!r}; use jsonl or counterfact", field="format")
    if fmt == "auto":
        head = _read_text(Path(path)).lstrip()[:1]
        fmt = "counterfact" if head == "[" else "jsonl"
    return load_counterfact(path) if fmt == "counterfact" else load_jsonl(path)


def check_lengths(model, facts: Sequence[Fact]) -> None:
    """Reject prompts longer than the model's context window before any work starts.

    Raises:
        PromptTooLongError: naming the fact's file, line and field.
    """
    from .errors import PromptTooLongError
    from .tokens import tokenize

    limit = model.context_length
    if limit is None:
        return
    for f in facts:
        file, line = f.where()
        for fld, text in [("prompt", f.prompt)] + [(f"paraphrases[{i}]", p) for i, p in enumerate(f.paraphrases)] \
                + [(f"neighborhood[{i}].prompt", n["prompt"]) for i, n in enumerate(f.neighborhood)] \
                + ([("text_prompt", f.text_prompt)] if f.text_prompt else []):
            n_tok = len(tokenize(model.tokenizer, text))
            # the answer is appended for teacher forcing: keep a margin of 16 tokens
            if n_tok + 16 > limit:
                raise PromptTooLongError(
                    f"{n_tok} tokens: longer than the model's context of {limit} (minus 16 for the answer)",
                    file=file, line=line, field=fld)
