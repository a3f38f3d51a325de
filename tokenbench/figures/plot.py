"""A figure's plot: up to three panels, ours as lines, the published figures overlaid."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .plan import Plan
from ..report.render import PLOT_RC, method_styles, savefig
from ..report.rows import DENSE_METHOD


def _xval(row: dict, x: str) -> Optional[float]:
    if x == "target":
        return row["targets"][0] if row.get("targets") else None
    v = row["params"].get(x)
    if isinstance(v, list):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ours_once(fig: dict) -> list[dict]:
    """Our rows in the recipe, one per run (a row matching two published figures appears twice)."""
    seen_ids: set[tuple] = set()
    ours_rows = []
    for r in fig["rows"]:
        if not r["in_recipe"]:
            continue
        k = (r["label"], json.dumps(r["params"], sort_keys=True), tuple(r["targets"]), r["checkpoint"])
        if k not in seen_ids:
            seen_ids.add(k)
            ours_rows.append(r)
    return ours_rows


def plot_figure(fig: dict, base: Path) -> list[Path]:
    """Up to three panels: GFLOPs vs the recipe's x; speedup vs GFLOPs; top-1 vs GFLOPs (published overlaid)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    plan: Plan = fig["plan"]
    ours_rows = _ours_once(fig)
    pubs = [r for r in fig["rows"] + fig["extra"] if r["paper"] is not None]
    panels = [("gflops", "x")]
    if any(r["speedup"] is not None for r in ours_rows) or any(r["speedup_published"] is not None for r in pubs):
        panels.append(("speedup", "gflops"))
    if any(r["top1"] is not None for r in ours_rows) or any(r["top1_published"] is not None for r in pubs):
        panels.append(("top1", "gflops"))
    with sns.axes_style("whitegrid"), plt.rc_context(PLOT_RC):
        fig_, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 0.4, 2.6), squeeze=False)
        for ax, (ycol, xcol) in zip(axes[0], panels):
            _draw_panel(ax, ycol, xcol, plan.recipe.x, ours_rows, pubs)
        _legend(fig_, axes[0], plan.name + ("" if not plan.embedded else " (embedded Fashion-MNIST model)"))
        written = savefig(fig_, base)
        plt.close(fig_)
    return written


def _draw_panel(ax, ycol: str, xcol: str, x: str, ours_rows: list[dict], pubs: list[dict]) -> None:
    """One panel: our methods as lines, the dense model, the published points over them."""
    labels = list(dict.fromkeys(r["label"] for r in ours_rows if r["method"] != DENSE_METHOD))
    style = method_styles(labels, {r["label"]: r.get("family") for r in ours_rows})
    for lab in labels:
        color, marker = style[lab]
        pts = []
        for r in ours_rows:
            if r["label"] != lab or r[ycol] is None:
                continue
            xv = _xval(r, x) if xcol == "x" else r["gflops"]
            if xv is not None:
                pts.append((xv, r[ycol]))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ms=3.5, lw=1.0,
                    label=lab, zorder=3)
    for d in (r for r in ours_rows if r["method"] == DENSE_METHOD):
        if d[ycol] is None:
            continue
        if xcol == "x":
            ax.axhline(d[ycol], color="black", ls=":", lw=0.8, label="dense", zorder=2)
        else:
            ax.plot([d["gflops"]], [d[ycol]], marker="*", color="black", ms=8, ls="none", label="dense", zorder=4)
    _draw_published(ax, ycol, xcol, x, pubs)
    xlabel_1 = "FLOPs target (fraction of dense)" if x == "target" else x  # a method parameter's name
    ax.set_xlabel(xlabel_1 if xcol == "x" else "GFLOPs per image")
    ax.set_ylabel({"gflops": "GFLOPs per image", "speedup": "Speedup over dense", "top1": "Top-1 accuracy (%)"}[ycol])
    if ycol == "top1" and not any(r["top1"] is not None for r in ours_rows):
        ax.set_title("top-1: published only (ours not measured)")
    if ycol == "speedup" and not any(r["speedup"] is not None for r in ours_rows):
        ax.set_title("speedup: published only (ours not measured)")


def _draw_published(ax, ycol: str, xcol: str, x: str, pubs: list[dict]) -> None:
    """The published points, hollow, one marker per paper (on a GFLOPs axis at the published GFLOPs)."""
    papers = list(dict.fromkeys(r["paper"] for r in pubs))
    pub_marker = {p: m for p, m in zip(papers, ["X", "P", "d", "*", "h"])}
    ycol_pub = {"gflops": "gflops_published", "speedup": "speedup_published", "top1": "top1_published"}[ycol]
    for r in pubs:
        yv = r[ycol_pub]
        gflops = r["gflops_published"] if r["gflops_published"] is not None else r["gflops"]
        xv = _xval(r, x) if xcol == "x" else gflops
        if yv is None or xv is None:
            continue
        lab = "published" if len(papers) == 1 else f"published ({r['paper']})"
        ax.plot([xv], [yv], marker=pub_marker.get(r["paper"], "X"), ms=6, ls="none", mfc="none",
                mec="black", mew=0.9, label=lab, zorder=5)


def _legend(fig_, axes, title: str) -> None:
    """One legend below the panels (each label once) and the title above."""
    handles, labs = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labs:
                handles.append(h)
                labs.append(l)
    fig_.suptitle(title, fontsize=8)
    ncol = min(6, len(labs))
    rows_ = math.ceil(len(labs) / ncol) if labs else 0
    fig_.legend(handles, labs, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False,
                handlelength=1.8, columnspacing=1.0)
    fig_.tight_layout(rect=(0, 0.035 + 0.055 * rows_, 1, 1))
