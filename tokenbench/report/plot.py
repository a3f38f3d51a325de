"""The report's plots: accuracy against GFLOPs and against the paired speedup over the dense
model, with the Pareto frontier.

Colour says the method (the sweep entry's label), the marker says its family (the method's
declaration: pruning, merging, hybrid, baseline); the legend, below the axes in columns, shows
both.  Baselines (the ``baseline`` family, and the sweep's dense models of other sizes) are
dashed lines.
A run without a paired speedup is placed at its standalone img/s over the dense model's, drawn
hollow and kept off the frontier (the two were not timed together).
"""

from __future__ import annotations

import math
from pathlib import Path

from .render import FIG_SIZE, PLOT_RC, family_handles, method_styles, savefig
from .tables import models_of, paper_setting, timing_flagged
from .rows import Row


def pareto(points: list[tuple[float, float]], lower_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (higher accuracy; lower or higher x), sorted by x."""
    pts = sorted(points, key=lambda p: (p[0], -p[1]) if lower_x_better else (-p[0], -p[1]))
    front, best = [], -math.inf
    for x, y in pts:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


ERRORBAR_NOTE = "error bars: 95% Wilson interval of top-1"
DENSE_ERRORBAR_NOTE = "error bars: 95% bootstrap interval of mIoU"
# baselines (the resolution and pooling baselines, dense models of other sizes) are drawn dashed
BASELINE_LINESTYLE = "--"


def plot_layers(rows: list[Row], xcol: str) -> dict:
    """What a plot draws, decided apart from the drawing (and tested so).

    - ``curves``: per label, the runs that form the method's curve: its runs at FLOPs targets,
      or, for a label without any target (a method trained at a few settings), all its runs;
      sorted by GFLOPs;
    - ``points``: runs drawn as separate, labelled markers: the off-grid runs of a label that
      has a curve (no FLOPs target), and labels with one run (a control, such as a fine-tuned
      top-k);
    - ``dense``: the dense model's rows;
    - ``line``: the sweep's dense models of other sizes (``dense_family``) with this model's dense
      rows, sorted along x: "use a smaller model" drawn as a line;
    - ``frontier``: the Pareto frontier over every run (higher accuracy; lower GFLOPs or higher
      throughput), unpaired runs left out;
    - ``hollow``: ids of rows whose timing is flagged or unpaired (drawn hollow on a timing axis);
    - ``unpaired``: ids of rows placed by img/s over the dense model's (``speedup`` axis only);
    - ``x``: the x of each row by id.
    """
    return _layers(rows, xcol)


def x_values(rows: list[Row], xcol: str) -> tuple[dict[int, float], set[int]]:
    """(x per row id, ids placed without a paired timing).  On the ``speedup`` axis the dense
    model sits at 1, a run at its paired speedup, and a run without one at its img/s over the
    dense model's (unpaired)."""
    if xcol != "speedup":
        return {id(r): getattr(r, xcol) for r in rows if getattr(r, xcol) is not None}, set()
    dense_tp = next((r.img_per_s for r in rows if r.is_dense and not r.line_of and r.img_per_s), None)
    xs, unpaired = {}, set()
    for r in rows:
        if r.is_dense and not r.line_of and (r.img_per_s is not None or r.speedup is not None):
            xs[id(r)] = 1.0
        elif r.speedup is not None:
            xs[id(r)] = r.speedup
        elif r.img_per_s is not None and dense_tp:
            xs[id(r)] = r.img_per_s / dense_tp
            unpaired.add(id(r))
    return xs, unpaired


def _layers(rows: list[Row], xcol: str) -> dict:
    xv, unpaired = x_values(rows, xcol)
    pts = [r for r in rows if id(r) in xv and r.score is not None]
    dense = [r for r in pts if r.is_dense and not r.line_of]
    others = [r for r in pts if r.line_of]  # dense models of other sizes: one line with this model's dense
    line = sorted(dense + others, key=lambda r: xv[id(r)]) if others else []
    curves: dict[str, list[Row]] = {}
    points: list[Row] = []
    for lab in dict.fromkeys(r.label for r in pts if not r.is_dense):
        mine = [r for r in pts if r.label == lab and not r.is_dense]
        on_grid = [r for r in mine if r.targets]
        curve = on_grid if on_grid else (mine if len(mine) > 1 else [])
        if curve:
            curves[lab] = sorted(curve, key=lambda r: (r.gflops or 0.0, xv[id(r)]))
        points += [r for r in mine if not any(r is c for c in curve)]
    timed = xcol in ("img_per_s", "speedup")
    hollow = {id(r) for r in pts if timed and timing_flagged(r)} | unpaired
    return {"curves": curves, "points": points, "dense": dense, "line": line, "hollow": hollow, "unpaired": unpaired,
            "x": {id(r): xv[id(r)] for r in pts},
            "frontier": pareto([(xv[id(r)], r.score) for r in pts if id(r) not in unpaired], xcol == "gflops")}


def _point_label(r: Row, has_curve: bool) -> str:
    """A separate marker's legend entry: its label, and for an off-grid run of a curve, its setting."""
    if not has_curve:
        return r.label
    setting = paper_setting(r).split(", ")
    return f"{r.label} {setting[0]}, off-grid"


def _dodge(layers: dict, xcol: str) -> dict[str, float]:
    """A small horizontal offset per curve on the GFLOPs axis, where matched FLOPs stack every
    method at the same x (a fraction of the axis range; said in the legend)."""
    labels = list(layers["curves"])
    if xcol != "gflops" or len(labels) < 2:
        return {lab: 0.0 for lab in labels}
    drawn = [r for rs in layers["curves"].values() for r in rs] + layers["dense"]
    xs = [layers["x"][id(r)] for r in drawn]
    span = (max(xs) - min(xs)) or 1.0
    step = 0.008 * span
    return {lab: (i - (len(labels) - 1) / 2) * step for i, lab in enumerate(labels)}


LEGEND_COLUMNS = 3
MIN_Y_TICKS = 4


def plot(res: dict, plots_dir: Path, save=savefig) -> list[Path]:
    """accuracy vs GFLOPs and vs the paired speedup, per model; returns the files written.

    Curves per method, controls and off-grid runs as separate labelled markers, the Pareto
    frontier as a wide grey band behind them, 95% Wilson intervals as bars (said in the legend),
    flagged or unpaired timings hollow on the speedup axis.  The legend sits below the figure in
    columns, so the axes keep the figure's whole height whatever the number of methods.
    """
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disp = [r for r in res["display"] if r.score is not None]
    written: list[Path] = []
    models = models_of([r for r in disp if not r.line_of])
    labels = list(dict.fromkeys(r.label for r in disp if not r.is_dense))
    families = {r.label: r.family for r in disp if not r.is_dense}
    style = method_styles(labels, families)
    dense_task = any(r.is_seg for r in disp)  # mIoU on y; GFLOPs of backbone and decoder together
    what = "miou" if dense_task else "accuracy"
    axes_spec = [("gflops", f"{what}_vs_gflops", "Computation (GFLOPs per image" +
                  (", backbone + decoder)" if dense_task else ")")),
                 ("speedup", f"{what}_vs_throughput", "Speedup over dense")]
    for model in models:
        rows = [r for r in disp if r.model == model or r.line_of == model]
        for xcol, fname, xlabel in axes_spec:
            layers = plot_layers(rows, xcol)
            if not (layers["curves"] or layers["points"] or layers["dense"] or layers["line"]):
                continue
            untimed = sum(1 for r in rows if "untimed" in r.flags) if xcol != "gflops" else 0
            fig = _axis_figure(layers, xcol, xlabel, model if len(models) > 1 else None, style, families, untimed)
            suffix = "" if len(models) == 1 else "_" + model.replace("/", "_")
            written += save(fig, plots_dir / f"{fname}{suffix}")
            plt.close(fig)
    return written


def _axis_figure(layers: dict, xcol: str, xlabel: str, title, style: dict, families: dict, untimed: int = 0):
    """One plot: the frontier, the layers' markers and lines, the axes' labels and the legend below
    (which says how many settings were left untimed)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    with sns.axes_style("whitegrid"), plt.rc_context(PLOT_RC):
        fig, ax = plt.subplots(figsize=FIG_SIZE)
        dodge = _dodge(layers, xcol)
        handles = _draw_frontier(ax, layers["frontier"], xcol)
        handles += _draw_layers(ax, layers, dodge, style, families)
        handles += _hollow_handles(layers)
        timed = [r for rs in layers["curves"].values() for r in rs] + layers["points"] + layers["dense"]
        ax.set_xlabel(xlabel if xcol == "gflops" else _tp_label(timed))
        seg = any(r.is_seg for r in timed)  # mIoU on a dense task
        ax.set_ylabel("mIoU (%)" if seg else "Top-1 accuracy (%)")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10], min_n_ticks=MIN_Y_TICKS))
        if title:
            ax.set_title(title)
        note = (DENSE_ERRORBAR_NOTE if seg else ERRORBAR_NOTE) + (
            "; curves dodged slightly in x" if any(dodge.values()) else "")
        if untimed:
            note += f"; {untimed} setting(s) not timed on this CPU, not drawn"
        fig.tight_layout()
        # below the figure's own area (x label included): the saved image grows to hold it
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=LEGEND_COLUMNS,
                   frameon=False, handlelength=1.5, columnspacing=0.8, handletextpad=0.4,
                   title=note, title_fontsize=5.5, fontsize=5.5)
    return fig


def _draw_frontier(ax, front: list, xcol: str) -> list:
    """The Pareto frontier as a wide grey band behind everything; its legend handle."""
    from matplotlib.lines import Line2D

    if len(front) <= 1:
        return []
    ax.step([p[0] for p in front], [p[1] for p in front], where="post" if xcol == "gflops" else "pre",
            color="0.55", lw=4.0, alpha=0.3, solid_capstyle="round", zorder=0)
    return [Line2D([], [], color="0.55", lw=4.0, alpha=0.3, label="Pareto frontier")]


def _draw_layers(ax, layers: dict, dodge: dict, style: dict, families: dict) -> list:
    """Each method's curve, the separate points, the dense models of other sizes and the dense
    model, with their interval bars; their legend handles (families included)."""
    from matplotlib.lines import Line2D

    xv = layers["x"]
    handles: list = []

    def draw(r, x, color, marker, ms, zorder):
        lo, hi = _yerr([r])
        ax.errorbar([x], [r.score], yerr=[lo, hi], fmt="none", ecolor=color, elinewidth=0.6,
                    capsize=1.2, alpha=0.55, zorder=zorder - 1)
        hollow = id(r) in layers["hollow"]
        ax.plot([x], [r.score], ls="none", marker=marker, ms=ms, mec=color if hollow else "white",
                mew=0.9 if hollow else 0.4, mfc="none" if hollow else color, zorder=zorder)

    for lab, lr in layers["curves"].items():
        color, marker = style[lab]
        xs = [xv[id(r)] + dodge[lab] for r in lr]
        ls = BASELINE_LINESTYLE if families.get(lab) == "baseline" else "-"
        ax.plot(xs, [r.score for r in lr], color=color, lw=1.0, ls=ls, alpha=0.85, zorder=2)
        for r, x in zip(lr, xs):
            draw(r, x, color, marker, 4.0, 3)
        handles.append(Line2D([], [], color=color, marker=marker, ms=4.0, mec="white", mew=0.4, label=lab))
    for r in layers["points"]:  # larger than a curve's markers
        color, marker = style[r.label]
        draw(r, xv[id(r)], color, marker, 6.0, 5)
        handles.append(Line2D([], [], ls="none", color=color, marker=marker, ms=6.0, mec="white",
                              mew=0.4, label=_point_label(r, r.label in layers["curves"])))
    if layers["line"]:
        lr = layers["line"]
        ax.plot([xv[id(r)] for r in lr], [r.score for r in lr], color="black", lw=1.0,
                ls=BASELINE_LINESTYLE, alpha=0.7, zorder=2)
        for r in lr:
            if r.line_of:
                draw(r, xv[id(r)], "black", "P", 5.0, 6)
                ax.annotate(r.model, (xv[id(r)], r.score), textcoords="offset points", xytext=(3, -8),
                            fontsize=5.5, color="0.25")
        handles.append(Line2D([], [], color="black", ls=BASELINE_LINESTYLE, marker="P", ms=5.0,
                              mec="white", mew=0.4, label="dense models of other sizes"))
    for r in layers["dense"]:
        draw(r, xv[id(r)], "black", "*", 8.0, 6)
    if layers["dense"]:
        handles.append(Line2D([], [], ls="none", color="black", marker="*", ms=8.0, mec="white",
                              mew=0.4, label="dense"))
    drawn = [r.label for rs in layers["curves"].values() for r in rs] + [r.label for r in layers["points"]]
    return handles + family_handles(families[lab] for lab in dict.fromkeys(drawn))


def _hollow_handles(layers: dict) -> list:
    """What a hollow marker means, where the plot has one."""
    from matplotlib.lines import Line2D

    handles = []
    if layers["hollow"] - layers["unpaired"]:
        handles.append(Line2D([], [], ls="none", color="0.3", marker="o", ms=4.0, mfc="none", mew=0.9,
                              label="hollow: flagged timing"))
    if layers["unpaired"]:
        handles.append(Line2D([], [], ls="none", color="0.3", marker="o", ms=4.0, mfc="none", mew=0.9,
                              label="hollow: no paired timing (img/s ratio, off the frontier)"))
    return handles


def _tp_label(rows) -> str:
    r = rows[0]
    dev = r.device or ""
    extra = f", {dev}" + (f" x{r.threads}" if r.threads and dev == "cpu" else "")
    if r.batch_size:
        extra += f", batch {r.batch_size}"
    return f"Speedup over dense (paired{extra})"


def _yerr(rows):
    lo = [max(0.0, r.score - r.score_lo) if r.score_lo is not None else 0.0 for r in rows]
    hi = [max(0.0, r.score_hi - r.score) if r.score_hi is not None else 0.0 for r in rows]
    return [lo, hi]


