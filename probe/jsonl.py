"""The one append-only JSONL log (the jobs' ``per_fact.jsonl``, ``pre.jsonl``, ``units.jsonl``,
``causal_traces.jsonl``; read back by :meth:`probe.results.RunResult.load`): every record is fsync'd as it is appended, and a torn last line left by a
kill is dropped when the log is opened, so an interrupted job loses no finished record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import write_text_atomic


class JsonlLog:
    """Append-only JSONL file of dict records.

    Opening reads the intact records (stopping at a torn or unparsable line) and, with
    ``repair=True``, rewrites the file atomically with just those, so later appends start on a
    clean line.
    """

    def __init__(self, path: str | Path, *, repair: bool = True):
        self.path = Path(path)
        self.records: list[dict] = read_jsonl(self.path)
        if repair:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, *records: dict) -> None:
        """Append records, flushed and fsync'd before returning."""
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)


def read_jsonl(path: str | Path) -> list[dict]:
    """The intact records of a JSONL log (nothing if it does not exist; stops at a torn line)."""
    path = Path(path)
    out: list[dict] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
