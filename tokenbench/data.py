"""Datasets: Fashion-MNIST (idx files), ImageNet / class folders, synthetic.

Every dataset is returned as a :class:`torch.utils.data.Dataset` of ``(image, label)``
with the model's own preprocessing already applied, plus a description of which
images were used (so a record can say exactly which subset it measured).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .backbones import input_config
from .errors import UserError, did_you_mean

DATASETS = ("fashion-mnist", "imagenet", "folder", "synthetic")

# Where Debian's `dataset-fashion-mnist` package puts the files.
FMNIST_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Fashion-MNIST ships train and test only.  Its validation split is carved from train:
# a seeded, class-stratified draw of 5,000 of the 60,000 train images (500 per class);
# `train` is the other 55,000, so tuning on `val` never sees test images and training
# never sees the val images.
FMNIST_VAL_SIZE = 5000
FMNIST_VAL_SEED = 0
FMNIST_SPLIT_TEXT = {
    "train": "the 55,000 train images not held out for val",
    "val": "5,000 train images held out (500 per class, seed 0) from what tokenbench train trains on",
    "test": "the 10,000 test images",
}
# Channel statistics of the Fashion-MNIST train split (pixels scaled to [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


# --------------------------------------------------------------------------- idx files

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: {e.__class__.__name__}: {e} (corrupt or truncated file?)") from e
    if len(raw) < 4:
        raise UserError(f"{path} is not an idx file (only {len(raw)} bytes)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated (header incomplete)")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UserError(f"{path} is truncated or corrupt: header says {expected} bytes of data, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def require_dir(data_dir) -> Path:
    """``data_dir`` as a Path, or a one-line UserError: missing, not a directory, unreadable."""
    root = Path(data_dir)
    if not root.exists():
        raise UserError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data directory {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data directory {root} is not readable")
    return root


def find_fashion_mnist(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """The directory holding the four Fashion-MNIST idx files.

    Looks in ``data_dir`` (and its ``fashion-mnist`` / ``FashionMNIST/raw`` sub-folders)
    when given, else in the Debian package's location.  Raises :class:`UserError`
    naming what is missing.
    """
    needed = [f for pair in FMNIST_FILES.values() for f in pair]

    def has_all(d: Path) -> bool:
        return all((d / f).is_file() or (d / f[:-3]).is_file() for f in needed)

    if data_dir is not None:
        root = require_dir(data_dir)
        for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
            if d.is_dir() and has_all(d):
                return d
        missing = [f for f in needed if not ((root / f).is_file() or (root / f[:-3]).is_file())]
        raise UserError(
            f"{root} does not hold Fashion-MNIST: missing {', '.join(missing)} "
            "(expected the four idx files, as installed by `apt-get install dataset-fashion-mnist`)"
        )
    for d in FMNIST_SYSTEM_DIRS:
        if has_all(Path(d)):
            return Path(d)
    cache = Path(os.environ.get("TOKENBENCH_DATA", Path.home() / ".cache" / "tokenbench"))
    if has_all(cache / "FashionMNIST" / "raw"):
        return cache / "FashionMNIST" / "raw"
    # Last resort: torchvision's download, for machines with a network.
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
        return cache / "FashionMNIST" / "raw"
    except Exception as e:  # no network, most likely
        raise UserError(
            "Fashion-MNIST not found: install it with `apt-get install -y dataset-fashion-mnist` "
            f"or pass --data-dir (download failed: {e.__class__.__name__})"
        ) from None


def fmnist_val_indices(train_labels: torch.Tensor) -> torch.Tensor:
    """The train-file indices held out as Fashion-MNIST's val split (sorted): 5,000 of the 60,000,
    the same twelfth of a smaller stand-in file."""
    n = len(train_labels)
    return stratified_subset(train_labels, FMNIST_VAL_SIZE * n // 60000, FMNIST_VAL_SEED)


def load_fashion_mnist(split: str = "test", data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for ``split`` in train/val/test
    (val and train partition the train files: :data:`FMNIST_SPLIT_TEXT`)."""
    if split == "validation":
        split = "val"
    if split not in FMNIST_SPLIT_TEXT:
        raise UserError(f"unknown split {split!r} for fashion-mnist (use train, val or test)")
    images, labels = _fmnist_files("test" if split == "test" else "train", data_dir)
    if split == "test":
        return images, labels
    held = torch.zeros(len(labels), dtype=torch.bool)
    held[fmnist_val_indices(labels)] = True
    keep = held if split == "val" else ~held
    return images[keep].contiguous(), labels[keep].contiguous()


