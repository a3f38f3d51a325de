"""Segmentation folders a user brings: the VOC layout and the ADE20K (SceneParsing) layout.

VOC (``--data voc``): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs of
class indices 0..20, 255 on boundaries and pixels not scored) and
``ImageSets/Segmentation/<split>.txt`` listing each split's ids.

ADE20K (``--data ade20k``, the SceneParsing release ``ADEChallengeData2016``):
``images/{training,validation}/<id>.jpg`` and ``annotations/{training,validation}/<id>.png``
(grey PNGs: 0 is "other", not scored; 1..150 the classes).  ``--split train`` reads
``training``, ``--split val`` ``validation``; labels are shifted down by one (class k is
index k - 1) and 0 becomes the ignore value 255, as the benchmark scores them.  ``--data-dir``
is that folder or one holding it.

Evaluation transform (both layouts): the shorter side resized to the model's input size
(bilinear for the image, nearest for the mask), then the centre square cropped, so the model
sees its own grid and token count; pixels outside the crop are not scored.  Each item is
checked when read: its mask as large as its image, and no label outside the classes but 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import UserError

VOC = "voc"
ADE20K = "ade20k"
FOLDER_LAYOUTS = (VOC, ADE20K)
IGNORE = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
ADE_CLASS_COUNT = 150
ADE_SPLITS = {"train": "training", "val": "validation"}
ADE_RELEASE = "ADEChallengeData2016"


def layout_classes(name: str) -> tuple[str, ...]:
    if name == VOC:
        return VOC_CLASSES
    return tuple(f"ade-{k}" for k in range(1, ADE_CLASS_COUNT + 1))


def _ade_root(root: Path) -> Path:
    return root / ADE_RELEASE if (root / ADE_RELEASE).is_dir() else root


def layout_files(name: str, root, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of ``split`` in the folder ``root`` of layout ``name``; a folder that
    does not follow the layout, or an empty split, is refused in one line."""
    from .data import require_dir

    root = require_dir(root)
    if name == VOC:
        ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise UserError(f"{root} has no ImageSets/Segmentation/{split}.txt (a VOC-layout folder lists each "
                            "split's image ids there)")
        ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
        pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        where = str(ids_file)
    else:
        if split not in ADE_SPLITS:
            raise UserError(f"ade20k has the splits train and val (its test images have no annotations), "
                            f"not {split!r}")
        root = _ade_root(root)
        images = root / "images" / ADE_SPLITS[split]
        for d in (images, root / "annotations" / ADE_SPLITS[split]):
            if not d.is_dir():
                raise UserError(f"{root} has no {d.relative_to(root)}/ (the ADE20K layout: images/ and "
                                f"annotations/, each with training/ and validation/)")
        pairs = [(p, root / "annotations" / ADE_SPLITS[split] / f"{p.stem}.png")
                 for p in sorted(images.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        where = str(images)
    if not pairs:
        raise UserError(f"{where} lists no images: the {split} split is empty")
    return pairs


def _mask_indices(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise UserError(f"mask {path} is a {im.mode} image; a segmentation mask is a palette (P) or "
                                "grey (L) PNG of class indices")
            return np.array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read mask {path} ({e.__class__.__name__})") from None


def resize_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, H, W] with its shorter side resized to ``size``, then the centre ``size`` x ``size``."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    x = F.interpolate(x[None], size=(nh, nw), mode=mode, **kw)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


class SegmentationFolder(Dataset):
    """The ``split`` of a folder in layout ``name`` (:data:`FOLDER_LAYOUTS`), preprocessed for a model
    of input ``img_size`` x ``img_size``, ``in_chans`` channels and normalisation ``mean`` / ``std``."""

    def __init__(self, name: str, root, split: str, img_size: int, in_chans: int, mean, std):
        if name not in FOLDER_LAYOUTS:
            raise UserError(f"unknown segmentation layout {name!r}; choose from {', '.join(FOLDER_LAYOUTS)}")
        self.name, self.split = name, split
        self.pairs = layout_files(name, root, split)
        self.classes = layout_classes(name)
        self.img_size, self.in_chans = img_size, in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Class indices (0..K-1, :data:`IGNORE` not scored) of a mask's raw values, checked."""
        k = len(self.classes)
        allowed = np.r_[np.arange(k + (self.name == ADE20K)), IGNORE]
        bad = np.setdiff1d(np.unique(raw), allowed)
        if len(bad):
            scale = f"1..{k}, 0 for other" if self.name == ADE20K else f"0..{k - 1}"
            raise UserError(f"mask {path} holds label {int(bad[0])}, outside the {k} classes ({scale}, and "
                            f"{IGNORE} for pixels not scored)")
        if self.name == ADE20K:
            return np.where((raw == 0) | (raw == IGNORE), IGNORE, raw.astype(np.int64) - 1)
        return raw.astype(np.int64)

    def __getitem__(self, i):
        from .data import _load_image

        img_path, mask_path = self.pairs[i]
        for p in (img_path, mask_path):
            if not p.is_file():
                raise UserError(f"{p} is missing (its {'mask' if p == mask_path else 'image'} is listed in the "
                                f"{self.split} split)")
        img = _load_image(str(img_path), "L" if self.in_chans == 1 else "RGB")
        raw = _mask_indices(mask_path)
        if raw.shape != (img.height, img.width):
            raise UserError(f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} pixels, its image "
                            f"{img.width}x{img.height}: a mask must match its image")
        y = torch.from_numpy(self.labels(raw, mask_path).astype(np.float32))[None]
        x = torch.from_numpy(np.array(img, dtype=np.float32) / 255.0)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        x = resize_crop(x, self.img_size, "bilinear")
        y = resize_crop(y, self.img_size, "nearest")[0]
        return (x - self.mean) / self.std, y.long()


def layout_fingerprint(name: str, split: str, data_dir=None) -> str:
    """The identity of a folder's split (not where it lives), for record keys: its list file
    and its images' and masks' relative paths, sizes and sampled bytes
    (:func:`tokenbench.identity.files_fingerprint`)."""
    from .identity import files_fingerprint

    if data_dir is None or not Path(data_dir).is_dir():
        return f"{name}:missing"
    try:
        pairs = layout_files(name, data_dir, split)
    except UserError:
        return f"{name}:no-{split}"
    root = Path(data_dir) if name == VOC else _ade_root(Path(data_dir))
    files = [p for pair in pairs for p in pair]
    if name == VOC:
        files.insert(0, root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return f"{name}-{split}:" + files_fingerprint(root, files)


def check_layout_dir(name: str, data_dir: Optional[Path]) -> None:
    """The one-line refusal for a layout given no folder."""
    if data_dir is None:
        what = ("JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/" if name == VOC
                else f"{ADE_RELEASE}/ or its images/ and annotations/")
        raise UserError(f"--data-dir is required for {name} (a folder with {what})")
