"""`tokenbench train`: fine-tune a model with a method (DynamicViT's recipe, or any method's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(model: str = typer.Argument(..., help="timm model name, or `default` (the embedded model)."),
                  method: Optional[str] = typer.Option(None, "--method", "-m", help="Method to train with (e.g. "
                                                       "dynamicvit, or any method to fine-tune with it in the loop)."),
                  task: Optional[str] = typer.Option(None, "--task", help="classification or segmentation "
                                                     "(default: what the data is)."),
                  set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Method parameter KEY=VALUE, or a training-only one (evit: shrink_start_epoch, shrink_epochs)."),
                  data: str = typer.Option("fashion-mnist", "--data",
                                           help="Training data: fashion-mnist, imagenet or folder (DATA_DIR/train and "
                                                "DATA_DIR/val class folders; DeiT augmentation without mixup/cutmix), "
                                                "synthetic (random images, smoke runs); dense: fashion-mnist-scenes, "
                                                "voc or ade20k (DATA_DIR in the VOC or ADE20K layout)."),
                  data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
                  num_workers: Optional[int] = typer.Option(None, "--num-workers",
                                                            help="DataLoader workers for imagenet/folder "
                                                                 "(default min(8, CPUs))."),
                  out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<model>-<method>-<params>)."),
                  force: bool = typer.Option(False, "--force", help="Train again from scratch over a finished run."),
                  json_: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
                  epochs: Optional[float] = typer.Option(None, "--epochs"),
                  lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the method's new parts."),
                  batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
                  backbone_lr_scale: Optional[float] = typer.Option(None, "--backbone-lr-scale",
                                                                    help="Backbone learning-rate multiplier."),
                  fix_epochs: Optional[float] = typer.Option(None, "--fix-epochs", help="Epochs the backbone stays frozen."),
                  grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the gradient's global norm (0: off; off by default, as the official recipe)."),
                  loss_weight: Optional[List[str]] = typer.Option(None, "--loss-weight",
                                                                  help="Loss weight NAME=VALUE (e.g. ratio_weight=2.0)."),
                  seed: int = typer.Option(0, "--seed"),
                  max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N more "
                  "steps (rerun the same command to go N further)."),
                  reschedule: bool = typer.Option(False, "--reschedule", help="Resume a run with a different "
                                                  "length, or lengthen a finished one (recorded in config.json)."),
                  device: str = typer.Option("cpu", "--device"),
                  threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the "
                                                        "recipe's; may change when a run resumes)."),
                  pretrained: bool = typer.Option(False, "--pretrained"),
                  checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Initial student weights."),
                  teacher_checkpoint: Optional[Path] = typer.Option(None, "--teacher-checkpoint",
                                                                    help="Weights of the dense teacher."),
                  head: Optional[str] = typer.Option(None, "--head", help="Segmentation head on a timm backbone: "
                                                     "linear (last block, the default) or linear4 (last four)."),
                  train_backbone: bool = typer.Option(False, "--finetune", help="Segmentation on a timm backbone: train "
                                                "the backbone too (default: frozen, a linear probe).")):
        """Train a method on a model: DynamicViT's predictors (with its distillation recipe) or a fine-tune.

        Resumable: run the same command again to continue from the last checkpoint (Ctrl-C saves
        one).  The run directory gets model.pt (+ .sha256), config.json and train_log.csv; load
        the result anywhere with --checkpoint RUN/model.pt.  A finished run is never overwritten
        without --force.  A method may bring its own defaults for a model (it says so).
        """
        from .dense import wants_dense
        from ..measure.env import resolve_device
        from ..checks import unique_set_keys

        check_max_steps(max_steps)
        if wants_dense(model, data, task):
            if method not in (None, "none"):
                unique_set_keys(set_)
                return train_dense_method(model, method, task, set_, loss_weight, data, data_dir, out, force, json_,
                                          {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                           "backbone_lr_scale": backbone_lr_scale, "fix_epochs": fix_epochs,
                                           "grad_clip": grad_clip, "threads": threads}, seed, max_steps, device, checkpoint,
                                          teacher_checkpoint, head, train_backbone, pretrained, num_workers,
                                          reschedule)
            unused = [flag for flag, v in (("--set", set_), ("--loss-weight", loss_weight),
                                           ("--fix-epochs", fix_epochs), ("--teacher-checkpoint", teacher_checkpoint))
                      if v]
            if unused:
                raise UserError(f"{', '.join(unused)} apply to training with a method; a dense model alone is "
                                "trained with per-pixel cross-entropy")
            return train_dense(model, method, task, data, data_dir, out, force, json_,
                               {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                "backbone_lr_scale": backbone_lr_scale, "grad_clip": grad_clip, "threads": threads},
                               seed, max_steps, device, checkpoint, head, train_backbone, pretrained, num_workers,
                               reschedule)
        if head is not None or train_backbone:
            raise UserError("--head and --finetune train a segmentation head; add --task segmentation and a dense "
                            "--data")
        if method is None:
            raise UserError("--method is required to train a classification model (e.g. --method dynamicvit)")
        from ..registry import get_method, parse_set
        from ..train import FINETUNE_RECIPE, check_run_dir, finetune

        cls = get_method(method)
        unique_set_keys(set_)
        per_model = cls.train_defaults.get(model, {})
        user_set = parse_set(set_ or [])
        params, train_params = cls.validate_training({**per_model.get("set", {}), **user_set})
        resolve_device(device)
        weights = parse_loss_weights(loss_weight, per_model.get("loss_weights", {}))
        if num_workers is not None and num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
        changes = {"seed": seed, "max_steps": max_steps, "device": device, "num_workers": num_workers,
                   **per_model.get("recipe", {})}
        changes |= recipe_changes({"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                   "backbone_lr_scale": backbone_lr_scale, "fix_epochs": fix_epochs,
                                   "grad_clip": grad_clip, "threads": threads})
        cfg = dataclasses.replace(FINETUNE_RECIPE, **changes)
        if out is None:
            out = Path("runs") / default_run_name(cls, model, params, train_params, per_model.get("set", {}))
        # the cheap checks, before any model is built or weights are downloaded
        check_run_dir(out, force, reschedule)
        for flag, path in (("--checkpoint", checkpoint), ("--teacher-checkpoint", teacher_checkpoint)):
            if path is not None and not path.is_file():
                raise UserError(f"{flag} {path} does not exist")
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a directory")
        if per_model:
            typer.echo(per_model_note(cls, model, per_model), err=True)
        summary = finetune(model, method, {**params, **train_params}, out, cfg, data=data,
                           data_dir=str(data_dir) if data_dir else None,
                           checkpoint=str(checkpoint) if checkpoint else None,
                           teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
                           pretrained=pretrained, loss_weights=weights or None, force=force, progress=not json_,
                           reschedule=reschedule)
        print_train_summary(out, summary, json_)


def train_dense(model: str, method: Optional[str], task: Optional[str], data: str, data_dir: Optional[Path],
                out: Optional[Path], force: bool, as_json: bool, overrides: dict, seed: int,
                max_steps: Optional[int], device: str,
                checkpoint: Optional[Path], head: Optional[str] = None, finetune: bool = False,
                pretrained: bool = False, num_workers: Optional[int] = None, reschedule: bool = False) -> None:
    """Train a dense model with per-pixel cross-entropy (:mod:`tokenbench.train_seg`), resumably: an
    embedded dense model, or a timm backbone with a linear head (frozen unless ``finetune``).
    ``overrides``: the recipe values the user set (None: the recipe's)."""
    from ..measure.env import resolve_device
    from ..models_seg import is_dense_model
    from ..models_seg_timm import HEADS
    from ..runner_dense import task_of
    from ..train_seg import SEG_RECIPES, seg_recipe, train_seg

    task_of(model, data, task, new_decoder=task == "segmentation" and not is_dense_model(model))
    if method not in (None, "none"):
        raise UserError(f"training a dense model with a method ({method}) is not supported yet; leave out --method")
    if is_dense_model(model) and (head is not None or finetune or pretrained):
        raise UserError(f"{model} has its own decoder and is trained whole; --head, --finetune and --pretrained are "
                        "for a timm backbone")
    if head is not None and head not in HEADS:
        raise UserError(f"unknown --head {head!r}; choose from {', '.join(HEADS)}")
    resolve_device(device)
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
    changes = {"seed": seed, "max_steps": max_steps, "device": device, "num_workers": num_workers,
               **recipe_changes(overrides)}
    if changes.get("backbone_lr_scale") is not None and not is_dense_model(model) and not finetune:
        raise UserError("--backbone-lr-scale needs --finetune: a frozen backbone does not learn")
    if checkpoint is not None and not checkpoint.is_file():
        raise UserError(f"--checkpoint {checkpoint} does not exist")
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    tag = "" if is_dense_model(model) else f"-{head or 'linear'}{'-finetune' if finetune else ''}"
    out = out or Path("runs") / f"{model}-{data}{tag}"
    summary = train_seg(model, out, dataclasses.replace(seg_recipe(model), **changes), data=data,
                        data_dir=str(data_dir) if data_dir else None,
                        checkpoint=str(checkpoint) if checkpoint else None, progress=not as_json, force=force,
                        head=head, frozen=not finetune, pretrained=pretrained,
                        init_encoder=checkpoint is None and model in SEG_RECIPES, reschedule=reschedule)
    miou = summary.pop("test_acc", None)
    summary["val_miou"] = miou
    print_train_summary(out, summary, as_json)
    if miou is not None and not as_json:
        typer.echo(f"val mIoU {miou:.2f}%")


def check_max_steps(max_steps: Optional[int]) -> None:
    """``--max-steps`` is a count of steps still to take: 1 or more (none given: no limit)."""
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be 1 or more (leave it out to train to the end), got {max_steps}")


def recipe_changes(values: dict) -> dict:
    """The recipe values the user set (``None``: keep the recipe's): ``--grad-clip 0`` turns clipping
    off (also where a method's per-model defaults clip), ``--fix-epochs`` may be 0, the rest must be
    positive."""
    changes = {}
    for k, v in values.items():
        if v is None:
            continue
        if k == "grad_clip" and v == 0:
            changes[k] = None
        elif v < 0 or (v == 0 and k != "fix_epochs"):
            raise UserError(f"--{k.replace('_', '-')} must be {'0 or more' if k == 'fix_epochs' else 'positive'}, "
                            f"got {v}")
        else:
            changes[k] = v
    return changes


def parse_loss_weights(items: Optional[List[str]], base: dict) -> dict:
    """``base`` with the ``--loss-weight NAME=VALUE`` items over it."""
    weights = dict(base)
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--loss-weight expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            weights[k] = float(v)
        except ValueError:
            raise UserError(f"--loss-weight {k}: {v!r} is not a number") from None
    return weights


def train_dense_method(model: str, method: str, task: Optional[str], set_: Optional[List[str]],
                       loss_weight: Optional[List[str]], data: str, data_dir: Optional[Path], out: Optional[Path],
                       force: bool, as_json: bool, overrides: dict, seed: int, max_steps: Optional[int], device: str,
                       checkpoint: Optional[Path], teacher_checkpoint: Optional[Path], head: Optional[str],
                       finetune: bool, pretrained: bool, num_workers: Optional[int] = None,
                       reschedule: bool = False) -> None:
    """Train dense model ``model`` with ``method`` applied to its encoder
    (:mod:`tokenbench.train_seg_method`), resumably, from its committed weights or ``checkpoint``."""
    from ..measure.env import resolve_device
    from ..models_seg import is_dense_model
    from ..registry import get_method, parse_set
    from ..runner_dense import task_of
    from ..train_seg import seg_recipe
    from ..train_seg_method import check_dense_trainable, train_seg_method

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
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
    changes = {"seed": seed, "max_steps": max_steps, "device": device, "backbone_lr_scale": None,
               "num_workers": num_workers, **recipe_changes(overrides)}
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    out = out or Path("runs") / f"{default_run_name(cls, model, params, train_params, {})}-{data}"
    cfg = dataclasses.replace(seg_recipe(model), **changes)
    summary = train_seg_method(model, method, {**params, **train_params}, out, cfg, data=data,
                               data_dir=str(data_dir) if data_dir else None,
                               checkpoint=str(checkpoint) if checkpoint else None,
                               teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
                               loss_weights=weights or None, progress=not as_json, force=force,
                               reschedule=reschedule)
    summary["val_miou"] = summary.pop("test_acc", None)
    print_train_summary(out, summary, as_json)


def default_run_name(cls, model: str, params: dict, train_params: dict, per_model_set: dict) -> str:
    """``<model>-<method>-<params>``: model parameters, and training-only ones that differ from the
    defaults this model gets."""
    tdefaults = {q.name: q.default for q in cls.train_params} | {k: v for k, v in per_model_set.items()
                                                                 if k in train_params}
    tag = "-".join([f"{k}{v}" for k, v in params.items()]
                   + [f"{k}{v}" for k, v in train_params.items() if v != tdefaults[k]])
    return f"{model}-{cls.name}" + (f"-{tag}" if tag else "")


def per_model_note(cls, model: str, per_model: dict) -> str:
    """One line: which of the method's training defaults for ``model`` apply, as the flags that set them."""
    from ..sweep import fmt_value

    flags = [f"--set {k}={json.dumps(v)}" for k, v in per_model.get("set", {}).items()]
    flags += [f"--loss-weight {k}={v:g}" for k, v in per_model.get("loss_weights", {}).items()]
    flags += [f"--{k.replace('_', '-')} {fmt_value(v)}" for k, v in per_model.get("recipe", {}).items()]
    why = f" ({per_model['why']})" if per_model.get("why") else ""
    return f"note: {cls.name} on {model} trains with its recipe for this model{why}: {' '.join(flags)}; " \
           "flags you give override these"


def print_train_summary(out: Path, summary: dict, as_json: bool) -> None:
    """What a training call did: a JSON object with ``--json``, else a line or two for a person."""
    if as_json:
        typer.echo(json.dumps({"out": str(out), **summary}))
        return
    step, total = summary.get("step"), summary.get("steps")
    resumed = f" (resumed from step {summary['resumed_from']})" if summary.get("resumed_from") else ""
    acc = f"; test top-1 {summary['test_acc']:.2f}%" if summary.get("test_acc") is not None else ""
    if summary.get("finished"):
        typer.echo(f"trained {total} steps into {out}{resumed}{acc}")
        typer.echo(f"use it with --checkpoint {out / 'model.pt'}")
    else:
        typer.echo(f"stopped at step {step} of {total}{resumed}{acc}; rerun the same command to continue ({out})")
