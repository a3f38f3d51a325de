"""Where commands write by default: under ``runs/`` (git-ignored), never into the committed
reference folders under ``results/`` unless the user names one with ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

RUNS = Path("runs")
REFERENCE = Path("results")


def under_reference(path: str | Path) -> Optional[Path]:
    """``path`` relative to a ``results/`` folder holding it (the current directory's, or the
    checkout's beside the package), or None when it is outside both."""
    p = Path(path).resolve()
    roots = {(Path.cwd() / REFERENCE).resolve(), (Path(__file__).resolve().parent.parent / REFERENCE).resolve()}
    for root in roots:
        try:
            return p.relative_to(root)
        except ValueError:
            continue
    return None


def repository_relative(path: str | Path) -> str:
    """``path`` relative to the checkout holding the package when it lies inside it (records
    copied to another machine then name the same file), else as given."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "pyproject.toml").is_file():
        return str(path)
    try:
        return Path(path).resolve().relative_to(repo).as_posix()
    except ValueError:
        return str(path)


def analysis_dirs(directory: Path, dest: Optional[Path]) -> tuple[Path, Path]:
    """(where ``analyze`` writes, where it caches re-runs) for the sweep in ``directory``.

    A sweep of one's own keeps both in ``DIRECTORY/analysis``; a committed reference sweep keeps
    them in ``runs/analysis/<its path under results>`` (``--out`` still writes anywhere)."""
    ref = under_reference(directory)
    home = RUNS / "analysis" / ref if ref is not None else Path(directory) / "analysis"
    return (Path(dest) if dest is not None else home), home / "cache"
