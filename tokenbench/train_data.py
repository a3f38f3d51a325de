"""Where training batches come from: in-memory tensors, or image folders through a DataLoader.

A *batch source* tells the training loop three things:

- ``n``: how many training images there are (the epoch's length is ``n // batch_size``
  steps; a last partial batch is dropped);
- ``batches(start, stop, steps_per_epoch, cfg)``: the CPU batches ``(x, y)`` of steps
  ``start .. stop - 1``;
- ``evaluate(model, device, limit)``: top-1 accuracy (percent) on its evaluation set,
  on its first / stratified ``limit`` images when ``limit`` is given.

Both sources draw the images of step ``s`` from the same seeded per-epoch permutation
(:func:`epoch_perm`, batch ``i`` of an epoch is ``perm[i * bs:(i + 1) * bs]``) and seed
every random choice from ``(seed, step)``, so a run resumed at step ``s`` sees exactly the
images and augmentations an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError, did_you_mean

# synthetic training data: sizes of the two splits (random uint8 images, fixed seeds)
SYNTHETIC_TRAIN = 256
SYNTHETIC_VAL = 64
SYNTHETIC_SEEDS = {"train": 0, "val": 1}

# The DeiT training recipe's per-image augmentation (timm's `create_transform` arguments).
# DeiT also mixes images (mixup 0.8, cutmix 1.0); that is left out here.
FOLDER_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}


def epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training images in ``epoch`` (a function of ``seed`` and ``epoch`` only)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _step_indices(start: int, stop: int, n: int, batch_size: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(step, indices)`` for steps ``start .. stop - 1``."""
    steps_per_epoch = n // batch_size
    perm, perm_epoch = None, -1
    for step in range(start, stop):
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            perm = epoch_perm(n, seed, epoch)
            perm_epoch = epoch
        i = step % steps_per_epoch
        yield step, perm[i * batch_size:(i + 1) * batch_size]


