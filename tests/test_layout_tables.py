"""The layout tables of ARCHITECTURE.md and docs/layout.md name every code file of the package, and
only files that exist: a file added, moved or removed without its line in both tables fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tokenbench"
TABLES = [ROOT / "ARCHITECTURE.md", ROOT / "docs" / "layout.md"]
_TICKED = re.compile(r"`([^`]+)`")


def _packages() -> list[Path]:
    return sorted(p for p in PKG.iterdir() if (p / "__init__.py").is_file() and not p.is_symlink())


def _rows(text: str) -> list[tuple[str, list[str]]]:
    """(place, the ``.py`` names the row's cells tick) of each table row whose place is ticked."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.split("|")
        places = _TICKED.findall(cells[1])
        names = [t for t in _TICKED.findall(line) if t.endswith(".py") and "*" not in t]
        rows.append((places[0], names))
    return rows


def named_files(text: str) -> tuple[set[Path], list[str]]:
    """The files a layout text names, and the names it ticks that are no file."""
    packages = {p.name: p for p in _packages()}
    named, missing = set(), []
    for place, names in _rows(text):
        base = place.rstrip("/")
        pkg = packages.get(base.removeprefix("tokenbench/")) if base.startswith("tokenbench/") else None
        for name in names:
            if pkg is not None and "/" not in name:
                candidates = [pkg / name, ROOT / name]
            elif base.startswith("tokenbench"):
                candidates = [PKG / name.removeprefix("tokenbench/"), ROOT / name]
            else:
                candidates = [ROOT / base / name, ROOT / name, PKG / name]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                missing.append(f"{place}: {name}")
            else:
                named.add(hit.resolve())
    return named, missing


def code_files() -> set[Path]:
    files = {p for p in PKG.glob("*.py") if p.name != "__init__.py"}
    for pkg in _packages():
        files |= {p for p in pkg.glob("*.py") if p.name != "__init__.py"}
    return {f.resolve() for f in files}


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_layout_table_names_every_code_file_and_no_other(table):
    named, missing = named_files(table.read_text())
    unnamed = sorted(str(f.relative_to(ROOT)) for f in code_files() - named)
    assert not unnamed, f"{table.name} does not name: {unnamed}"
    assert not missing, f"{table.name} names files that do not exist: {missing}"


def test_the_layout_check_sees_a_missing_and_an_extra_file():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `tokenbench/report/`"))
    without = text.replace("`write.py`", "`gone.py`")
    named, missing = named_files(without)
    assert (PKG / "report" / "write.py").resolve() not in named
    assert "tokenbench/report/: gone.py" in missing
    assert row not in without
