"""The images a token picture shows: dataset images (one per class first) or image files,
preprocessed for the model (its size, channels and normalisation), and what to display for them.

The model's input configuration comes from :func:`tokenbench.visual.trace.input_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from .trace import input_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Images:
    """Images ready for a model, and what to show for them."""

    x: torch.Tensor               # [B, C, H, W], normalised for the model
    display: np.ndarray           # [B, H, W, 3] floats in [0, 1], what the model sees
    labels: list[str]             # a short name per image (class or file name)
    targets: list[Optional[int]]  # the true class index where known
    class_names: Optional[Sequence[str]] = None
    source: str = ""


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
    from ..data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, build_dataset, load_fashion_mnist

    if n < 1:
        raise UserError(f"--n must be positive, got {n}")
    cfg = input_config(model)
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
        mean, std = cfg["transform_mean"], cfg["transform_std"]
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
    cfg = input_config(model)
    c, s = int(cfg["in_chans"]), int(cfg["img_size"])
    files = expand_image_paths(paths)
    x01 = torch.stack([read_image(p, c, s) for p in files])
    return Images(x=_normalise(x01, cfg["mean"], cfg["std"]), display=_to_display(x01),
                  labels=[p.stem for p in files], targets=[None] * len(files), class_names=None,
                  source=", ".join(str(p) for p in files))


