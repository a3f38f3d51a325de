"""`tokenbench train DENSE_MODEL --method M`: a dense model trained with a method in the loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from ..errors import UserError


def train_dense_method(model: str, method: str, task: Optional[str], set_: Optional[List[str]],
                       loss_weight: Optional[List[str]], data: str, data_dir: Optional[Path], out: Optional[Path],
                       force: bool, as_json: bool, overrides: dict, seed: int, max_steps: Optional[int], device: str,
                       checkpoint: Optional[Path], teacher_checkpoint: Optional[Path], head: Optional[str],
                       finetune: bool, pretrained: bool) -> None:
    """Train dense model ``model`` with ``method`` applied to its encoder
    (:mod:`tokenbench.train_seg_method`), resumably, from its committed weights or ``checkpoint``."""
    from ..measure.env import resolve_device
    from ..models_seg import is_dense_model
    from ..registry import get_method, parse_set
    from ..runner_dense import task_of
    from ..train_seg import seg_recipe
    from ..train_seg_method import check_dense_trainable, train_seg_method
    from .train import default_run_name, parse_loss_weights, print_train_summary

    for flag, path in (("--checkpoint", checkpoint), ("--teacher-checkpoint", teacher_checkpoint)):
        if path is not None and not path.is_file():
            raise UserError(f"{flag} {path} does not exist")
    task_of(model, data, task, checkpoint=checkpoint)
    if head is not None or finetune or pretrained:
        raise UserError("--head, --finetune and --pretrained make a new dense model; train it first, then train "
                        "it with a method from its --checkpoint")
    cls = get_method(method)
    check_dense_trainable(cls)
    if not is_dense_model(model) and checkpoint is None:
        raise UserError(f"{model} has no decoder; give --checkpoint of a dense model trained on it")
    params, train_params = cls.validate_training(parse_set(set_ or []))
    weights = parse_loss_weights(loss_weight, {})
    resolve_device(device)
    changes: dict = {"seed": seed, "max_steps": max_steps, "device": device, "backbone_lr_scale": None}
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "grad_clip" and v == 0:
            changes[k] = None
            continue
        if v <= 0 and k != "fix_epochs":
            raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")
        changes[k] = v
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    out = out or Path("runs") / f"{default_run_name(cls, model, params, train_params, {})}-{data}"
    cfg = dataclasses.replace(seg_recipe(model), **changes)
    summary = train_seg_method(model, method, {**params, **train_params}, out, cfg, data=data,
                               data_dir=str(data_dir) if data_dir else None,
                               checkpoint=str(checkpoint) if checkpoint else None,
                               teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
                               loss_weights=weights or None, progress=not as_json, force=force)
    summary["val_miou"] = summary.pop("test_acc", None)
    print_train_summary(out, summary, as_json)
