"""Drawing the token pictures from traces: one panel per stage, a sheet per method, a
comparison sheet across methods.  Nothing here runs a model: it draws
:class:`tokenbench.visual.trace.Trace` objects and :class:`tokenbench.visual.inputs.Images`.

- a kept token shows the image's own pixels;
- a merged group is one region in its own colour, filled with its mean colour tinted by that
  colour, with white boundaries (as in the ToMe paper);
- a fused token, or a group containing one, is hatched;
- a dropped patch is greyed out (as in the DynamicViT paper);
- hierarchical models: a position on the slow path (the block's full MLP) shows the image's
  pixels, one on the fast path is dimmed (whitened), with a border between the two.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError, cannot_write
from .inputs import Images
from .trace import FAST, FUSED, GROUP, SLOW_PATH, Stage, Trace, dense_stage

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

DROPPED_GREY = np.array([0.80, 0.85, 0.91])   # a blue-grey, told apart from grayscale images
DROPPED_GHOST = 0.10          # how much of the image shows through a dropped patch
DROPPED_EDGE = "#4a5a70"      # the border between dropped and surviving patches
FUSED_COLOURS = ["#e66100", "#5d3a9b", "#1a85ff", "#d41159"]   # newest fused token first
BOUNDARY = "white"
FAST_DIM = 0.35               # how much of the image shows through a fast-path position


def select_stages(stages: list[Stage], which: str) -> list[Stage]:
    """``all``, ``final`` (the last stage) or comma-separated block indices."""
    which = (which or "all").strip().lower()
    if which == "all":
        return list(stages)
    if which in ("final", "last"):
        return stages[-1:]
    try:
        blocks = {int(v) for v in which.replace(" ", "").split(",") if v}
    except ValueError:
        raise UserError(f"--stages takes all, final or block indices (3,6,9), got {which!r}") from None
    picked = [s for s in stages if s.block in blocks]
    if stages and not picked:
        have = sorted({s.block for s in stages})
        raise UserError(f"no reduction in blocks {sorted(blocks)}; this method reduces in blocks {have}")
    return picked


def group_colour(key: int) -> np.ndarray:
    """A distinct, stable colour for the group whose first patch is ``key`` (golden-ratio hues)."""
    h = (key * 0.618033988749895 + 0.13) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, 0.85, 0.95))


def render_stage(img: np.ndarray, stage: Optional[Stage], b: int, grid: tuple[int, int]):
    """The panel's pixels and what to draw over them.

    Returns (canvas [H, W, 3], hatched: list of (patch rows, cols, colour) per fused token,
    token boundaries and dropped-region boundaries: lists of segments ((x0, y0), (x1, y1))
    in patch units).
    """
    h, w, _ = img.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    canvas = img.copy()
    if stage is None:
        return canvas, [], [], []
    assign = stage.assign[b].view(gh, gw).numpy()
    role = stage.role[b].numpy()
    hatched = []
    tokens = np.unique(assign)
    # Fused tokens: the newest one first (its colour is fixed), older ones after.
    fused_tokens = [t for t in tokens if t >= 0 and role[t] == FUSED]
    fused_tokens.sort(key=lambda t: (t != stage.newest_fused, t))
    for t in tokens:
        mask = assign == t
        pix = np.kron(mask, np.ones((ph, pw), dtype=bool))
        if pix.shape != (h, w):  # image not a whole number of patches: pad the mask
            full = np.zeros((h, w), dtype=bool)
            full[:pix.shape[0], :pix.shape[1]] = pix[:h, :w]
            pix = full
        if t < 0:
            canvas[pix] = (1 - DROPPED_GHOST) * DROPPED_GREY + DROPPED_GHOST * img[pix]
        elif role[t] == FAST:
            canvas[pix] = (1 - FAST_DIM) + FAST_DIM * img[pix]
        elif role[t] == GROUP:
            first = int(np.flatnonzero(mask.ravel())[0])
            col = group_colour(first)
            mean = img[pix].mean(0)
            canvas[pix] = 0.45 * mean + 0.55 * col * (0.35 + 0.65 * mean.mean())
        elif role[t] == FUSED:
            col = np.array(_hex(FUSED_COLOURS[fused_tokens.index(t) % len(FUSED_COLOURS)]))
            canvas[pix] = 0.45 * img[pix] + 0.55 * (0.75 + 0.25 * col)
            rows, cols = np.nonzero(mask)
            hatched.append((rows, cols, FUSED_COLOURS[fused_tokens.index(t) % len(FUSED_COLOURS)]))
    # Boundaries between different tokens where either side is a multi-patch token.
    multi = np.zeros(len(role) + 1, dtype=bool)  # the extra last entry answers for -1 (dropped)
    multi[:len(role)] = (role == GROUP) | (role == FUSED)
    segs, drop_segs = [], []
    for i in range(gh):
        for j in range(gw):
            a = assign[i, j]
            for c, seg in (((assign[i, j + 1] if j + 1 < gw else None), ((j + 1, i), (j + 1, i + 1))),
                           ((assign[i + 1, j] if i + 1 < gh else None), ((j, i + 1), (j + 1, i + 1)))):
                if c is None or a == c:
                    continue
                if (a < 0) != (c < 0) or (role[a] == FAST) != (role[c] == FAST):
                    drop_segs.append(seg)
                elif multi[a] or multi[c]:
                    segs.append(seg)
    return np.clip(canvas, 0, 1), hatched, segs, drop_segs


def _hex(c: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(c)


def draw_panel(ax, img: np.ndarray, stage: Optional[Stage], b: int, grid: tuple[int, int]) -> None:
    """One panel: the image as the tokens of ``stage`` see it (``None``: the input)."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    gh, gw = grid
    canvas, hatched, segs, drop_segs = render_stage(img, stage, b, grid)
    interp = "nearest" if max(img.shape[:2]) <= 96 else "antialiased"
    ax.imshow(canvas, extent=(0, gw, gh, 0), interpolation=interp)
    for rows, cols, colour in hatched:
        for r, c in zip(rows, cols):
            ax.add_patch(Rectangle((c, r), 1, 1, facecolor="none", edgecolor=colour, hatch="////",
                                   linewidth=0))
    if segs:
        ax.add_collection(LineCollection(segs, colors=BOUNDARY, linewidths=0.9, capstyle="round"))
    if drop_segs:
        ax.add_collection(LineCollection(drop_segs, colors=DROPPED_EDGE, linewidths=0.6, capstyle="round"))
    ax.set_xlim(0, gw)
    ax.set_ylim(gh, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_linewidth(0.4)
        sp.set_color("#888888")


def _legend_handles(stages: Sequence[Optional[Stage]]) -> list:
    from matplotlib.patches import Patch

    roles, dropped = set(), False
    for s in stages:
        if s is None:
            continue
        roles.update(int(r) for r in s.role.unique())
        dropped = dropped or bool((s.assign < 0).any())
    if any(s is not None and s.kind == SLOW_PATH for s in stages):
        return [Patch(facecolor="#999999", edgecolor="none", label="slow path: the block's MLP (its pixels)"),
                Patch(facecolor=(1 - FAST_DIM) + FAST_DIM * 0.6 * np.ones(3), edgecolor=DROPPED_EDGE, linewidth=0.6,
                      label="fast path (dimmed)")]
    out = [Patch(facecolor="#999999", edgecolor="none", label="kept token (its pixels)")]
    if GROUP in roles:
        out.append(Patch(facecolor=group_colour(3), edgecolor="white",
                         label="merged token (one colour each)"))
    if FUSED in roles:
        out.append(Patch(facecolor=(0.95, 0.85, 0.78), edgecolor=FUSED_COLOURS[0], hatch="////",
                         label="fused token (hatched)"))
    if dropped:
        out.append(Patch(facecolor=DROPPED_GREY, edgecolor=DROPPED_EDGE, linewidth=0.6, label="dropped (greyed out)"))
    return out


def _pred_text(logits: torch.Tensor, b: int, images: Images) -> tuple[str, str]:
    k = int(logits[b].argmax())
    names = images.class_names if images.class_names is not None else _imagenet_names(logits.shape[-1])
    name = names[k] if names is not None and k < len(names) else f"class {k}"
    t = images.targets[b]
    if t is None:
        return f"pred. {name}", "#333333"
    return (f"pred. {name}", "#1b7837") if k == t else (f"pred. {name} ✗", "#b2182b")


def _imagenet_names(n_classes: int) -> Optional[list[str]]:
    """ImageNet-1k class names (timm's), for a 1000-way head; None otherwise."""
    if n_classes != 1000:
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    except Exception:  # an older timm, or its class files missing
        return None


def _line_h(fontsize: float, lines: int) -> float:
    """Inches taken by ``lines`` lines of text at ``fontsize`` points (with matplotlib's padding)."""
    return 0 if lines <= 0 else (lines * fontsize * 1.25 + 6) / 72


def _grid(nrows: int, ncols: int, title_h: Sequence[float], label_h: float, panel: float = 1.3,
          gap: float = 0.1, left: float = 0.05, top: float = 0.0, bottom: float = 0.3):
    """A figure of ``nrows`` x ``ncols`` square panels of ``panel`` inches, laid out by hand.

    ``title_h[r]``: the space above row ``r`` (its titles); ``label_h``: the space below each
    row (x labels).  Every square image fills its panel exactly, so nothing is left to a
    layout engine that cannot see the images' fixed aspect.
    """
    from matplotlib.figure import Figure

    width = left + ncols * panel + (ncols - 1) * gap + 0.05
    height = top + sum(title_h) + nrows * (panel + label_h) + bottom
    fig = Figure(figsize=(width, height))
    axes = np.empty((nrows, ncols), dtype=object)
    y = height - top
    for r in range(nrows):
        y -= title_h[r] + panel
        for c in range(ncols):
            x = left + c * (panel + gap)
            axes[r, c] = fig.add_axes((x / width, y / height, panel / width, panel / height))
        y -= label_h
    return fig, axes


def _decorate(fig, title: str, handles: list) -> None:
    """Suptitle (wrapped to the figure's width) and the legend below the panels."""
    import textwrap

    width, height = fig.get_size_inches()
    if title:
        chars = max(30, int(width * 72 / (9 * 0.55)))
        fig.text(0.5, 1 - 0.06 / height, textwrap.fill(title, chars), ha="center", va="top", fontsize=9)
    if handles:
        ncol = _legend_cols(handles, width)
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=6.5,
                   frameon=False, handlelength=1.6, columnspacing=1.2)


