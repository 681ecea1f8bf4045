"""Output folders: the one preparation every job does before writing anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ProbeAttackError

#: Files that mark a folder as holding a run (``run`` / ``attack``) or a grid.
RUN_FILES = ("per_fact.jsonl", "results.json")
GRID_FILES = ("units.jsonl", "grid.json")


class RunError(ProbeAttackError):
    """A job cannot start (e.g. an output folder that already holds another run)."""


def check_output(out: str | Path, kind: str, stamp: dict, resume: bool, *, stamp_file: str,
                 ignore: tuple[str, ...] = (), defaults: dict | None = None) -> Path:
    """Check that ``out`` can take a job of ``kind`` (``"run"`` or ``"grid"``): not a file, not
    holding the other kind, not holding results unless ``resume``, and on resume holding a job
    with the same settings (``stamp`` keys other than ``ignore``; a setting the earlier job's stamp
    does not have -- one added to the toolkit since -- matches when it is at its value in
    ``defaults``, the config's defaults). Writes nothing.

    Raises:
        RunError: any of those (the message says which and what to do).
    """
    out = Path(out)
    own, other = (RUN_FILES, GRID_FILES) if kind == "run" else (GRID_FILES, RUN_FILES)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if any((out / f).exists() for f in other):
        held = "a grid (units.jsonl)" if kind == "run" else "a run (per_fact.jsonl), not a grid"
        raise RunError(f"{out}: holds {held}; choose another --out")
    if (out / own[0]).exists() and not resume:
        what = f"results ({own[0]}); pass --resume to continue that run" if kind == "run" else \
            f"a grid ({own[0]}); pass --resume to continue it"
        raise RunError(f"{out}: already holds {what} or choose another --out")
    if resume and (out / stamp_file).is_file():
        old = json.loads((out / stamp_file).read_text(encoding="utf-8"))
        defaults = defaults or {}
        diff = [k for k in stamp if k not in ignore and old.get(k) != stamp[k]
                and not (k not in old and k in defaults and defaults[k] == stamp[k])]
        if diff:
            noun = "run" if kind == "run" else "grid"
            raise RunError(f"{out / stamp_file}: cannot resume, settings differ from the earlier {noun} in: "
                           f"{', '.join(diff)}")
    return out


def say_resumed(cfg, n_done: int, n_all: int, what: str) -> None:
    """On resume, say on stderr how much was already finished (unless ``cfg.progress`` is off)."""
    if n_done and cfg.progress:
        tqdm.write(f"probe-attack: resuming: {n_done} of {n_all} {what} already finished, not recomputed",
                   file=sys.stderr)
