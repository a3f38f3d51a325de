"""Training a dense model: per-pixel cross-entropy through the shared resumable loop.

The model is an embedded dense model (``default-seg``, ``default-convnext-seg``) or any timm
backbone given a linear head (:mod:`tokenbench.models_seg_timm`; frozen by default, fine-tuned
with ``frozen=False``).  The scenes are held in memory, preprocessed once; a segmentation
folder (VOC or ADE20K layout) is read by a DataLoader, each image with the evaluation
transform.  A training batch flips each image and its mask together left-right with
probability 1/2 (seeded by step and position).  Intermediate evaluations report mIoU
(percent) on the val split, the final one on all of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data_scenes import IGNORE, SCENES
from .errors import UserError
from .train import TrainConfig, check_run_dir, train_loop
from .train_data import _step_indices

# From scratch (the fallback where no classification weights start the encoder): not tuned.
SEG_RECIPE = TrainConfig(epochs=30, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=300,
                         label_smoothing=0.0, shift=0, hflip=True, erase_p=0.0, ckpt_every=200, eval_limit=500,
                         grad_clip=1.0)
# The embedded dense models start their encoder from the committed classification model of their
# family (:data:`~tokenbench.models_seg.ENCODER_INIT`), so a short fine-tune suffices: the new
# decoder at ``lr``, the pretrained encoder at ``lr * backbone_lr_scale``, one thread.
SEG_RECIPES = {
    "default-seg": TrainConfig(epochs=6, batch_size=32, lr=3e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=100,
                               label_smoothing=0.0, shift=0, hflip=True, erase_p=0.0, eval_every=250,
                               ckpt_every=50, eval_limit=300, threads=1, grad_clip=1.0, backbone_lr_scale=0.5),
    "default-convnext-seg": TrainConfig(epochs=6, batch_size=32, lr=3e-3, min_lr=1e-5, weight_decay=0.05,
                                        warmup_steps=100, label_smoothing=0.0, shift=0, hflip=True, erase_p=0.0,
                                        eval_every=250, ckpt_every=50, eval_limit=300, threads=1, grad_clip=1.0,
                                        backbone_lr_scale=1.0),
}

# Any timm backbone's head: a starting point, not tuned; with --finetune the backbone learns at a
# tenth of the head's rate (a pretrained backbone would be disturbed at the new head's rate).
BACKBONE_SEG_RECIPE = dataclasses.replace(SEG_RECIPE, backbone_lr_scale=0.1)


def seg_recipe(model: str) -> TrainConfig:
    """The training recipe of dense model ``model`` (an embedded one's, or a timm backbone's)."""
    from .models_seg import SEG_ARCH

    return SEG_RECIPES.get(model) or (SEG_RECIPE if model in SEG_ARCH else BACKBONE_SEG_RECIPE)


def pixel_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(loss, logits, metrics) of a dense model: cross-entropy over scored pixels."""
    logits = model(x)
    return F.cross_entropy(logits, y, ignore_index=IGNORE), logits, {}


class SegmentationSource:
    """Images [N, C, H, W] (preprocessed) and masks [N, H, W] in memory, for :func:`train_loop`."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 classes: int, info: dict):
        self.train_x, self.train_y, self.eval_x, self.eval_y = train_x, train_y, eval_x, eval_y
        self.classes, self.info = classes, dict(info)

    @property
    def n(self) -> int:
        return len(self.train_y)

    def batches(self, start: int, stop: int, steps_per_epoch: int, cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, idx in _step_indices(start, stop, self.n, cfg.batch_size, cfg.seed):
            x, y = self.train_x[idx], self.train_y[idx]
            if cfg.hflip:
                g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                y = torch.where(flip[:, None, None], y.flip(-1), y)
            yield x, y

    def evaluate(self, model: nn.Module, dev: torch.device, limit: Optional[int] = None) -> float:
        x, y = (self.eval_x[:limit], self.eval_y[:limit]) if limit else (self.eval_x, self.eval_y)
        return pixel_miou(model, dev, ((x[i:i + 200], y[i:i + 200]) for i in range(0, len(x), 200)), self.classes)

    def describe(self) -> dict:
        return dict(self.info)


def pixel_miou(model: nn.Module, dev: torch.device, pairs, classes: int) -> float:
    """mIoU (percent) of ``model`` over batches ``pairs`` of (images, masks), in eval mode."""
    from .measure.dense import confusion, mean_iou

    was = model.training
    model.eval()
    total = torch.zeros(classes, classes, dtype=torch.long)
    with torch.no_grad():
        for x, y in pairs:
            pred = model(x.to(dev)).argmax(1)
            total += confusion(pred, y.to(dev), classes).sum(0).cpu()
    model.train(was)
    return 100.0 * float(mean_iou(total))


class _FlippedPairs(torch.utils.data.Dataset):
    """Indexed by ``(index, seed)``: the image and mask ``index``, flipped together left-right with
    probability 1/2 under ``seed`` when ``hflip``."""

    def __init__(self, ds, hflip: bool):
        self.ds, self.hflip = ds, hflip

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, seed = key
        x, y = self.ds[i]
        if self.hflip and torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class FolderSegSource:
    """A segmentation folder's train and val splits, read by DataLoaders, for :func:`train_loop`."""

    def __init__(self, train_ds, eval_ds, classes: int, info: dict, num_workers: int = 0):
        self.train_ds, self.eval_ds, self.classes, self.info = train_ds, eval_ds, classes, dict(info)
        self.num_workers = num_workers

    @property
    def n(self) -> int:
        return len(self.train_ds)

    def batches(self, start: int, stop: int, steps_per_epoch: int, cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from .train_data import StepBatchSampler

        sampler = StepBatchSampler(self.n, cfg.batch_size, cfg.seed, start, stop)
        yield from torch.utils.data.DataLoader(_FlippedPairs(self.train_ds, cfg.hflip), batch_sampler=sampler,
                                               num_workers=self.num_workers)

    def evaluate(self, model: nn.Module, dev: torch.device, limit: Optional[int] = None) -> float:
        ds = torch.utils.data.Subset(self.eval_ds, range(min(limit, len(self.eval_ds)))) if limit else self.eval_ds
        loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=self.num_workers)
        return pixel_miou(model, dev, loader, self.classes)

    def describe(self) -> dict:
        return dict(self.info)