def _legend_cols(handles: list, width: float) -> int:
    """The most legend columns whose entries (6.5 pt text, a swatch, spacing) fit in ``width`` inches."""
    sizes = [len(h.get_label()) * 6.5 * 0.52 / 72 + 0.45 for h in handles]
    for ncol in range(len(handles), 1, -1):
        per_row = [sizes[i:i + ncol] for i in range(0, len(sizes), ncol)]
        cols = [max(r[c] for r in per_row if c < len(r)) for c in range(ncol)]
        if sum(cols) <= width:
            return ncol
    return 1


def _suptitle_h(title: str, width: float) -> float:
    import textwrap

    if not title:
        return 0.05
    lines = len(textwrap.fill(title, max(30, int(width * 72 / (9 * 0.55)))).splitlines())
    return _line_h(9, lines) + 0.04


def method_figure(images: Images, tr: Trace, title: str = "", stages: str = "all"):
    """Rows: images; columns: the input, then one panel per reduction stage."""
    shown: list[Stage] = list(select_stages(tr.stages, stages))
    reduced = bool(tr.stages)
    if not reduced:
        shown = [dense_stage(len(images.labels), tr.grid[0] * tr.grid[1], tr.n_prefix, -1)]
    nrows, ncols = len(images.labels), 1 + len(shown)
    panel, gap = 1.3, 0.1
    width = 0.1 + ncols * panel + (ncols - 1) * gap
    handles = _legend_handles(shown)
    n_leg_rows = math.ceil(len(handles) / _legend_cols(handles, width)) if handles else 0
    fig, axes = _grid(nrows, ncols, [_line_h(7, 2)] * nrows, _line_h(7, 1), panel=panel, gap=gap,
                      top=_suptitle_h(title, width), bottom=_line_h(6.5, n_leg_rows))
    for b in range(nrows):
        draw_panel(axes[b, 0], images.display[b], None, b, tr.grid)
        axes[b, 0].set_title(f"{images.labels[b]}\n{_input_caption(tr, shown)}", fontsize=7)
        for j, s in enumerate(shown, start=1):
            ax = axes[b, j]
            draw_panel(ax, images.display[b], s, b, tr.grid)
            head = s.title() if reduced else f"no reduction: {s.n_tokens} tokens"
            ax.set_title(f"{head}\n{s.caption(b)}", fontsize=7)
        text, colour = _pred_text(tr.logits, b, images)
        axes[b, -1].set_xlabel(text, fontsize=7, color=colour, labelpad=2)
    _decorate(fig, title, handles)
    return fig


