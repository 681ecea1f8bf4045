"""Facts: the JSONL format, the CounterFact loader, the built-in set and the known-fact filter.

JSONL format, one fact per line (field names fixed)::

    {"id": "capital-japan", "prompt": "The capital of Japan is", "answer": "Tokyo",
     "paraphrases": ["Japan's capital city is"],
     "neighborhood": [{"prompt": "The capital of France is", "answer": "Paris"}],
     "alt_answer": "Osaka", "image": null}

``id``, ``prompt`` and ``answer`` are required; ``paraphrases`` (list of prompts),
``neighborhood`` (list of ``{"prompt", "answer"}``), ``alt_answer`` and ``image`` (a path,
relative to the file, for multimodal facts) are optional. Every problem is reported as an
:class:`~probe.errors.InputError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

BUILTIN_FACTS = Path(__file__).parent / "data" / "builtin_facts.jsonl"


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


def fact_from_dict(obj: Any, *, file: str = "<input>", line: int = 1) -> Fact:
    """Validate one decoded JSON object into a :class:`Fact`.

    Raises:
        InputError: a missing or wrongly typed field, or an empty prompt/answer.
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
    image = obj.get("image")
    if image is not None:
        image = _check_text(image, file=file, line=line, fld="image")
    subject = obj.get("subject")
    if subject is not None:
        subject = _check_text(subject, file=file, line=line, fld="subject").strip()
        if subject not in prompt:
            raise InputError(f"subject {subject!r} does not occur in the prompt", file=file, line=line,
                             field="subject")
    return Fact(id=str(fid), prompt=prompt, answer=answer, paraphrases=list(paraphrases), neighborhood=neigh,
                alt_answer=alt, image=image, source=f"{file}:{line}", subject=subject)


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
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg} at column {exc.colno})", file=str(path), line=lineno) from None
        fact = fact_from_dict(obj, file=str(path), line=lineno)
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
    ``paraphrases`` = ``paraphrase_prompts``; ``neighborhood`` = ``neighborhood_prompts``, each
    with the fact's true answer (CounterFact neighbours share the relation and the answer).
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
        file, _, line = f.source.rpartition(":")
        for fld, text in [("prompt", f.prompt)] + [(f"paraphrases[{i}]", p) for i, p in enumerate(f.paraphrases)] \
                + [(f"neighborhood[{i}].prompt", n["prompt"]) for i, n in enumerate(f.neighborhood)]:
            n_tok = len(tokenize(model.tokenizer, text))
            # the answer is appended for teacher forcing: keep a margin of 16 tokens
            if n_tok + 16 > limit:
                raise PromptTooLongError(
                    f"{n_tok} tokens: longer than the model's context of {limit} (minus 16 for the answer)",
                    file=file or None, line=int(line) if line.isdigit() else None, field=fld)
