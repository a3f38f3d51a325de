"""Training a dense model with a method in the loop: the method applied to the encoder, the grid
restored before the decoder (as at evaluation), the per-pixel loss and the method's own terms.

A method's :meth:`~tokenbench.registry.Method.dense_train_setup` gives its loss (DynamicViT: ratio
loss and distillation from the frozen dense teacher); without one the reduced model is fine-tuned
with the per-pixel cross-entropy.  A learned method that adds losses for classification but has
no dense ones is refused.  Optimiser groups are the method's over the encoder (new parts at the
full rate, the pretrained backbone scaled down and frozen at first); the decoder joins the
backbone's group settings.  The run directory is that of :func:`tokenbench.train.train_loop`;
``config.json`` records the method and its parameters, and ``model.pt`` (the dense model with
the method's learned parts) loads with ``tokenbench eval MODEL --method M --checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data_scenes import IGNORE, SCENES
from .errors import UserError
from .registry import DenseOutputs, Method
from .train import TrainConfig, check_run_dir, param_groups, train_loop


def check_dense_trainable(cls: type[Method]) -> None:
    """Refuse, in one line, a learned method whose training losses exist for classification only."""
    if cls.learned and cls.train_setup is not Method.train_setup and cls.dense_train_setup is Method.dense_train_setup:
        raise UserError(f"{cls.name} trains with classification losses only and has no dense training; train it on "
                        "a classification dataset, or fine-tune the dense model with a method that has one")


def dense_loss(student: nn.Module, teacher: nn.Module, method_loss):
    """The :data:`~tokenbench.registry.LossFn` of a dense model with a method: per-pixel
    cross-entropy, or the method's ``method_loss`` (a DenseLossFn) built on it."""

    def loss_fn(model, x, y):
        logits, maps = model.logits_and_maps(x)
        pixel = F.cross_entropy(logits, y, ignore_index=IGNORE)
        if method_loss is None:
            return pixel, logits, {}

        def teacher_out():
            with torch.no_grad():
                return teacher.logits_and_maps(x)

        loss, metrics = method_loss(model.encoder, DenseOutputs(logits, maps, pixel, teacher_out))
        return loss, logits, metrics

    loss_fn.metric_names = tuple(getattr(method_loss, "metric_names", ()))
    return loss_fn


def method_groups(meth: Method, net: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The method's optimiser groups over the encoder, the decoder with the backbone's settings
    (default, where the method has none: every weight at ``lr * backbone_lr_scale``, 0.1 if unset)."""
    scale = cfg.backbone_lr_scale
    groups = meth.param_groups(net.encoder, cfg.weight_decay, **({} if scale is None else {"backbone_lr_scale": scale}))
    if groups is None:
        groups = [{**g, "lr_scale": 0.1 if scale is None else scale, "fix_epochs": 0.0}
                  for g in param_groups(net, cfg.weight_decay) if g["params"]]
        return groups
    for g in groups:
        if g.get("fix_epochs", 0) > 0:
            g["fix_epochs"] = cfg.fix_epochs if cfg.fix_epochs is not None else min(g["fix_epochs"], cfg.epochs / 6)
    backbone = min(groups, key=lambda g: g.get("lr_scale", 1.0))
    settings = {"lr_scale": backbone.get("lr_scale", 1.0), "fix_epochs": backbone.get("fix_epochs", 0.0)}
    groups += [{**g, **settings} for g in param_groups(net.decoder_modules(), cfg.weight_decay) if g["params"]]
    return groups


def train_seg_method(model: str, method: str, params: dict, out_dir: Path, cfg: TrainConfig, data: str = SCENES,
                     data_dir=None, checkpoint: Optional[str] = None, teacher_checkpoint: Optional[str] = None,
                     loss_weights: Optional[dict] = None, train_limit: Optional[int] = None,
                     progress: bool = True, force: bool = False, reschedule: bool = False) -> dict:
    """Train dense model ``model`` with ``method`` (``params``: its model and training-only
    parameters) applied to its encoder, into ``out_dir``; the student starts from ``checkpoint``
    (default: the model's committed weights), the teacher from ``teacher_checkpoint`` (default:
    the student's starting weights)."""
    from .registry import get_method
    from .runner_dense import load_dense, task_of

    task_of(model, data, "segmentation", checkpoint=checkpoint)
    cls = get_method(method)
    check_dense_trainable(cls)
    p, tp = cls.validate_training(params)
    check_run_dir(out_dir, force, reschedule)
    if data != SCENES:
        from .data_seg_folders import check_layout_dir, layout_files

        check_layout_dir(data, data_dir)
        for split in ("train", "val"):
            layout_files(data, data_dir, split)
    torch.manual_seed(cfg.seed)
    # the method applied before the checkpoint loads, which may carry its learned parts
    student, prov = load_dense(model, method, p, checkpoint)
    teacher, tprov = load_dense(model, "none", {}, teacher_checkpoint or checkpoint)
    teacher.eval().requires_grad_(False).to(cfg.device)
    meth = cls()
    student.train()
    method_loss = meth.dense_train_setup(student.encoder, {**p, **tp}, loss_weights)
    if method_loss is None and loss_weights:
        raise UserError(f"{method} has no loss weights to set on a dense model")
    loss_fn = dense_loss(student, teacher, method_loss)
    groups = method_groups(meth, student, cfg)

    from .train_seg import dense_source

    source = dense_source(data, data_dir, student, cfg, train_limit)
    extra = {"model": model, "arch": student.tokenbench_arch, "method": method, "params": p,
             **({"train_params": tp} if tp else {}), "init": prov.get("weights"), "teacher": tprov.get("weights"),
             "loss_weights": loss_weights or {}}
    hook = lambda m, ep: meth.train_step(m.encoder, {**p, **tp}, ep)  # noqa: E731
    return train_loop(student, source, cfg=cfg, out_dir=out_dir, loss_fn=loss_fn, config_extra=extra,
                      progress=progress, log_extra_cols=loss_fn.metric_names, groups=groups, step_hook=hook,
                      force=force, reschedule=reschedule)
