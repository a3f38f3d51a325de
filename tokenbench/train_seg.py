"""Training a dense model: per-pixel cross-entropy through the shared resumable loop.

The scenes are held in memory, preprocessed once; a training batch flips each scene and its
mask together left-right with probability 1/2 (seeded by step).  Intermediate evaluations
report mIoU (percent) on the val scenes, the final one on all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data_scenes import IGNORE, SCENES
from .errors import UserError
from .train import TrainConfig, check_run_dir, train_loop
from .train_data import _step_indices

# Not tuned: a starting point for training the embedded dense models.
SEG_RECIPE = TrainConfig(epochs=30, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=300,
                         label_smoothing=0.0, shift=0, hflip=True, erase_p=0.0, ckpt_every=200, eval_limit=500,
                         grad_clip=1.0)


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
        from .measure_dense import confusion, mean_iou

        x, y = (self.eval_x[:limit], self.eval_y[:limit]) if limit else (self.eval_x, self.eval_y)
        was = model.training
        model.eval()
        total = torch.zeros(self.classes, self.classes, dtype=torch.long)
        with torch.no_grad():
            for i in range(0, len(x), 200):
                pred = model(x[i:i + 200].to(dev)).argmax(1)
                total += confusion(pred, y[i:i + 200].to(dev), self.classes).sum(0).cpu()
        model.train(was)
        return 100.0 * float(mean_iou(total))

    def describe(self) -> dict:
        return dict(self.info)


def dense_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def train_seg(model: str, out_dir: Path, cfg: Optional[TrainConfig] = None, data: str = SCENES, data_dir=None,
              checkpoint: Optional[str] = None, arch: Optional[dict] = None, train_limit: Optional[int] = None,
              progress: bool = True, force: bool = False) -> dict:
    """Train dense model ``model`` on ``data`` (its train split; mIoU on its val split) into ``out_dir``:
    ``model.pt`` (+ .sha256), ``config.json`` (with the architecture) and ``train_log.csv``, whose
    ``test_acc`` column holds the val mIoU."""
    from .data_scenes import build_dense_dataset
    from .models_seg import build_seg_model
    from .runner_dense import task_of

    task_of(model, data, "segmentation")
    if data != SCENES:
        raise UserError(f"training reads {SCENES} for now; {data} is measured by `tokenbench eval`")
    cfg = cfg or SEG_RECIPE
    check_run_dir(out_dir, force)
    torch.manual_seed(cfg.seed)
    net = build_seg_model(model, arch)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
    train_ds, _ = build_dense_dataset(data, "train", data_dir, model=net, limit=train_limit)
    val_ds, vspec = build_dense_dataset(data, "val", data_dir, model=net)
    tx, ty = dense_tensors(train_ds)
    vx, vy = dense_tensors(val_ds)
    source = SegmentationSource(tx, ty, vx, vy, vspec.classes,
                                {"data": data, "task": "segmentation", "eval": "mIoU (%) on the val split"})
    return train_loop(net, source, cfg=cfg, out_dir=out_dir, loss_fn=pixel_cross_entropy,
                      config_extra={"model": model, "arch": net.tokenbench_arch}, progress=progress, force=force)
