"""Dense datasets: ``fashion-mnist-scenes`` (generated, cached), and the segmentation folders of
:mod:`tokenbench.data_seg_folders` (VOC and ADE20K layouts) built through one entry point.

Every dense dataset yields ``(image, mask)``: the image preprocessed for the model
(float ``[C, S, S]``, S the model's input size) and the per-pixel label (int64 ``[H, W]``,
the value :data:`IGNORE` where a pixel is not scored).

``fashion-mnist-scenes``: 56 x 56 grey scenes, each composed of 2 to 4 real Fashion-MNIST
items at seeded positions and scales (20 to 36 pixels a side).  Label 0 is the background;
an item's pixels brighter than :data:`ITEM_THRESHOLD` take its Fashion-MNIST class + 1
(so 11 classes).  Items are placed where they hide no pixel of an earlier item (items may touch
and interleave); an item with no such place at its size tries smaller sizes, and only where none
fits lies where it hides the fewest pixels (on top).  Occlusion was measured to be the hard part of
unconstrained placement: a model that scores 79% mIoU on single items scored 54% on four freely
overlapping ones, mostly from fragments no classifier could name.  Train scenes draw their items from
Fashion-MNIST's train split (the 55,000 images not held out), val scenes from its held-out
val images, test scenes from its test images, so no item is shared between splits.
Generation is deterministic (seeded per split) and cached under the data cache
(``$TOKENBENCH_DATA``, default ``~/.cache/tokenbench``), one file per split, named by the
generator's version and the source files' fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .data_seg_folders import ADE20K, IGNORE, VOC, layout_classes
from .errors import UserError, did_you_mean

SCENES = "fashion-mnist-scenes"
DENSE_DATASETS = (SCENES, VOC, ADE20K)
SCENE_SIZE = 56
SCENE_ITEMS = (2, 4)           # items per scene, inclusive
ITEM_SIDE = (20, 36)           # an item's side after scaling, pixels, inclusive
ITEM_THRESHOLD = 50            # an item's pixel (0..255) belongs to it above this
SCENE_SIZES = {"train": 20000, "val": 2000, "test": 2000}
SCENE_SEEDS = {"train": 0, "val": 1, "test": 2}
PLACE_TRIES = 30               # random positions tried per item size before a smaller size is tried
SHRINK_STEP = 4                # pixels an item's side shrinks by when no position at its size is free
SCENES_VERSION = 2             # raised whenever generation changes: cache files and record keys follow
SCENE_MEAN, SCENE_STD = 0.15, 0.30


def scene_classes() -> tuple[str, ...]:
    from .data import FMNIST_CLASSES

    return ("background",) + FMNIST_CLASSES


def unknown_dataset(name: str) -> UserError:
    """The one-line refusal of a dataset name that is neither a classification nor a dense one."""
    from .data import DATASETS

    return UserError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS + DENSE_DATASETS)}; choose from "
                     f"{', '.join(DATASETS)} (classification) or {', '.join(DENSE_DATASETS)} (dense prediction, "
                     "with a dense model)")


def is_dense_data(name: Optional[str]) -> bool:
    return name in DENSE_DATASETS


def dense_classes(name: str) -> int:
    """How many classes dataset ``name`` scores (known before any file is read)."""
    return len(scene_classes()) if name == SCENES else len(layout_classes(name))


# --------------------------------------------------------------------------- generation

def compose_scenes(items: np.ndarray, labels: np.ndarray, n: int, seed: int,
                   size: int = SCENE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes (uint8 [n, size, size]) and their masks (uint8, 0 = background, class + 1
    on an item) composed from ``items`` (uint8 [M, 28, 28]) with class ``labels``."""
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)

    def scaled(j: int, side: int) -> np.ndarray:
        item = torch.from_numpy(items[j].astype(np.float32))[None, None]
        item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        return item.round().clamp(0, 255).to(torch.uint8).numpy()

    for i in range(n):
        for _ in range(int(rng.integers(SCENE_ITEMS[0], SCENE_ITEMS[1] + 1))):
            j = int(rng.integers(len(items)))
            side = int(rng.integers(ITEM_SIDE[0], ITEM_SIDE[1] + 1))
            best = None  # (hidden pixels, top, left, item): the least-hiding place seen
            while True:
                item = scaled(j, side)
                on = item > ITEM_THRESHOLD
                hidden, top, left = place_item(masks[i] > 0, on, rng)
                if best is None or hidden < best[0]:
                    best = (hidden, top, left, item)
                if hidden == 0 or side - SHRINK_STEP < ITEM_SIDE[0]:
                    break
                side -= SHRINK_STEP
            _, top, left, item = best
            on = item > ITEM_THRESHOLD
            side = len(item)
            images[i, top:top + side, left:left + side][on] = item[on]
            masks[i, top:top + side, left:left + side][on] = int(labels[j]) + 1
    return images, masks


