"""The report's plots: accuracy against GFLOPs and against throughput, with the Pareto frontier.

Colour says the method (the sweep entry's label), the marker says its family (the method's
declaration: pruning, merging, hybrid); the legend shows both.
"""

from __future__ import annotations

import math
from pathlib import Path

from .render import FIG_SIZE, PLOT_RC, family_handles, method_styles, savefig
from .report_tables import models_of, paper_setting, timing_flagged
from .rows import Row, as_row


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


def plot_layers(rows: list[Row], xcol: str) -> dict:
    """What a plot draws, decided apart from the drawing (and tested so).

    - ``curves``: per label, the runs that form the method's curve: its runs at FLOPs targets,
      or, for a label without any target (a method trained at a few settings), all its runs;
      sorted by GFLOPs;
    - ``points``: runs drawn as separate, labelled markers: the off-grid runs of a label that
      has a curve (no FLOPs target), and labels with one run (a control, such as a fine-tuned
      top-k);
    - ``dense``: the dense model's rows;
    - ``frontier``: the Pareto frontier over every run (higher accuracy; lower GFLOPs or higher
      throughput);
    - ``hollow``: ids of rows whose timing is flagged (drawn hollow on the throughput axis).
    """
    typed = [as_row(r) for r in rows]
    given = {id(t): r for t, r in zip(typed, rows)}  # the layers hold the rows as given (Rows or dicts)
    layers = _layers(typed, xcol)
    back = given.__getitem__
    return {"curves": {lab: [back(id(r)) for r in rs] for lab, rs in layers["curves"].items()},
            "points": [back(id(r)) for r in layers["points"]], "dense": [back(id(r)) for r in layers["dense"]],
            "hollow": {id(back(i)) for i in layers["hollow"]}, "frontier": layers["frontier"]}


def _layers(rows: list[Row], xcol: str) -> dict:
    pts = [r for r in rows if getattr(r, xcol) is not None and r.top1 is not None]
    dense = [r for r in pts if r.is_dense]
    curves: dict[str, list[Row]] = {}
    points: list[Row] = []
    for lab in dict.fromkeys(r.label for r in pts if not r.is_dense):
        mine = [r for r in pts if r.label == lab and not r.is_dense]
        on_grid = [r for r in mine if r.targets]
        curve = on_grid if on_grid else (mine if len(mine) > 1 else [])
        if curve:
            curves[lab] = sorted(curve, key=lambda r: (r.gflops or 0.0, getattr(r, xcol)))
        points += [r for r in mine if not any(r is c for c in curve)]
    hollow = {id(r) for r in pts if xcol == "img_per_s" and timing_flagged(r)}
    return {"curves": curves, "points": points, "dense": dense, "hollow": hollow,
            "frontier": pareto([(getattr(r, xcol), r.top1) for r in pts], xcol == "gflops")}


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
    xs = [getattr(r, xcol) for r in drawn]
    span = (max(xs) - min(xs)) or 1.0
    step = 0.008 * span
    return {lab: (i - (len(labels) - 1) / 2) * step for i, lab in enumerate(labels)}


