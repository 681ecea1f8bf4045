"""Errors raised by probe-attack for bad input.

Every error meant for a user carries enough context for a one-line message: the file, the line
and the field where the problem is. The CLI prints ``str(error)`` and exits non-zero without a
traceback.
"""

from __future__ import annotations


class ProbeAttackError(Exception):
    """Base class of every user-facing probe-attack error."""


class InputError(ProbeAttackError, ValueError):
    """Bad input data: a facts file, a field, a prompt.

    Args:
        message: what is wrong.
        file: the file the problem is in (optional).
        line: 1-based line number (optional).
        field: the field name (optional).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.message = file, line, field, message
        where = ""
        if file is not None:
            where = str(file)
            if line is not None:
                where += f":{line}"
        if field is not None:
            where = f"{where} field {field!r}" if where else f"field {field!r}"
        super().__init__(f"{where}: {message}" if where else message)


class ModelLoadError(ProbeAttackError):
    """A model could not be located or loaded (missing path, not cached locally, bad GGUF)."""


class PromptTooLongError(InputError):
    """A prompt has more tokens than the model's context window."""