def place_item(occupied: np.ndarray, on: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """``(hidden, top, left)``: the first of :data:`PLACE_TRIES` seeded positions where item pixels
    ``on`` hide no ``occupied`` pixel (``hidden`` 0), else the try that hides the fewest."""
    size, side = len(occupied), len(on)
    best = None
    for _ in range(PLACE_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        hidden = int((occupied[top:top + side, left:left + side] & on).sum())
        if best is None or hidden < best[0]:
            best = (hidden, top, left)
        if hidden == 0:
            break
    return best


def data_cache() -> Path:
    return Path(os.environ.get("TOKENBENCH_DATA", Path.home() / ".cache" / "tokenbench"))


def scenes_fingerprint(split: str, data_dir=None) -> str:
    """The identity of a split's scenes: generator version, size, seed and the source files."""
    from .identity import data_fingerprint

    check_split(split)
    source = data_fingerprint("fashion-mnist", split, data_dir)
    return f"{SCENES}-v{SCENES_VERSION}-{split}-n{SCENE_SIZES[split]}-s{SCENE_SEEDS[split]}:{source}"


def check_split(split: str) -> None:
    if split not in SCENE_SIZES:
        raise UserError(f"unknown split {split!r} for {SCENES} (use train, val or test)")


def load_scenes(split: str = "test", data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 56, 56], masks uint8 [N, 56, 56]) of ``split``, generated once and cached."""
    from .data import load_fashion_mnist

    fp = scenes_fingerprint(split, data_dir)
    path = data_cache() / "scenes" / f"{SCENES}-{hashlib.sha256(fp.encode()).hexdigest()[:16]}-{split}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["masks"])
        except (OSError, ValueError, KeyError):
            pass  # damaged cache file: generate again
    items, labels = load_fashion_mnist(split, data_dir)
    images, masks = compose_scenes(items.numpy(), labels.numpy(), SCENE_SIZES[split], SCENE_SEEDS[split])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=images, masks=masks)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the scenes are generated again next time
    return torch.from_numpy(images), torch.from_numpy(masks)


# --------------------------------------------------------------------------- datasets

class SegmentationTensors(Dataset):
    """Images and masks in memory (uint8 [N, H, W]); ``transform`` maps an image to the model's input."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, transform, classes: tuple[str, ...]):
        self.images, self.masks, self.transform, self.classes = images, masks, transform, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.masks[i].long()


@dataclass
class DenseSpec:
    """Which dense images were measured: enough to recognise the same subset again."""

    name: str
    split: str
    n: int
    available: int
    classes: int
    limit: Optional[int] = None
    seed: int = 0
    source: Optional[str] = None

    def key(self) -> dict:
        return {"name": self.name, "split": self.split, "n": self.n, "limit": self.limit, "seed": self.seed}


def dense_fingerprint(name: str, split: str, data_dir=None) -> str:
    """The identity of a dense split (not where it lives), for record keys."""
    if name == SCENES:
        return scenes_fingerprint(split, data_dir)
    from .data_seg_folders import layout_fingerprint

    return layout_fingerprint(name, split, data_dir)


def build_dense_dataset(name: str, split: str = "test", data_dir=None, model=None, limit: Optional[int] = None,
                        seed: int = 0) -> tuple[Dataset, DenseSpec]:
    """The dense dataset ``name`` preprocessed for ``model`` and a :class:`DenseSpec` describing it.

    ``limit`` takes a seeded random subset of that many images (sorted)."""
    from .backbones import input_config
    from .data import grayscale_transform

    if name not in DENSE_DATASETS:
        raise UserError(f"unknown dense dataset {name!r}; choose from {', '.join(DENSE_DATASETS)}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    cfg = input_config(model)
    if name == SCENES:
        check_split(split)
        images, masks = load_scenes(split, data_dir)
        mean, std = (SCENE_MEAN,) * cfg["in_chans"], (SCENE_STD,) * cfg["in_chans"]
        ds: Dataset = SegmentationTensors(images, masks, grayscale_transform(cfg["in_chans"], cfg["img_size"],
                                                                             mean, std), scene_classes())
        source = None
    else:
        from .data_seg_folders import SegmentationFolder, check_layout_dir

        check_layout_dir(name, data_dir)
        ds = SegmentationFolder(name, data_dir, split, cfg["img_size"], cfg["in_chans"], cfg["mean"], cfg["std"])
        source = str(data_dir)
    available = len(ds)
    if available == 0:
        raise UserError(f"the {split} split of {name} is empty")
    classes = len(ds.classes)
    if limit is not None:
        if limit > available:
            raise UserError(f"--limit {limit} is more than the {available} images of {name} {split}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.sort(torch.randperm(available, generator=g)[:limit]).values
        ds = torch.utils.data.Subset(ds, idx.tolist())
    return ds, DenseSpec(name=name, split=split, n=len(ds), available=available, classes=classes,
                         limit=limit, seed=seed, source=source)