def dense_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def dense_source(data: str, data_dir, net: nn.Module, cfg: TrainConfig, train_limit: Optional[int] = None):
    """The batch source of dense dataset ``data`` for :func:`train_loop`: its train split (the first
    ``train_limit`` images), mIoU on its val split."""
    from .data_scenes import build_dense_dataset

    train_ds, _ = build_dense_dataset(data, "train", data_dir, model=net, limit=train_limit)
    val_ds, vspec = build_dense_dataset(data, "val", data_dir, model=net)
    info = {"data": data, "task": "segmentation", "eval": "mIoU (%) on the val split"}
    if data == SCENES:
        tx, ty = dense_tensors(train_ds)
        vx, vy = dense_tensors(val_ds)
        return SegmentationSource(tx, ty, vx, vy, vspec.classes, info)
    from .train_data import default_num_workers

    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    return FolderSegSource(train_ds, val_ds, vspec.classes, info, workers)


def encoder_init(model: str) -> tuple[dict, dict]:
    """The committed classification weights that start dense model ``model``'s encoder (checksum
    verified) and where they came from."""
    from .models import embedded_paths, verify_checksum
    from .models_seg import ENCODER_INIT
    from .outputs import repository_relative

    name = ENCODER_INIT[model]
    p = embedded_paths(name=name)
    sha = verify_checksum(p["ckpt"], p["sha"], name)
    state = torch.load(p["ckpt"], map_location="cpu", weights_only=True)
    return state, {"model": name, "checkpoint": repository_relative(p["ckpt"]), "weights": f"sha256:{sha}"}


def split_groups(net: nn.Module, weight_decay: float, encoder_scale: Optional[float]) -> list[dict]:
    """Optimiser groups: the decoder at the full rate, the encoder at ``encoder_scale`` times it."""
    from .train import param_groups

    groups = []
    for part, scale in ((net.decoder_modules(), 1.0), (net.encoder, 1.0 if encoder_scale is None else encoder_scale)):
        groups += [{**g, "lr_scale": scale} for g in param_groups(part, weight_decay) if g["params"]]
    return groups


def train_seg(model: str, out_dir: Path, cfg: Optional[TrainConfig] = None, data: str = SCENES, data_dir=None,
              checkpoint: Optional[str] = None, arch: Optional[dict] = None, train_limit: Optional[int] = None,
              progress: bool = True, force: bool = False, head: Optional[str] = None, frozen: bool = True,
              pretrained: bool = False, init_encoder: bool = False, reschedule: bool = False) -> dict:
    """Train dense model ``model`` on ``data`` (its train split; mIoU on its val split) into ``out_dir``:
    ``model.pt`` (+ .sha256), ``config.json`` (with the architecture) and ``train_log.csv``, whose
    ``test_acc`` column holds the val mIoU.

    ``model`` is an embedded dense model (``arch`` overrides its architecture) or a timm backbone,
    which gets a ``head`` (``linear`` or ``linear4``) on its feature maps, its weights frozen
    unless ``frozen`` is False.  ``checkpoint`` starts the whole dense model; ``init_encoder`` starts
    an embedded dense model's encoder from the committed classification model of its family."""
    from .data_scenes import dense_classes
    from .models_seg import SEG_ARCH, build_seg_model, init_encoder as load_encoder
    from .models_seg_timm import build_timm_seg
    from .runner_dense import task_of

    embedded = model in SEG_ARCH
    task_of(model, data, "segmentation", new_decoder=not embedded)
    cfg = cfg or seg_recipe(model)
    check_run_dir(out_dir, force, reschedule)
    if data != SCENES:  # a folder's layout and splits, before a backbone is built or downloaded
        from .data_seg_folders import check_layout_dir, layout_files

        check_layout_dir(data, data_dir)
        for split in ("train", "val"):
            layout_files(data, data_dir, split)
    torch.manual_seed(cfg.seed)
    classes = dense_classes(data)
    if embedded:
        net = build_seg_model(model, {"classes": classes, **(arch or {})})
    else:
        net = build_timm_seg(model, classes, head or "linear", frozen, pretrained)
    extra: dict = {"model": model, "arch": net.tokenbench_arch}
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state.get("model", state))
        except RuntimeError as e:
            raise UserError(f"{checkpoint} does not hold {model}'s weights ({str(e).splitlines()[0]})") from None
    elif init_encoder and embedded:
        state, extra["init"] = encoder_init(model)
        extra["init"]["left_out"] = load_encoder(net, state)
    source = dense_source(data, data_dir, net, cfg, train_limit)
    groups = split_groups(net, cfg.weight_decay, cfg.backbone_lr_scale)
    return train_loop(net, source, cfg=cfg, out_dir=out_dir, loss_fn=pixel_cross_entropy, config_extra=extra,
                      progress=progress, force=force, groups=groups, reschedule=reschedule)
