"""Token visualisations: which original patches each token stands for, stage by stage.

Everything here reads the shared bookkeeping of :mod:`tokenbench.vit` (the source map
and its per-stage snapshots); nothing knows a method by name.  A snapshot is
classified by its ``kind`` and its source rows alone:

- a row covering no patch is a prefix token (class, distillation, register token);
- a row covering one patch is a kept token, drawn with the image's own pixels;
- a row covering several patches is a merged group (drawn as one region in its own
  colour, filled with its mean colour tinted by that colour, with white boundaries, as in
  the ToMe paper), unless it is or contains a *fused* token (the last token of a
  ``fuse`` snapshot with ``fused_last``, EViT's), drawn hatched;
- a patch in no row was dropped, drawn greyed out (as in the DynamicViT paper).

Library entry points: :func:`patch_assignment` and :func:`classify` (the analysis),
:func:`images_from_dataset` / :func:`images_from_files` (inputs and what to show),
:func:`trace` (a forward with the source map on), :func:`method_figure` and
:func:`compare_figure` (matplotlib figures), :func:`visualize` and :func:`compare`
(what the ``tokenbench visualize`` command calls).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError

# Token roles, one per token of a stage.
PREFIX, KEPT, GROUP, FUSED = 0, 1, 2, 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

DROPPED_GREY = np.array([0.80, 0.85, 0.91])   # a blue-grey, told apart from grayscale images
DROPPED_GHOST = 0.10          # how much of the image shows through a dropped patch
DROPPED_EDGE = "#4a5a70"      # the border between dropped and surviving patches
FUSED_COLOURS = ["#e66100", "#5d3a9b", "#1a85ff", "#d41159"]   # newest fused token first
BOUNDARY = "white"


# --------------------------------------------------------------------------- analysis

def patch_assignment(stage: dict, n_prefix: int, check: bool = True) -> torch.Tensor:
    """For every original patch, the token (index into the stage's sequence) that covers it, or -1.

    ``stage`` is one snapshot of ``vit.TokenState.stages`` (its ``source`` [B, N, N0], N0 =
    ``n_prefix`` + patches, prefix tokens first).  Returns a LongTensor [B, n_patches].
    With ``check``, a patch covered by more than one token raises ``ValueError`` (the
    bookkeeping would be broken).
    """
    src = stage["source"][:, :, n_prefix:] > 0            # [B, N, P]
    count = src.sum(1)                                       # [B, P]
    if check and bool((count > 1).any()):
        b, p = [int(v) for v in (count > 1).nonzero()[0]]
        raise ValueError(f"patch {p} of image {b} is covered by {int(count[b, p])} tokens at block "
                         f"{stage.get('block')} ({stage.get('kind')})")
    idx = src.to(torch.uint8).argmax(1)
    return torch.where(count > 0, idx, torch.full_like(idx, -1))


@dataclass
class Stage:
    """One snapshot, analysed: what each token is and which patches it covers."""

    block: int
    kind: str
    n_tokens: int                 # sequence length after the reduction, prefix tokens included
    assign: torch.Tensor          # [B, P] token index or -1 (dropped)
    role: torch.Tensor            # [B, N] PREFIX / KEPT / GROUP / FUSED
    n_patches: torch.Tensor       # [B, N] patches each token covers
    newest_fused: Optional[int]   # index of the token fused at this stage (None if none)

    def counts(self, b: int) -> dict:
        role, npatch = self.role[b], self.n_patches[b]
        return {"tokens": self.n_tokens,
                "kept": int((role == KEPT).sum()),
                "groups": int((role == GROUP).sum()),
                "grouped_patches": int(npatch[role == GROUP].sum()),
                "fused": int((role == FUSED).sum()),
                "fused_patches": int(npatch[role == FUSED].sum()),
                "dropped": int((self.assign[b] < 0).sum())}

    def title(self) -> str:
        return f"block {self.block}: {self.n_tokens} tokens"

    def caption(self, b: int) -> str:
        c = self.counts(b)
        parts = [f"{c['kept']} kept"]
        if c["groups"]:
            parts.append(f"{c['groups']} merged ({c['grouped_patches']} p.)")
        if c["fused"]:
            parts.append(f"{c['fused']} fused ({c['fused_patches']} p.)")
        if c["dropped"]:
            parts.append(f"{c['dropped']} dropped")
        return ", ".join(parts)


def classify(stages: Sequence[dict], n_prefix: int) -> list[Stage]:
    """Analyse every snapshot of a forward, in order (fused lineage is carried across stages)."""
    out: list[Stage] = []
    fused_patches: Optional[torch.Tensor] = None            # [B, P] bool: ever part of a fused token
    for st in stages:
        src = st["source"][:, :, n_prefix:] > 0               # [B, N, P]
        b, n, p = src.shape
        assign = patch_assignment(st, n_prefix)
        npatch = src.sum(-1)                                   # [B, N]
        if fused_patches is None:
            fused_patches = torch.zeros(b, p, dtype=torch.bool, device=src.device)
        newest = None
        if st.get("kind") == "fuse" and st.get("fused_last") and n > n_prefix:
            newest = n - 1
            fused_patches = fused_patches | src[:, newest]
        is_fused = (src & fused_patches[:, None, :]).any(-1)  # contains a fused token
        role = torch.full((b, n), KEPT, dtype=torch.long, device=src.device)
        role[npatch > 1] = GROUP
        role[is_fused] = FUSED
        role[npatch == 0] = PREFIX
        out.append(Stage(block=int(st.get("block", -1)), kind=str(st.get("kind", "")), n_tokens=n,
                         assign=assign.cpu(), role=role.cpu(), n_patches=npatch.cpu(), newest_fused=newest))
    return out


def dense_stage(n_images: int, n_patches: int, n_prefix: int, block: int) -> Stage:
    """What a model with no reduction shows: every patch its own token."""
    idx = torch.arange(n_patches).expand(n_images, -1) + n_prefix
    role = torch.cat([torch.full((n_images, n_prefix), PREFIX), torch.full((n_images, n_patches), KEPT)], 1)
    npatch = torch.cat([torch.zeros(n_images, n_prefix, dtype=torch.long),
                        torch.ones(n_images, n_patches, dtype=torch.long)], 1)
    return Stage(block=block, kind="none", n_tokens=n_prefix + n_patches, assign=idx.clone(), role=role,
                 n_patches=npatch, newest_fused=None)


# --------------------------------------------------------------------------- inputs

@dataclass
class Images:
    """Images ready for a model, and what to show for them."""

    x: torch.Tensor               # [B, C, H, W], normalised for the model
    display: np.ndarray           # [B, H, W, 3] floats in [0, 1], what the model sees
    labels: list[str]             # a short name per image (class or file name)
    targets: list[Optional[int]]  # the true class index where known
    class_names: Optional[Sequence[str]] = None
    source: str = ""


def model_input_config(model: nn.Module) -> dict:
    """in_chans, img_size, mean, std (one per channel) of ``model``."""
    from .data import _model_input

    cfg = dict(_model_input(model))
    c = int(cfg["in_chans"])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != c:  # e.g. a 1-channel timm model keeps ImageNet's three statistics
        mean = (sum(mean) / len(mean),) * c
        std = (sum(std) / len(std),) * c
    cfg["mean"], cfg["std"] = mean, std
    return cfg


def _to_display(x01: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, 3] numpy."""
    x01 = x01.clamp(0, 1)
    if x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    elif x01.shape[1] != 3:
        x01 = x01[:, :3] if x01.shape[1] > 3 else x01.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return x01.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def _normalise(x01: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x01 - m) / s


def _pick_distinct(labels: torch.Tensor, n: int) -> list[int]:
    """The first image of each class in order of appearance, then the next images, ``n`` in all."""
    seen, first, rest = set(), [], []
    for i, y in enumerate(labels.tolist()):
        if y not in seen:
            seen.add(y)
            first.append(i)
            if len(first) >= n:
                break
        elif len(rest) < n:
            rest.append(i)
    return sorted((first + rest)[:n], key=lambda i: (i not in first, i))


def images_from_dataset(model: nn.Module, data: str = "fashion-mnist", n: int = 4, data_dir=None,
                        split: str = "test", index: Optional[Sequence[int]] = None) -> Images:
    """``n`` images of ``data`` (one per class first), or the images at ``index``, preprocessed for ``model``."""
    from .data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, build_dataset, load_fashion_mnist

    if n < 1:
        raise UserError(f"--n must be positive, got {n}")
    cfg = model_input_config(model)
    c, s = int(cfg["in_chans"]), int(cfg["img_size"])
    if data == "fashion-mnist":
        raw, labels = load_fashion_mnist(split, data_dir)
        idx = _check_index(index, len(raw)) if index else _pick_distinct(labels, min(n, len(raw)))
        x01 = raw[idx].float().div(255.0)[:, None]           # [B, 1, 28, 28]
        if x01.shape[-1] != s:
            x01 = torch.nn.functional.interpolate(x01, size=(s, s), mode="bilinear", align_corners=False,
                                                  antialias=True)
        x01 = x01.expand(-1, c, -1, -1)
        mean, std = ((FMNIST_MEAN,), (FMNIST_STD,)) if c == 1 else (cfg["mean"], cfg["std"])
        tg = [int(labels[i]) for i in idx]
        return Images(x=_normalise(x01, mean, std), display=_to_display(x01),
                      labels=[FMNIST_CLASSES[t] for t in tg], targets=tg, class_names=FMNIST_CLASSES,
                      source=f"fashion-mnist {split} #{','.join(map(str, idx))}")
    ds, _ = build_dataset(data, split, data_dir, model=model)  # unknown names: an error with suggestions
    idx = _check_index(index, len(ds)) if index else list(range(min(n, len(ds))))
    items = [ds[i] for i in idx]
    x = torch.stack([it[0] for it in items])
    if data == "synthetic":
        mean, std = (0.5,) * c, (0.25,) * c
    else:
        import timm.data

        dcfg = timm.data.resolve_data_config({}, model=model)
        mean, std = tuple(dcfg["mean"]), tuple(dcfg["std"])
    m = torch.tensor(mean).view(1, -1, 1, 1)
    sd = torch.tensor(std).view(1, -1, 1, 1)
    classes = getattr(ds, "classes", None)
    tg = [int(it[1]) for it in items]
    names = [classes[t] if classes and t < len(classes) else f"class {t}" for t in tg]
    return Images(x=x, display=_to_display(x * sd + m), labels=names, targets=tg, class_names=classes,
                  source=f"{data} {split} #{','.join(map(str, idx))}")


def _check_index(index: Sequence[int], size: int) -> list[int]:
    out = []
    for i in index:
        if not -size <= int(i) < size:
            raise UserError(f"image index {i} is out of range (the split has {size} images)")
        out.append(int(i) % size)
    return out


def expand_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for the image files in it (sorted)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise UserError(f"{p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif not p.exists():
            raise UserError(f"image {p} does not exist")
        else:
            out.append(p)
    if not out:
        raise UserError("no images given")
    return out


def read_image(path: Path, in_chans: int, size: int) -> torch.Tensor:
    """One image file as floats [in_chans, size, size] in [0, 1]: grayscale or RGB as the model
    expects, the shorter side resized to ``size`` and the centre cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'not an image'}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise UserError(f"image {path} is empty")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    a = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 255.0
    a = a[None] if a.dim() == 2 else a.permute(2, 0, 1)
    if in_chans not in (1, 3):
        a = a.mean(0, keepdim=True).expand(in_chans, -1, -1)
    return a


def images_from_files(model: nn.Module, paths: Sequence[str | Path]) -> Images:
    """Image files (PNG, JPEG, ...) preprocessed for ``model``: its size and channels, its normalisation."""
    cfg = model_input_config(model)
    c, s = int(cfg["in_chans"]), int(cfg["img_size"])
    files = expand_image_paths(paths)
    x01 = torch.stack([read_image(p, c, s) for p in files])
    return Images(x=_normalise(x01, cfg["mean"], cfg["std"]), display=_to_display(x01),
                  labels=[p.stem for p in files], targets=[None] * len(files), class_names=None,
                  source=", ".join(str(p) for p in files))


# --------------------------------------------------------------------------- forward

@dataclass
class Trace:
    stages: list[Stage]
    logits: torch.Tensor
    grid: tuple[int, int]
    n_prefix: int


def grid_of(model: nn.Module) -> tuple[int, int]:
    gs = getattr(model.patch_embed, "grid_size", None)
    if gs is None:
        n = int(model.patch_embed.num_patches)
        g = int(math.isqrt(n))
        return g, n // g
    return int(gs[0]), int(gs[1])


@torch.no_grad()
def trace(model: nn.Module, x: torch.Tensor) -> Trace:
    """Run ``model`` on ``x`` with the source map on; the analysed stages and the logits."""
    from . import vit

    was = model.training
    model.eval()
    vit.set_track_source(model, True)
    try:
        logits = model(x)
        st = vit.last_state(model)
    finally:
        vit.set_track_source(model, False)
        model.train(was)
    npf = int(model.num_prefix_tokens)
    grid = grid_of(model)
    stages = classify(st.stages if st is not None else [], npf)
    for s in stages:
        if s.assign.shape[1] != grid[0] * grid[1]:
            raise UserError(f"the source map has {s.assign.shape[1]} patches, the patch grid {grid[0]}x{grid[1]}")
    return Trace(stages=stages, logits=logits.float().cpu(), grid=grid, n_prefix=npf)


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


# --------------------------------------------------------------------------- drawing

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
                if (a < 0) != (c < 0):
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
        axes[b, 0].set_title(f"{images.labels[b]}\ninput: {tr.n_prefix + tr.grid[0] * tr.grid[1]} tokens",
                             fontsize=7)
        for j, s in enumerate(shown, start=1):
            ax = axes[b, j]
            draw_panel(ax, images.display[b], s, b, tr.grid)
            head = s.title() if reduced else f"no reduction: {s.n_tokens} tokens"
            ax.set_title(f"{head}\n{s.caption(b)}", fontsize=7)
        text, colour = _pred_text(tr.logits, b, images)
        axes[b, -1].set_xlabel(text, fontsize=7, color=colour, labelpad=2)
    _decorate(fig, title, handles)
    return fig


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
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out


# --------------------------------------------------------------------------- parameters and FLOPs

def fmt_params(params: dict, only: Optional[str] = None) -> str:
    from .sweep import fmt_value

    items = [(k, v) for k, v in params.items() if only is None or k == only]
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in items)


class Flops:
    """GFLOPs of (model, method, params) and of the dense model, through the sweep's cached counter."""

    def __init__(self, cache: Optional[Path] = None):
        from .sweep import FlopsSearch

        self.search = FlopsSearch(cache)

    def count(self, model: str, method: str, params: dict) -> float:
        return self.search.count(model, None, method, params)

    def dense(self, model: str) -> float:
        return self.search.dense(model, None)

    def matched(self, model: str, method: str, params: dict, target: float, preferred: Sequence[Any] = ()
                ) -> tuple[dict, Any]:
        """``params`` with the method's ``search_param`` moved to land at ``target`` x dense FLOPs.

        A ``preferred`` value (one a checkpoint was trained with) wins when it lands within the
        sweep's tolerance.  Returns (params, SearchResult or None when the method has nothing to
        search).
        """
        from .registry import get_method

        cls = get_method(method)
        param = cls.search_param
        if not param:
            return params, None
        fixed = {k: v for k, v in params.items() if k != param}
        res = self.search.search(model, None, cls, fixed, param, target, preferred=preferred)
        return cls.validate({**fixed, param: res.value}), res


def trained_params(checkpoint: Optional[str]) -> dict:
    """The method parameters a ``tokenbench train`` run was trained with (its ``config.json``), or {}."""
    import json

    if not checkpoint:
        return {}
    cfg = Path(checkpoint).parent / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    p = data.get("params") if isinstance(data, dict) else None
    return p if isinstance(p, dict) else {}


# --------------------------------------------------------------------------- commands

def _load(model: str, method: str, params: dict, checkpoint: Optional[str], pretrained: bool):
    from .api import load

    return load(model, method, params, pretrained=pretrained, checkpoint=checkpoint)


def _images(net, images: Optional[Sequence[str | Path]], data: str, n: int, data_dir, split: str,
            index: Optional[Sequence[int]]) -> Images:
    if images:
        return images_from_files(net, images)
    return images_from_dataset(net, data, n, data_dir=data_dir, split=split, index=index)


def visualize(model: str = "default", method: str = "none", params: Optional[dict] = None,
              out: str | Path = "tokens.png", images: Optional[Sequence[str | Path]] = None,
              data: str = "fashion-mnist", n: int = 4, data_dir=None, split: str = "test",
              index: Optional[Sequence[int]] = None, checkpoint: Optional[str] = None, pretrained: bool = False,
              stages: str = "all", dpi: int = 200, flops_cache: Optional[Path] = None) -> dict:
    """One figure for ``method``: each image, then one panel per reduction stage.  Returns a summary."""
    _check_out(out)
    net, prov = _load(model, method, params or {}, checkpoint, pretrained)
    imgs = _images(net, images, data, n, data_dir, split, index)
    tr = trace(net, imgs.x)
    fl = Flops(flops_cache)
    p = prov["params"]
    g, dense = fl.count(model, method, p), fl.dense(model)
    untrained = " (untrained parts)" if prov.get("learned_parts") == "untrained" else ""
    ptxt = f" ({fmt_params(p)})" if p else ""
    title = f"{model} + {method}{ptxt}{untrained}: {g:.3g} GFLOPs = {g / dense:.2f}x dense"
    fig = method_figure(imgs, tr, title=title, stages=stages)
    path = save_figure(fig, out, dpi)
    shown = select_stages(tr.stages, stages)
    return {"out": str(path), "model": model, "method": method, "params": p, "gflops": g, "dense_gflops": dense,
            "flops_ratio": g / dense, "learned_parts": prov.get("learned_parts"), "images": imgs.source,
            "n_images": len(imgs.labels),
            "stages": [{"block": s.block, "kind": s.kind, "tokens": s.n_tokens} for s in tr.stages],
            "panels_per_image": 1 + max(1, len(shown))}


def compare(model: str = "default", methods: Sequence[str] = ("dynamicvit", "tome", "evit", "topk", "random"),
            flops: Optional[float] = None, params: Optional[dict[str, dict]] = None,
            out: str | Path = "compare.png", images: Optional[Sequence[str | Path]] = None,
            data: str = "fashion-mnist", n: int = 4, data_dir=None, split: str = "test",
            index: Optional[Sequence[int]] = None, checkpoints: Optional[dict[str, Optional[str]]] = None,
            pretrained: bool = False, dpi: int = 200, flops_cache: Optional[Path] = None) -> dict:
    """The same images across ``methods`` (final stage) in one grid, at ``flops`` x dense FLOPs when given.

    ``params``: per method, parameters to use (the searched one is then overridden);
    ``checkpoints``: per method, a checkpoint to load (``None`` key: for every method).
    """
    from .registry import get_method

    _check_out(out)
    if not methods:
        raise UserError("--compare needs at least one method")
    if flops is not None and not 0 < flops <= 1:
        raise UserError(f"--flops is a fraction of the dense model's FLOPs in (0, 1], got {flops}")
    for m in methods:
        get_method(m)
    params = params or {}
    checkpoints = checkpoints or {}
    fl = Flops(flops_cache)
    dense = fl.dense(model)
    imgs: Optional[Images] = None
    columns, summary = [], []
    for m in methods:
        cls = get_method(m)
        p = cls.validate(params.get(m, {}))
        res = None
        ckpt = checkpoints.get(m, checkpoints.get(None))
        if flops is not None:
            trained = trained_params(ckpt).get(cls.search_param) if cls.search_param else None
            p, res = fl.matched(model, m, p, flops, preferred=[trained] if trained is not None else [])
        net, prov = _load(model, m, p, ckpt, pretrained)
        if imgs is None:
            imgs = _images(net, images, data, n, data_dir, split, index)
        tr = trace(net, imgs.x)
        g = fl.count(model, m, prov["params"])
        shown_p = fmt_params(prov["params"], cls.search_param) if cls.search_param else fmt_params(prov["params"])
        miss = " (miss)" if res is not None and res.miss else ""
        untrained = "\nuntrained predictor" if prov.get("learned_parts") == "untrained" else ""
        label = f"{m}\n{shown_p or 'dense'}\n{g / dense:.2f}x FLOPs{miss}{untrained}"
        columns.append(Column(method=m, params=prov["params"], label=label, trace=tr))
        summary.append({"method": m, "params": prov["params"], "gflops": g, "flops_ratio": g / dense,
                        "miss": bool(res.miss) if res is not None else None,
                        "learned_parts": prov.get("learned_parts"), "checkpoint": ckpt,
                        "final_tokens": tr.stages[-1].n_tokens if tr.stages else None})
    target = f" at {flops:.2f}x dense FLOPs" if flops is not None else ""
    title = f"{model}: token reduction{target} (dense: {dense:.3g} GFLOPs)"
    fig = compare_figure(imgs, columns, title=title)
    path = save_figure(fig, out, dpi)
    return {"out": str(path), "model": model, "target": flops, "dense_gflops": dense, "images": imgs.source,
            "n_images": len(imgs.labels), "methods": summary}


def _check_out(out) -> None:
    if Path(out).suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"--out must end in {', '.join(FIGURE_SUFFIXES)}, got {Path(out).name!r}")
