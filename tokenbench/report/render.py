"""How every reporting path writes a number, a setting and a table: one renderer.

``tokenbench report`` (:mod:`tokenbench.report`), the paper figures (:mod:`tokenbench.figures`),
``tokenbench analyze``'s tables (:mod:`tokenbench.analysis.tables`) and ``bench.py`` format through
these functions, so that one row reads the same in all of them:
cell texts (numbers, parameters, schedules, intervals, speedups), Markdown / CSV / LaTeX tables,
and the style of the plots (sizes, fonts, colour per method, marker per family).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

NONE = "–"  # an empty cell


# --------------------------------------------------------------------------- cells

def fmt_value(v: Any) -> str:
    """A parameter value, short: schedules run-length encoded (``[5x3,4x9]``)."""
    if isinstance(v, (list, tuple)):
        parts, i = [], 0
        while i < len(v):
            j = i
            while j < len(v) and v[j] == v[i]:
                j += 1
            parts.append(f"{v[i]}x{j - i}" if j - i > 1 else f"{v[i]}")
            i = j
        return "[" + ",".join(parts) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def num(x: Optional[float], spec: str, none: str = NONE) -> str:
    """``x`` formatted by ``spec``, or the empty cell."""
    return none if x is None else format(x, spec)


def sig(x: Optional[float], n: int = 3) -> str:
    """``x`` to ``n`` significant digits (GFLOPs in the report's tables)."""
    if x is None:
        return NONE
    if x == 0:
        return "0"
    digits = max(0, n - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def signed(x: Optional[float], spec: str) -> str:
    """A difference with its sign always written (a true minus sign)."""
    return NONE if x is None else ("+" if x >= 0 else "−") + format(abs(x), spec)


def params_text(params: dict, n_seeds: Optional[int] = None) -> str:
    """``k=v, k=v`` (and ``N seeds`` for a row averaged over seeds), or the empty cell."""
    s = ", ".join(f"{k}={fmt_value(v)}" for k, v in params.items())
    if n_seeds:
        s += (", " if s else "") + f"{n_seeds} seeds"
    return s or NONE


def params_json(params: dict, compact: bool = False) -> str:
    """Parameters as JSON: sorted keys for the report's CSV, compact as given for bench.py's."""
    return json.dumps(params, separators=(",", ":")) if compact else json.dumps(params, sort_keys=True)


def tokens_text(tokens: Optional[list]) -> str:
    """Tokens per block as a compact schedule (``[197x3,...]``)."""
    if not tokens:
        return NONE
    return fmt_value([int(round(t)) if abs(t - round(t)) < 1e-6 else round(t, 1) for t in tokens])


def quartiles_text(q1: float, q3: float) -> str:
    """An interquartile range, ``[q1, q3]``, to two decimals."""
    return f"[{q1:.2f}, {q3:.2f}]"


def interval_text(lo: Optional[float], hi: Optional[float]) -> str:
    """A 95% interval appended to a value: `` [lo, hi]`` to one decimal (empty without one)."""
    return "" if lo is None else f" [{lo:.1f}, {hi:.1f}]"


def speedup_text(speedup: Optional[float], q1: Optional[float] = None, q3: Optional[float] = None,
                 dense: bool = False, x: str = "x") -> str:
    """A paired speedup with its quartiles over rounds (the dense row's is 1 by definition)."""
    if speedup is None:
        return NONE
    out = f"{speedup:.2f}{x}"
    if q1 is not None and not dense:
        out += " " + quartiles_text(q1, q3)
    return out


def p_value_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


# --------------------------------------------------------------------------- tables

def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines (``|`` inside a cell escaped)."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for cells in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def latex_table(columns: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    """A booktabs LaTeX tabular's lines, headers and cells escaped; ``align``: a letter per column."""
    out = ["\\begin{tabular}{" + align + "}", "\\toprule", " & ".join(tex_escape(c) for c in columns) + " \\\\",
           "\\midrule"]
    for cells in rows:
        out.append(" & ".join(tex_escape(c) for c in cells) + " \\\\")
    return out + ["\\bottomrule", "\\end{tabular}"]


def tex_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "&%#_{}$":
            out.append("\\" + ch)
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch == "–":
            out.append("--")
        elif ch == "±":
            out.append(r"$\pm$")
        else:
            out.append(ch)
    return "".join(out)


def csv_cell(v: Any) -> Any:
    """A CSV cell: floats exactly (``repr``), None empty."""
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else v


def csv_table(columns: Sequence[str], rows: Iterable[Any], cell: Callable[[Any, str], Any]) -> str:
    """CSV text with ``columns``; ``cell(row, column)`` gives each value before :func:`csv_cell`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(cell(r, k)) for k in columns})
    return buf.getvalue()


# --------------------------------------------------------------------------- plots

PLOT_RC = {"font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
           "legend.fontsize": 7, "lines.linewidth": 1.0, "lines.markersize": 4, "axes.linewidth": 0.6,
           "grid.linewidth": 0.4, "pdf.fonttype": 42, "ps.fonttype": 42}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
FIG_SIZE = (3.4, 2.5)
# a method's marker says its family (the registry's declaration); its colour says the method
FAMILY_MARKERS = {"pruning": "o", "merging": "s", "hybrid": "D", "baseline": "X", "none": "*"}
OTHER_FAMILY_MARKER = "^"  # a method whose family is unknown (a record of a method not installed here)


def family_marker(family: Optional[str]) -> str:
    return FAMILY_MARKERS.get(family or "", OTHER_FAMILY_MARKER)


def method_styles(labels: Sequence[str], families: dict[str, Optional[str]]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per label: seaborn's colour-blind palette in order (then its dark one), the
    marker of the label's family."""
    import seaborn as sns

    palette = sns.color_palette("colorblind", max(1, len(labels)))
    if len(labels) > 10:  # the palette's ten colours, then ten darker ones: no two methods share a colour
        palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    return {lab: (palette[i % len(palette)], family_marker(families.get(lab))) for i, lab in enumerate(labels)}


def family_handles(families: Iterable[Optional[str]]) -> list:
    """Legend entries explaining the markers: one grey marker per family drawn."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], ls="none", color="0.35", marker=family_marker(f), ms=4.0, mec="white", mew=0.4,
                   label=f"{f or 'other'} (family)") for f in dict.fromkeys(families)]


def savefig(fig, base: Path) -> list[Path]:
    """``base``.png and .pdf, written atomically and without a creation date (same input, same files)."""
    out = []
    base.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        p = base.with_suffix(f".{ext}")
        tmp = p.with_name(f".{p.name}.tmp.{ext}")
        meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(tmp, dpi=300, bbox_inches="tight", pad_inches=0.02, format=ext, metadata=meta)
        os.replace(tmp, p)
        out.append(p)
    return out
