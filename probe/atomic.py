"""Atomic file writes: a reader (or an interrupted run) sees the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path.

    Parent directories are created. The text goes to a temporary file next to ``path``, is
    flushed and fsync-ed, gets normal permissions (``0666 & ~umask``; ``mkstemp`` creates 0600) and
    is moved into place with :func:`os.replace`; on any error the temporary file is removed and an
    existing file at ``path`` is left untouched.
    """
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def save_torch_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_text_atomic`)."""
    import torch

    return write_atomic(path, lambda fh: torch.save(obj, fh))


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, fsync it and move it into
    place with :func:`os.replace` (the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