def plot(res: dict, plots_dir: Path, save=savefig) -> list[Path]:
    """accuracy vs GFLOPs and vs throughput, per model; returns the files written.

    Curves per method, controls and off-grid runs as separate labelled markers, the Pareto
    frontier as a wide grey band behind them, 95% Wilson intervals as bars (said in the legend),
    flagged timings hollow on the throughput axis.
    """
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    disp = [r for r in map(as_row, res["display"]) if r.top1 is not None]
    written: list[Path] = []
    models = models_of(disp)
    labels = list(dict.fromkeys(r.label for r in disp if not r.is_dense))
    families = {r.label: r.family for r in disp if not r.is_dense}
    style = method_styles(labels, families)
    axes_spec = [("gflops", "accuracy_vs_gflops", "Computation (GFLOPs per image)"),
                 ("img_per_s", "accuracy_vs_throughput", "Throughput (images/s)")]
    for model in models:
        rows = [r for r in disp if r.model == model]
        for xcol, fname, xlabel in axes_spec:
            layers = plot_layers(rows, xcol)
            if not (layers["curves"] or layers["points"] or layers["dense"]):
                continue
            with sns.axes_style("whitegrid"), plt.rc_context(PLOT_RC):
                fig, ax = plt.subplots(figsize=(FIG_SIZE[0], FIG_SIZE[1] + 0.5))
                handles: list = []
                front = layers["frontier"]
                if len(front) > 1:
                    ax.step([p[0] for p in front], [p[1] for p in front], where="post" if xcol == "gflops" else "pre",
                            color="0.55", lw=4.0, alpha=0.3, solid_capstyle="round", zorder=0)
                    handles.append(Line2D([], [], color="0.55", lw=4.0, alpha=0.3, label="Pareto frontier"))
                dodge = _dodge(layers, xcol)

                def draw(r, x, color, marker, ms, zorder):
                    lo, hi = _yerr([r])
                    ax.errorbar([x], [r.top1], yerr=[lo, hi], fmt="none", ecolor=color, elinewidth=0.6,
                                capsize=1.2, alpha=0.55, zorder=zorder - 1)
                    hollow = id(r) in layers["hollow"]
                    ax.plot([x], [r.top1], ls="none", marker=marker, ms=ms, mec=color if hollow else "white",
                            mew=0.9 if hollow else 0.4, mfc="none" if hollow else color, zorder=zorder)

                for lab, lr in layers["curves"].items():
                    color, marker = style[lab]
                    xs = [getattr(r, xcol) + dodge[lab] for r in lr]
                    ax.plot(xs, [r.top1 for r in lr], color=color, lw=1.0, alpha=0.85, zorder=2)
                    for r, x in zip(lr, xs):
                        draw(r, x, color, marker, 4.0, 3)
                    handles.append(Line2D([], [], color=color, marker=marker, ms=4.0, mec="white", mew=0.4, label=lab))
                for r in layers["points"]:  # larger than a curve's markers
                    color, marker = style[r.label]
                    draw(r, getattr(r, xcol), color, marker, 6.0, 5)
                    handles.append(Line2D([], [], ls="none", color=color, marker=marker, ms=6.0, mec="white",
                                          mew=0.4, label=_point_label(r, r.label in layers["curves"])))
                for r in layers["dense"]:
                    draw(r, getattr(r, xcol), "black", "*", 8.0, 6)
                if layers["dense"]:
                    handles.append(Line2D([], [], ls="none", color="black", marker="*", ms=8.0, mec="white",
                                          mew=0.4, label="dense"))
                drawn = [r.label for rs in layers["curves"].values() for r in rs] + [r.label for r in layers["points"]]
                handles += family_handles(families[lab] for lab in dict.fromkeys(drawn))
                if layers["hollow"]:
                    handles.append(Line2D([], [], ls="none", color="0.3", marker="o", ms=4.0, mfc="none", mew=0.9,
                                          label="hollow: flagged timing"))
                ax.set_xlabel(xlabel if xcol == "gflops" else _tp_label([r for rs in layers["curves"].values()
                                                                          for r in rs] + layers["points"]
                                                                         + layers["dense"]))
                ax.set_ylabel("Top-1 accuracy (%)")
                if len(models) > 1:
                    ax.set_title(model)
                note = ERRORBAR_NOTE + ("; curves dodged slightly in x" if any(dodge.values()) else "")
                ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.27), ncol=2, frameon=False,
                          handlelength=1.8, columnspacing=1.0, title=note, title_fontsize=6, fontsize=6.5)
                fig.tight_layout()
                suffix = "" if len(models) == 1 else "_" + model.replace("/", "_")
                written += save(fig, plots_dir / f"{fname}{suffix}")
                plt.close(fig)
    return written


def _tp_label(rows) -> str:
    r = rows[0]
    dev = r.device or ""
    extra = f", {dev}" + (f" x{r.threads}" if r.threads and dev == "cpu" else "")
    if r.batch_size:
        extra += f", batch {r.batch_size}"
    return f"Throughput (images/s{extra})"


def _yerr(rows):
    lo = [max(0.0, r.top1 - r.top1_lo) if r.top1_lo is not None else 0.0 for r in rows]
    hi = [max(0.0, r.top1_hi - r.top1) if r.top1_hi is not None else 0.0 for r in rows]
    return [lo, hi]


