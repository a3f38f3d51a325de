"""User-facing errors.

Anything raised as :class:`UserError` is the user's input being wrong (an unknown
model, a bad parameter, a missing file).  The CLI prints its message on one line and
exits with code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """An error in what the user asked for, reported as one line, exit code 2."""

    exit_code = 2


def user_message(e: UserError) -> str:
    """A user error as one line; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the error itself."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return "invalid input"
    if lines[0].startswith("Caught ") and len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("UserError") else last
    return lines[0]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix with the closest names, or ''."""
    choices = list(choices)
    name = str(name)
    same_letters = [c for c in choices if c.lower() == name.lower()]  # TOME -> tome
    prefixed = sorted((c for c in choices if c.startswith(name)), key=len)
    close = same_letters[:1] or prefixed[:3] or difflib.get_close_matches(name, choices, n=3, cutoff=0.5) or \
        difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def cannot_write(path, e: OSError) -> str:
    """Why ``path`` could not be written, in words: a folder on its way that is a file is named
    (the system says only 'File exists' or 'Not a directory')."""
    from pathlib import Path

    for parent in Path(path).parents:
        if parent.is_file():
            return f"cannot write {path}: {parent} is a file, not a directory"
    return f"cannot write {path}: {e.strerror or e}"