def _input_caption(tr: Trace, shown: Sequence[Stage]) -> str:
    if any(s.kind == SLOW_PATH for s in shown):
        return f"input (stage 3: {tr.grid[0]}x{tr.grid[1]})"
    return f"input: {tr.n_prefix + tr.grid[0] * tr.grid[1]} tokens"


@dataclass
class Column:
    """One method of a comparison sheet."""

    method: str
    params: dict
    label: str                 # the column title
    trace: Trace


def compare_figure(images: Images, columns: Sequence[Column], title: str = ""):
    """Rows: images; columns: the input, then each method's final stage."""
    nrows, ncols = len(images.labels), 1 + len(columns)
    panel, gap, left = 1.3, 0.1, 0.22
    width = left + 0.05 + ncols * panel + (ncols - 1) * gap
    head_lines = max([2] + [len(c.label.splitlines()) for c in columns])
    finals = [c.trace.stages[-1] if c.trace.stages else
              dense_stage(nrows, c.trace.grid[0] * c.trace.grid[1], c.trace.n_prefix, -1) for c in columns]
    handles = _legend_handles(finals)
    ncol = _legend_cols(handles, width) if handles else 1
    fig, axes = _grid(nrows, ncols, [_line_h(7.5, head_lines)] + [0.04] * (nrows - 1), _line_h(6.5, 2),
                      panel=panel, gap=gap, left=left, top=_suptitle_h(title, width),
                      bottom=_line_h(6.5, math.ceil(len(handles) / ncol)))
    grid = columns[0].trace.grid if columns else (1, 1)
    for b in range(nrows):
        draw_panel(axes[b, 0], images.display[b], None, b, grid)
        axes[b, 0].set_ylabel(images.labels[b], fontsize=7.5, labelpad=2)
        if b == 0:
            axes[b, 0].set_title("input", fontsize=7.5, fontweight="bold")
        for j, (col, s) in enumerate(zip(columns, finals), start=1):
            ax = axes[b, j]
            draw_panel(ax, images.display[b], s, b, col.trace.grid)
            if b == 0:
                ax.set_title(col.label, fontsize=7.5)
            text, colour = _pred_text(col.trace.logits, b, images)
            ax.set_xlabel(f"{s.n_tokens} tokens\n{text}", fontsize=6.5, color=colour, labelpad=2)
    _decorate(fig, title, handles)
    return fig


def save_figure(fig, out: str | Path, dpi: int = 200) -> Path:
    """Write ``fig`` (PNG, or PDF / SVG by the suffix); parent folders are created."""
    out = Path(out)
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"--out must end in {', '.join(FIGURE_SUFFIXES)}, got {out.name!r}")
    if dpi < 20 or dpi > 1200:
        raise UserError(f"--dpi must be between 20 and 1200, got {dpi}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        import matplotlib

        with matplotlib.rc_context({"hatch.linewidth": 0.7, "pdf.fonttype": 42, "svg.fonttype": "none"}):
            fig.savefig(out, dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.04)
    except OSError as e:
        raise UserError(cannot_write(out, e)) from None
    return out



def check_out(out) -> None:
    """Refuse an output name whose suffix is no figure format (before any work is done)."""
    if Path(out).suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"--out must end in {', '.join(FIGURE_SUFFIXES)}, got {Path(out).name!r}")