def _move(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    return x.to(dev, non_blocking=True)


# --------------------------------------------------------------------------- tensors

def fmnist_tensors(data_dir=None, splits: tuple[str, ...] = ("train", "test")) -> list[torch.Tensor]:
    """Fashion-MNIST ``splits`` as normalised float images [N, 1, 28, 28] and labels:
    ``[train_x, train_y, test_x, test_y]`` by default."""
    from .data import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist

    out = []
    for split in splits:
        x, y = load_fashion_mnist(split, data_dir)
        x = (x.float().div(255.0).unsqueeze(1) - FMNIST_MEAN) / FMNIST_STD
        out += [x.contiguous(), y]
    return out


def augment(x: torch.Tensor, cfg, g: torch.Generator) -> torch.Tensor:
    """Batched augmentation of float images [B, C, H, W]: shift, flip, erase (the
    ``shift``, ``hflip`` and ``erase_p`` of ``cfg``, a :class:`tokenbench.train.TrainConfig`)."""
    b, _, h, w = x.shape
    if cfg.shift > 0:
        s = cfg.shift
        padded = F.pad(x, (s, s, s, s), value=float(x.min()))
        dx = torch.randint(0, 2 * s + 1, (b,), generator=g)
        dy = torch.randint(0, 2 * s + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # [B, H]
        cols = (dx[:, None] + torch.arange(w)[None, :])  # [B, W]
        bi = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if cfg.hflip:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.erase_p > 0:
        erase = torch.rand(b, generator=g) < cfg.erase_p
        eh = torch.randint(h // 5, h // 2 + 1, (b,), generator=g)
        ew = torch.randint(w // 5, w // 2 + 1, (b,), generator=g)
        y0 = (torch.rand(b, generator=g) * (h - eh + 1)).long()
        x0 = (torch.rand(b, generator=g) * (w - ew + 1)).long()
        ys = torch.arange(h)[None, :]
        xs = torch.arange(w)[None, :]
        my = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])
        mx = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        m = (my[:, :, None] & mx[:, None, :]) & erase[:, None, None]
        x = x.masked_fill(m[:, None], 0.0)
    return x


@torch.inference_mode()
def evaluate_tensors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (percent) of ``model`` on preprocessed float images."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        out = model(images[i:i + batch_size])
        correct += int((out.argmax(-1) == labels[i:i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(labels))


class TensorSource:
    """Preprocessed images held in memory, augmented in batches (shift, flip, erase).

    This is the loop's original path, unchanged: the Fashion-MNIST runs (and the embedded
    model's checkpoint) depend on its exact permutation and augmentation streams.
    """

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 info: Optional[dict] = None):
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.info = dict(info or {})

    @property
    def n(self) -> int:
        return len(self.train_y)

    def batches(self, start: int, stop: int, steps_per_epoch: int, cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, idx in _step_indices(start, stop, self.n, cfg.batch_size, cfg.seed):
            g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
            yield augment(self.train_x[idx], cfg, g), self.train_y[idx]

    def evaluate(self, model: nn.Module, dev: torch.device, limit: Optional[int] = None) -> float:
        x, y = self.test_x, self.test_y
        if limit:
            x, y = x[:limit], y[:limit]
        return evaluate_tensors(model, x.to(dev), y.to(dev))

    def describe(self) -> dict:
        return dict(self.info)


# --------------------------------------------------------------------------- image folders

class _RngScope:
    """Seed Python's, NumPy's and torch's global generators for one image, then put them back.

    timm's training transforms draw from all three; seeding them per image makes an
    image's augmentation a function of ``(seed, step, position)`` alone, whichever
    DataLoader worker (or the main process) loads it.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed % 2**63)

    def __exit__(self, *exc):
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)
        return False


def sample_seed(seed: int, step: int, j: int) -> int:
    """The augmentation seed of the ``j``-th image of training step ``step``."""
    return (seed * 1000003 + step) * 1000003 + j


class _SeededImages(torch.utils.data.Dataset):
    """Indexed by ``(index, seed)``: the image ``index``, transformed under ``seed``."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, s = key
        with _RngScope(s):
            return self.ds[i]


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` for steps ``start .. stop - 1``, in the seeded per-epoch order.

    Epochs follow each other within one sampler (batch ``i`` of epoch ``e`` is
    ``epoch_perm(n, seed, e)[i * bs:(i + 1) * bs]``, the last partial batch dropped), so
    the DataLoader's workers live across epoch boundaries, and a run resumed at step
    ``start`` starts mid-epoch where it stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n // batch_size == 0:
            raise UserError(f"the training set has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step, idx in _step_indices(self.start, self.stop, self.n, self.batch_size, self.seed):
            yield [(int(i), sample_seed(self.seed, step, j)) for j, i in enumerate(idx.tolist())]


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


class FolderSource:
    """Class folders (``imagenet`` / ``folder``) loaded by a ``torch.utils.data.DataLoader``.

    Training images get the DeiT recipe's per-image augmentation through
    ``timm.data.create_transform(is_training=True)`` (random-resized crop, flip,
    RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic, the model's
    mean/std), *without* DeiT's mixup/cutmix.  Evaluation uses the ``val`` split through
    :func:`tokenbench.data.build_dataset`, with the model's own eval preprocessing.
    """

    def __init__(self, name: str, train_ds, eval_ds, eval_ds_limited, eval_limit: Optional[int],
                 info: dict, num_workers: Optional[int] = None, pin_memory: bool = False):
        self.name, self.train_ds = name, train_ds
        self.eval_ds, self.eval_ds_limited, self.eval_limit = eval_ds, eval_ds_limited, eval_limit
        self.info = info
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = pin_memory

    @property
    def n(self) -> int:
        return len(self.train_ds)

    def _loader(self, ds, **kw):
        w = self.num_workers
        return torch.utils.data.DataLoader(ds, num_workers=w, pin_memory=self.pin_memory,
                                           **({"prefetch_factor": 4} if w > 0 else {}), **kw)

    def batches(self, start: int, stop: int, steps_per_epoch: int, cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = StepBatchSampler(self.n, cfg.batch_size, cfg.seed, start, stop)
        yield from self._loader(_SeededImages(self.train_ds), batch_sampler=sampler)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, dev: torch.device, limit: Optional[int] = None) -> float:
        ds = self.eval_ds
        if limit:
            ds = self.eval_ds_limited if limit == self.eval_limit else _limited(self.eval_ds, limit)
        was = model.training
        model.eval()
        correct, total = 0, 0
        for x, y in self._loader(ds, batch_size=256, shuffle=False):
            out = model(_move(x, dev))
            correct += int((out.argmax(-1) == _move(y, dev)).sum())
            total += len(y)
        model.train(was)
        return 100.0 * correct / max(1, total)

    def describe(self) -> dict:
        return dict(self.info)


def _limited(ds, limit: int):
    from .data import stratified_subset

    idx = stratified_subset(torch.tensor(_targets(ds)), limit, 0)
    return torch.utils.data.Subset(ds, idx.tolist())


def _targets(ds) -> list:
    if isinstance(ds, torch.utils.data.Subset):
        t = _targets(ds.dataset)
        return [t[i] for i in ds.indices]
    return list(ds.targets)


def _classes(ds) -> list:
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return list(ds.classes)


def _split_dirs(name: str, data_dir) -> tuple[Path, Path]:
    """``<data_dir>/train`` and ``<data_dir>/val``, or a one-line UserError saying what is wrong."""
    if data_dir is None:
        raise UserError(f"--data-dir is required for {name} (a folder with train/ and val/ class folders)")
    from .data import require_dir

    root = require_dir(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ split: training on {name} reads {root}/train/<class>/<image> "
                            f"and evaluates on {root}/val/<class>/<image>")
    return root / "train", root / "val"


def check_data(data: str, data_dir) -> None:
    """The cheap checks of ``data_dir`` for ``data`` (the split folders of image-folder data)."""
    if data in ("imagenet", "folder"):
        _split_dirs(data, data_dir)


def train_transform(model) -> tuple[Any, dict]:
    """timm's training transform for ``model`` (DeiT's recipe without mixup/cutmix) and its summary."""
    import timm.data

    from .backbones import input_config

    mi = input_config(model)
    args = {"input_size": (mi["in_chans"], mi["img_size"], mi["img_size"]), **FOLDER_AUGMENT,
            "mean": tuple(mi["mean"]), "std": tuple(mi["std"])}
    tf = timm.data.create_transform(**args, is_training=True)
    summary = {"timm_create_transform": {**args, "is_training": True}, "mixup": None, "cutmix": None,
               "note": "DeiT's per-image augmentation; its mixup (0.8) and cutmix (1.0) are not applied",
               "seeding": "each image's augmentation seeded from (seed, step, position in batch)"}
    return tf, summary


def build_source(data: str, data_dir, model: nn.Module, cfg) -> "TensorSource | FolderSource":
    """The training source for ``data`` in fashion-mnist / imagenet / folder / synthetic, preprocessed for ``model``."""
    from .backbones import input_config
    from .data import DATASETS, _image_folder, build_dataset, eval_data_config

    if data not in DATASETS:
        raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; choose from {', '.join(DATASETS)}")
    tensor_aug = {"shift": cfg.shift, "hflip": cfg.hflip, "erase_p": cfg.erase_p,
                  "note": "batched tensor augmentation (tokenbench.train_data.augment), seeded per step"}
    if data == "fashion-mnist":
        tx, ty, vx, vy = fmnist_tensors(data_dir)
        return TensorSource(tx, ty, vx, vy, {"data_dir": data_dir, "eval_split": "test",
                                             "train_transform": tensor_aug})
    mi = input_config(model)
    if data == "synthetic":
        parts = []
        for split, n in (("train", SYNTHETIC_TRAIN), ("val", SYNTHETIC_VAL)):
            ds, _ = build_dataset("synthetic", split, model=model, limit=n, seed=SYNTHETIC_SEEDS[split])
            parts += [torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])]
        return TensorSource(*parts, {"data_dir": None, "eval_split": "val", "train_transform": tensor_aug,
                                     "synthetic": {"train": SYNTHETIC_TRAIN, "val": SYNTHETIC_VAL,
                                                   "seeds": SYNTHETIC_SEEDS, "img_size": mi["img_size"]}})
    # imagenet / folder
    train_dir, val_dir = _split_dirs(data, data_dir)
    if mi["in_chans"] != 3:
        raise UserError(f"{data} images are RGB but the model takes {mi['in_chans']}-channel input")
    tf, summary = train_transform(model)
    train_ds, _ = _image_folder(data, "train", data_dir if data == "imagenet" else train_dir, model, transform=tf)
    eval_dir = data_dir if data == "imagenet" else val_dir
    eval_ds, _ = build_dataset(data, "val", eval_dir, model=model)
    limited = None
    if cfg.eval_limit:
        limited, _ = build_dataset(data, "val", eval_dir, model=model, limit=cfg.eval_limit)
    classes = list(train_ds.classes)
    if _classes(eval_ds) != classes:
        raise UserError(f"{train_dir} and {val_dir} hold different class folders; they must match one to one")
    k = mi.get("num_classes")
    if k and len(classes) > k:
        raise UserError(f"{train_dir} has {len(classes)} classes but the model's head has {k} outputs")
    info = {"data_dir": str(data_dir), "train_dir": str(train_dir), "eval_split": "val", "eval_dir": str(val_dir),
            "train_images": len(train_ds), "eval_images": len(eval_ds), "classes": len(classes),
            "train_transform": summary,
            "eval_transform": {"timm_create_transform": {**eval_data_config(model), "is_training": False}}}
    return FolderSource(data, train_ds, eval_ds, limited, cfg.eval_limit, info, num_workers=cfg.num_workers,
                        pin_memory=torch.device(cfg.device).type == "cuda")
