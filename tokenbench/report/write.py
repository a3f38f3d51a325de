"""The report's entry point: tables and plots (and ``report.html``) written from a results
directory's records; never measures.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .collect import collect
from .plot import plot
from .tables import csv_text, latex, latex_paper, markdown

TABLE_FILES = ("results.md", "results.csv", "results.tex", "results_paper.tex")


def ensure_report_writable(out: str | os.PathLike, plots: bool = True) -> None:
    """Refuse, before measuring or reading anything, an ``out`` the tables or plots could not be written to."""
    from ..store import ensure_writable_dir

    out = Path(out)
    ensure_writable_dir(out, "output directory")
    for name in TABLE_FILES:
        if (out / name).is_dir():
            raise UserError(f"cannot write {out / name}: it is a directory")
    if plots:
        ensure_writable_dir(out / "plots", "plots directory")


def check_results_dir(path: str | os.PathLike) -> Path:
    """``path`` as a Path, refused in one line where it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"results directory {path} "
                        + ("is a file, not a directory" if path.exists() else "does not exist"))
    return path


def write_report(out: str | os.PathLike, plots: bool = True, html: bool | str = False) -> dict:
    """Write the tables and plots of ``out`` from its records (and ``report.html`` with ``html``;
    ``html="if-available"``: only where plotly is installed, else a note says so); returns the rows
    and paths."""
    from ..store import write_texts

    out = check_results_dir(out)
    ensure_report_writable(out, plots)
    res = collect(out)
    files = write_texts({out / "results.md": markdown(res), out / "results.csv": csv_text(res),
                         out / "results.tex": latex(res), out / "results_paper.tex": latex_paper(res)})
    if plots:
        files += plot(res, out / "plots")
    if html:
        from .html import plotly_available, write_html

        if html == "if-available" and not plotly_available():
            res["notes"].append("report.html not written: it needs plotly (pip install plotly)")
        else:
            files.append(write_html(res))
    res["files"] = files
    return res


