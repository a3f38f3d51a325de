"""Tables and plots from stored records; never measures.  The report's entry point.

``write_report(out)`` reads the records under ``<out>/records/`` (damaged ones are set
aside by the store, with a warning) and the sweep's plan ``<out>/sweep.json`` when there
is one (which runs, labels, FLOPs targets), and writes:

- ``results.md``, ``results.csv``, ``results.tex`` (and ``results_paper.tex``, a compact
  table for one paper column: method, setting, GFLOPs, speedup, top-1 ± CI): one row per run, with method,
  parameters, GFLOPs and FLOPs relative to the dense model, throughput (median and
  quartiles) and speedup over dense on the same device and settings, top-1 with its 95%
  (Wilson) interval, top-5, parameters, device, status of learned parts, McNemar's exact
  test against dense on the same images (p and discordant counts) and flags.  A
  non-deterministic method measured with several seeds gets one row with mean ± std
  over the seeds; the CSV keeps the per-seed rows too (``row_type`` seed / mean / run);
- ``plots/accuracy_vs_gflops.{png,pdf}`` and ``plots/accuracy_vs_throughput.{png,pdf}``
  (one pair per model when a sweep has several): one line per method, dense marked, the
  Pareto frontier over all methods, 95% intervals as bars; 3.4 in wide, 8 pt fonts,
  seaborn's colour-blind palette;
- ``report.html`` (with ``html``; every sweep writes it): the same plots to explore, with hover,
  a family filter and a sortable table, in one self-contained page (:mod:`tokenbench.report_html`).

Without a plan (records written by ``tokenbench eval --results DIR``, say) every record
in the directory is reported: runs are grouped by model, method and parameters, and the
most common throughput and accuracy settings are used.

The work is split by job: :mod:`tokenbench.report_collect` (rows from the store),
:mod:`tokenbench.rows` (the typed row), :mod:`tokenbench.report_stats` (against dense, over
seeds, paired tests), :mod:`tokenbench.report_tables` and :mod:`tokenbench.report_plot` (the
outputs) and :mod:`tokenbench.render` (cells, tables and plot style shared with the paper
figures and bench.py).  The names other modules import from here stay importable.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError
from .render import FIG_SIZE, MARKERS, PLOT_RC  # noqa: F401  (re-exported)
from .render import num as _f  # noqa: F401
from .render import savefig as _savefig  # noqa: F401
from .render import sig as _sig  # noqa: F401
from .render import tex_escape as _tex_escape  # noqa: F401
from .report_collect import collect  # noqa: F401
from .report_plot import ERRORBAR_NOTE, pareto, plot_layers  # noqa: F401
from .report_plot import plot as _plot
from .report_paired import paired  # noqa: F401
from .report_stats import _parse_selector, _select, closing_notes, params_text  # noqa: F401
from .report_tables import (CSV_COLUMNS, FLAG_HELP, SUMMARY_COLUMNS, TIMING_FLAGS, csv_text,  # noqa: F401
                            display_cells, latex, latex_paper, markdown, summary_table)
from .rows import learned_status as _learned  # noqa: F401

TABLE_FILES = ("results.md", "results.csv", "results.tex", "results_paper.tex")


def plot(res: dict, plots_dir: Path) -> list[Path]:
    """The report's plots (:func:`tokenbench.report_plot.plot`), saved through this module's ``_savefig``."""
    return _plot(res, plots_dir, save=_savefig)


def ensure_report_writable(out: str | os.PathLike, plots: bool = True) -> None:
    """Refuse, before measuring or reading anything, an ``out`` the tables or plots could not be written to."""
    from .store import ensure_writable_dir

    out = Path(out)
    ensure_writable_dir(out, "output directory")
    for name in TABLE_FILES:
        if (out / name).is_dir():
            raise UserError(f"cannot write {out / name}: it is a directory")
    if plots:
        ensure_writable_dir(out / "plots", "plots directory")


def write_report(out: str | os.PathLike, plots: bool = True, html: bool | str = False) -> dict:
    """Write the tables and plots of ``out`` from its records (and ``report.html`` with ``html``;
    ``html="if-available"``: only where plotly is installed, else a note says so); returns the rows
    and paths."""
    from .store import atomic_write_text

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"results directory {out} does not exist")
    ensure_report_writable(out, plots)
    res = collect(out)
    files = []
    for name, fn in (("results.md", markdown), ("results.csv", csv_text), ("results.tex", latex),
                     ("results_paper.tex", latex_paper)):
        p = out / name
        try:
            atomic_write_text(p, fn(res))
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror}") from None
        files.append(p)
    if plots:
        files += plot(res, out / "plots")
    if html:
        from .report_html import plotly_available, write_html

        if html == "if-available" and not plotly_available():
            res["notes"].append("report.html not written: it needs plotly (pip install plotly)")
        else:
            files.append(write_html(res))
    res["files"] = files
    return res


