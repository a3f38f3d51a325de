"""Figures of ``tokenbench analyze``: seaborn, 3.4 in wide, 8 pt text, colour-blind palette, PNG and PDF.

Every function takes what :mod:`tokenbench.analysis.tables` computed and returns the files it
wrote; none computes an analysis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..report.render import MARKERS, PLOT_RC, savefig
from .metrics import cohen_kappa

WIDTH = 3.4
HEATMAP = "viridis"        # sequential, readable in grey and by colour-blind readers
DIVERGING = "vlag"         # blue-white-red around 0


def _plt():
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def _style():
    plt, sns = _plt()
    rc = dict(PLOT_RC)
    rc.update({"xtick.labelsize": 6.5, "ytick.labelsize": 6.5})
    return sns.axes_style("white"), plt.rc_context(rc)


def _save(fig, base: Path) -> list[Path]:
    plt, _ = _plt()
    try:
        return savefig(fig, base)
    finally:
        plt.close(fig)


def _level_name(level) -> str:
    return f"{100 * level:.0f}" if level is not None else "dense"


def _short(v: float) -> str:
    """0.47 -> .47, -0.05 -> -.05, 1.00 -> 1: two digits in a small cell."""
    if v != v:
        return ""
    t = f"{v:.2f}"
    if t in ("1.00", "-1.00"):
        return t[:-3]
    return t.replace("0.", ".", 1)


def _heat(ax, mat, names, vmin=0.0, vmax=1.0, cmap=HEATMAP, annot_size=5.5, cbar_ax=None, xlabels=True,
          ylabels=True):
    plt, sns = _plt()
    mat = np.asarray(mat, dtype=float)
    annot = np.vectorize(_short)(mat)
    sns.heatmap(mat, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=annot, fmt="",
                annot_kws={"size": annot_size}, square=True, cbar=cbar_ax is not None, cbar_ax=cbar_ax,
                xticklabels=names if xlabels else False, yticklabels=names if ylabels else False,
                linewidths=0.3, linecolor="white")
    ax.tick_params(length=0, pad=1)
    if xlabels:
        ax.set_xticklabels(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    if ylabels:
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)


# --------------------------------------------------------------------------- reduction patterns

def pattern_heatmaps(mats: dict, blocks: Sequence[int], pdir: Path) -> list[Path]:
    """One figure per FLOPs level: a heatmap per stage (after each comparison block) of the
    chance-corrected IoU, (IoU - chance) / (1 - chance): white is what random choices of the same
    sizes reach.  A setting whose IoU says nothing at any stage (it covers every patch) has no row."""
    plt, _ = _plt()
    files = []
    levels = sorted({lv for lv, _ in mats})
    for lv in levels:
        names = mats[(lv, blocks[0])][0]
        shown = [i for i in range(len(names))
                 if any(not np.isnan(mats[(lv, blk)][1][i]).all() for blk in blocks)]
        names = [names[i] for i in shown]
        if len(names) < 2:
            continue
        ncols = min(2, len(blocks))
        nrows = math.ceil(len(blocks) / ncols)
        style, rc = _style()
        with style, rc:
            side = 1.25
            fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, nrows * side + 0.75), squeeze=False)
            cax = fig.add_axes((0.9, 0.25, 0.025, 0.55))
            for i, blk in enumerate(blocks):
                ax = axes[i // ncols, i % ncols]
                mat = np.asarray(mats[(lv, blk)][1])[np.ix_(shown, shown)]
                _heat(ax, mat, names, vmin=-1.0, vmax=1.0, cmap=DIVERGING, cbar_ax=cax if i == 0 else None,
                      xlabels=i // ncols == nrows - 1, ylabels=i % ncols == 0)
                ax.set_title(f"after block {blk}", pad=2)
            for j in range(len(blocks), nrows * ncols):
                axes[j // ncols, j % ncols].axis("off")
            cax.set_ylabel("IoU above chance (0: random)", fontsize=7)
            cax.tick_params(labelsize=6)
            fig.suptitle(f"Reduction-pattern agreement at {_level_name(lv)}% FLOPs", y=0.99, fontsize=8)
            fig.subplots_adjust(left=0.22, right=0.86, bottom=0.2, top=0.9, wspace=0.06, hspace=0.18)
            files += _save(fig, pdir / f"patterns_iou_{_level_name(lv)}")
    return files


# --------------------------------------------------------------------------- error agreement

def kappa_heatmaps(settings, pdir: Path) -> list[Path]:
    """One figure per FLOPs level: Cohen's kappa between the level's settings and dense."""
    plt, _ = _plt()
    files = []
    dense = [s for s in settings if s.is_dense]
    levels = sorted({s.level for s in settings if s.level is not None})
    for lv in levels:
        group = dense + [s for s in settings if s.level == lv]
        if len(group) < 2:
            continue
        names = [s.short for s in group]
        mat = np.eye(len(group))
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                mat[i, j] = mat[j, i] = cohen_kappa(group[i].correct, group[j].correct)
        style, rc = _style()
        with style, rc:
            fig, ax = plt.subplots(figsize=(WIDTH, WIDTH * 0.85))
            _heat(ax, mat, names, annot_size=6)
            fig.colorbar(ax.collections[0], ax=ax, fraction=0.046, pad=0.04, label=f"Cohen's kappa on correctness ({len(group[0].correct)} images)")
            ax.set_title(f"Error agreement, {_level_name(lv)}% FLOPs", pad=3)
            fig.tight_layout()
            files += _save(fig, pdir / f"errors_kappa_{_level_name(lv)}")
    return files


def per_class_heatmap(matrix: dict, class_names: Sequence[str], pdir: Path) -> list[Path]:
    """Methods x classes: top-1 change against dense, in points."""
    plt, sns = _plt()
    if not matrix:
        return []
    names = list(matrix)
    mat = np.array([matrix[n] for n in names])
    lim = max(1.0, float(np.nanmax(np.abs(mat))))
    annot = np.vectorize(lambda v: "" if v != v else str(int(round(v))))(mat)
    style, rc = _style()
    with style, rc:
        fig, ax = plt.subplots(figsize=(WIDTH, 0.6 + 0.16 * len(names) + 0.6))
        sns.heatmap(mat, ax=ax, cmap=DIVERGING, center=0, vmin=-lim, vmax=lim, annot=annot, fmt="",
                    annot_kws={"size": 4.5}, xticklabels=list(class_names), yticklabels=names, linewidths=0.2,
                    linecolor="white", cbar_kws={"label": "top-1 change vs dense (points)", "pad": 0.02})
        ax.tick_params(length=0, pad=1)
        ax.set_xticklabels(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0, fontsize=5.5)
        ax.set_title("Per-class top-1 change against dense", pad=3)
        fig.tight_layout()
        return _save(fig, pdir / "per_class_change")


# --------------------------------------------------------------------------- drift

def drift_plot(rows: list[dict], pdir: Path) -> list[Path]:
    """Linear CKA and cosine similarity against dense, over the FLOPs ratio, one line per method."""
    plt, sns = _plt()
    rows = [r for r in rows if r.get("flops_rel") is not None]
    if not rows:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    palette = sns.color_palette("colorblind", max(1, len(methods)))
    style, rc = _style()
    with sns.axes_style("whitegrid"), rc:
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.0), sharex=True)
        for ax, col, ylabel in ((axes[0], "cka", "linear CKA vs dense"), (axes[1], "cosine", "cosine vs dense")):
            for i, m in enumerate(methods):
                pts = sorted((r["flops_rel"], r[col]) for r in rows if r["method"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)], ms=3,
                        lw=0.9, color=palette[i], label=m)
            ax.set_xlabel("FLOPs (fraction of dense)")
            ax.set_ylabel(ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(methods)), frameon=False,
                   bbox_to_anchor=(0.5, -0.02), columnspacing=1.0, handlelength=1.6)
        fig.tight_layout(rect=(0, 0.12 + 0.06 * (len(methods) > 4), 1, 1))
        return _save(fig, pdir / "drift")


# --------------------------------------------------------------------------- budget

def budget_plot(dists: dict, pdir: Path) -> list[Path]:
    """Tokens per image for each setting (box plots; a line where the count is constant)."""
    plt, sns = _plt()
    if not dists:
        return []
    import pandas as pd

    names = list(dists)
    frames = [pd.DataFrame({"setting": n, "tokens": dists[n][0], "method": n.split(" ")[0]}) for n in names]
    df = pd.concat(frames, ignore_index=True)
    methods = list(dict.fromkeys(df["method"]))
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    constant = all(float(np.ptp(dists[n][0])) == 0 for n in names)
    style, rc = _style()
    with sns.axes_style("whitegrid"), rc:
        fig, ax = plt.subplots(figsize=(WIDTH, 0.5 + 0.13 * len(names) + 0.4))
        sns.boxplot(data=df, y="setting", x="tokens", hue="method", palette=palette, dodge=False, ax=ax,
                    fliersize=1, linewidth=0.6, width=0.6, legend=False)
        means = df.groupby("setting", sort=False)["tokens"].mean()
        ax.scatter(means.values, range(len(means)), s=9, zorder=3, marker="o", edgecolor="black", linewidth=0.3,
                   c=[palette[n.split(" ")[0]] for n in means.index])
        ax.set_ylabel("")
        ax.set_xlabel("tokens per image (mean sequence length over blocks)")
        ax.tick_params(axis="y", labelsize=5.5)
        note = "every count constant per image" if constant else "per-image spread"
        ax.set_title(f"Budget spending ({note})", pad=3)
        fig.tight_layout()
        return _save(fig, pdir / "budget_tokens")


# --------------------------------------------------------------------------- spatial prior

def keep_map_grid(maps: dict, prior: np.ndarray, pdir: Path) -> list[Path]:
    """Keep maps: rows methods, columns FLOPs levels; the centre prior beside them.

    Each map is drawn relative to its own mean (1 = kept as often as the average position), so
    that maps at different keep rates share one scale; a map with (almost) nothing kept is left
    blank and says so.
    """
    plt, _ = _plt()
    from matplotlib.colors import TwoSlopeNorm

    maps = {k: v for k, v in maps.items() if v[1] is not None}   # a setting without a FLOPs level has no column
    if not maps:
        return []
    labels = list(dict.fromkeys(v[0] for v in maps.values()))
    levels = sorted({v[1] for v in maps.values()})
    cell = {(v[0], v[1]): v[2] for v in maps.values()}
    ncols, nrows = len(levels) + 1, len(labels)
    side = (WIDTH - 0.6) / ncols
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    style, rc = _style()
    with style, rc:
        fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, nrows * (side + 0.06) + 0.75), squeeze=False,
                                 gridspec_kw={"wspace": 0.08, "hspace": 0.12})
        im = None
        for r, lab in enumerate(labels):
            for c in range(ncols):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_linewidth(0.3)
                if c == 0:
                    ax.set_ylabel(lab, fontsize=6, rotation=0, ha="right", va="center", labelpad=2)
                if c == ncols - 1:
                    if r == 0:
                        ax.imshow(2 * prior / prior.max(), cmap=DIVERGING, norm=norm)  # its shape, on the same scale
                        ax.set_title("centre\nprior", fontsize=6, pad=2)
                    else:
                        ax.axis("off")
                    continue
                lv = levels[c]
                if r == 0:
                    ax.set_title(f"{_level_name(lv)}%", fontsize=6.5, pad=2)
                m = cell.get((lab, lv))
                if m is None:
                    ax.set_frame_on(False)
                    continue
                if m.mean() < 0.01:
                    ax.text(0.5, 0.5, "none\nleft", fontsize=5.5, ha="center", va="center", transform=ax.transAxes)
                    continue
                im = ax.imshow(m / m.mean(), cmap=DIVERGING, norm=norm)
        if im is not None:
            height = fig.get_size_inches()[1]
            cax = fig.add_axes((0.25, 0.4 / height, 0.5, 0.05 / height))
            cb = fig.colorbar(im, cax=cax, orientation="horizontal")
            cb.set_label("how often a patch is still its own token at the end,\nrelative to the map's mean",
                         fontsize=6.5)
            cb.ax.tick_params(labelsize=6)
        fig.suptitle("Where tokens go: keep maps by FLOPs level", y=0.995, fontsize=8)
        fig.subplots_adjust(left=0.2, right=0.99, top=1 - 0.35 / fig.get_size_inches()[1],
                            bottom=0.6 / fig.get_size_inches()[1])
        return _save(fig, pdir / "keep_maps")