def _fmnist_files(split: str, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one of the two idx file pairs (train or test)."""
    d = find_fashion_mnist(data_dir)
    img_name, lbl_name = FMNIST_FILES[split]
    img_path = d / img_name if (d / img_name).is_file() else d / img_name[:-3]
    lbl_path = d / lbl_name if (d / lbl_name).is_file() else d / lbl_name[:-3]
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{img_path}: expected images of 28x28, got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.max() > 9:
        raise UserError(f"{lbl_path}: label {labels.max()} out of range 0..9 (corrupt file?)")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- datasets

class TensorImages(Dataset):
    """Images held in memory as uint8 [N, H, W] or [N, C, H, W]; transform maps to float."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def grayscale_transform(in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float]):
    """uint8 [H, W] -> float [in_chans, img_size, img_size], normalised."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def f(img: torch.Tensor) -> torch.Tensor:
        x = img.float().div_(255.0).unsqueeze(0)
        if x.shape[-1] != img_size:
            x = torch.nn.functional.interpolate(x[None], size=(img_size, img_size), mode="bilinear",
                                                align_corners=False, antialias=True)[0]
        if in_chans != 1:
            x = x.expand(in_chans, -1, -1)
        return (x - mean_t) / std_t

    return f


@dataclass
class DataSpec:
    """What data a measurement used: enough to recognise the same subset again."""

    name: str
    split: str
    n: int
    limit: Optional[int] = None
    seed: int = 0
    data_dir: Optional[str] = None
    indices_sha: Optional[str] = None
    extra: dict = field(default_factory=dict)
    available: Optional[int] = None   # images in the split before any --limit
    classes: Optional[int] = None     # classes of the split
    source: Optional[str] = None      # the folder read, for image folders
    layout: Optional[str] = None      # image folders: "split" (DIR/<split>/<class>) or "flat" (DIR/<class>)
    carved: Optional[str] = None      # Fashion-MNIST: which images of its files the split holds

    def key(self) -> dict:
        # The directory is not part of the key (the same files may live elsewhere);
        # the subset's identity is.
        return {"name": self.name, "split": self.split, "n": self.n, "limit": self.limit,
                "seed": self.seed, "indices_sha": self.indices_sha}


def stratified_subset(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """``limit`` indices, seeded, in proportion to each class's share, sorted.

    Classes get floor(share * limit) each and the remainder goes to the classes with
    the largest fractional parts, so the same (labels, limit, seed) always gives the
    same images.
    """
    n = len(labels)
    if limit >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * limit / n
    take = quota.floor().long()
    rest = limit - int(take.sum())
    if rest > 0:
        frac = quota - take.double()
        order = torch.argsort(frac, descending=True, stable=True)
        take[order[:rest]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        chosen.append(perm[:k])
    return torch.sort(torch.cat(chosen)).values


def _sha_of_indices(idx: torch.Tensor) -> str:
    return hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def build_dataset(name: str, split: str = "test", data_dir=None, model=None, limit: Optional[int] = None,
                  seed: int = 0, num_classes: Optional[int] = None) -> tuple[Dataset, DataSpec]:
    """The dataset ``name`` preprocessed for ``model`` and a :class:`DataSpec` describing it."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; choose from {', '.join(DATASETS)}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    cfg = input_config(model)
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist(split, data_dir)
        if cfg["in_chans"] == 1:
            mean, std = (FMNIST_MEAN,), (FMNIST_STD,)
        else:
            mean, std = cfg["mean"], cfg["std"]
        tf = grayscale_transform(cfg["in_chans"], cfg["img_size"], mean, std)
        ds: Dataset = TensorImages(images, labels, tf)
        all_labels = labels
        n_classes, source, layout = len(FMNIST_CLASSES), None, None
        carved = FMNIST_SPLIT_TEXT["val" if split == "validation" else split]
    elif name == "synthetic":
        n = limit or 64
        g = torch.Generator().manual_seed(seed)
        k = num_classes or cfg.get("num_classes") or 10
        images = torch.randint(0, 256, (n, cfg["img_size"], cfg["img_size"]), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, k, (n,), generator=g)
        tf = grayscale_transform(cfg["in_chans"], cfg["img_size"], (0.5,) * cfg["in_chans"], (0.25,) * cfg["in_chans"])
        ds = TensorImages(images, labels, tf)
        all_labels = labels
        n_classes, source, layout = k, None, None
    else:  # imagenet / folder
        root, layout = folder_split(name, split, data_dir)
        ds, all_labels = _read_folder(name, root, model)
        n_classes, source = len(ds.classes), str(root)
    if name != "fashion-mnist":
        carved = None
    available = len(ds)
    if limit is not None:
        idx = stratified_subset(all_labels, limit, seed)
        ds = torch.utils.data.Subset(ds, idx.tolist())
        sha = _sha_of_indices(idx)
    else:
        sha = None
    spec = DataSpec(name=name, split=split, n=len(ds), limit=limit, seed=seed,
                    data_dir=str(data_dir) if data_dir else None, indices_sha=sha,
                    available=available, classes=n_classes, source=source, layout=layout,
                    carved=carved)
    return ds, spec


def eval_data_config(model) -> dict[str, Any]:
    """timm's eval data config of ``model`` (resize, crop, interpolation, mean, std) at its own input size."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    mi = input_config(model)
    # a model built at another size than its pretrained config's (img_size=...) keeps the
    # config's mean/std and crop, not its resolution
    cfg["input_size"] = (cfg["input_size"][0], mi["img_size"], mi["img_size"])
    # mean/std per input channel (a 1-channel model with ImageNet's 3-channel statistics: their mean)
    c = mi["in_chans"]
    for k in ("mean", "std"):
        v = tuple(cfg[k])
        if len(v) != c:
            cfg[k] = (sum(v) / len(v),) * c
    cfg["input_size"] = (c, *cfg["input_size"][1:])
    return cfg


SPLITS = ("train", "val", "test")


def _has_subdirs(d: Path) -> bool:
    try:
        return any(c.is_dir() for c in d.iterdir())
    except OSError:
        return False


def folder_split(name: str, split: str, data_dir) -> tuple[Path, str]:
    """The class-folder root to read for ``split``, and the layout found.

    ``DIR/train/<class>``, ``DIR/val/<class>`` (the layout ``tokenbench train`` reads): the
    ``split`` folder, ``"split"``.  ``DIR/<class>`` with no split folders: ``DIR`` itself,
    ``"flat"``.  A split folder counts only if it holds sub-folders, so a flat set with a
    class named ``train`` stays flat.
    """
    if data_dir is None:
        raise UserError(f"--data-dir is required for {name} (a folder of class sub-folders, or of "
                        "train/ and val/ split folders holding them)")
    root = require_dir(data_dir)
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not any(_has_subdirs(root / s) for s in present):
        return root, "flat"
    if split not in present:
        hint = f"; use --split {' or --split '.join(present)}" if present else ""
        raise UserError(f"{root} has no {split}/ split (it has {', '.join(s + '/' for s in present)}){hint}")
    return root / split, "split"


def _load_image(path: str, mode: str):
    """One image of a folder dataset; a file PIL cannot read is the user's to fix (one line)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}; remove or fix it ({e.__class__.__name__})") from None


def _read_folder(name: str, root: Path, model, transform=None):
    """The images under ``root/<class>/``, converted to the model's channels (1: grayscale,
    3: RGB) and preprocessed with its timm data config (or with ``transform``)."""
    import functools

    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected <class>/<image> files, torchvision layout)")
    if name == "imagenet" and len(classes) != 1000:
        raise UserError(f"{root} has {len(classes)} class folders; an ImageNet split has 1000")
    in_chans = input_config(model)["in_chans"]
    if in_chans not in (1, 3):
        raise UserError(f"the model takes {in_chans}-channel input; image folders give 1 (grayscale) or 3 (RGB)")
    import timm.data
    from torchvision.datasets import ImageFolder

    if transform is None:
        transform = timm.data.create_transform(**eval_data_config(model), is_training=False)
    loader = functools.partial(_load_image, mode="L" if in_chans == 1 else "RGB")
    ds = ImageFolder(str(root), transform=transform, loader=loader, allow_empty=True)
    if len(ds) == 0:
        raise UserError(f"{root} holds no images")
    return ds, torch.tensor(ds.targets)


def _image_folder(name: str, split: str, data_dir, model, transform=None):
    """ImageNet-style class folders (:func:`folder_split`), preprocessed with the model's timm
    data config (or with ``transform``, e.g. a training transform, when given)."""
    root, _ = folder_split(name, split, data_dir)
    return _read_folder(name, root, model, transform)
