"""`tokenbench train`: fine-tune a model with a method (DynamicViT's recipe, or any method's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(model: str = typer.Argument(..., help="timm model name, or `default` (the embedded model)."),
                  method: str = typer.Option(..., "--method", "-m", help="Method to train with (e.g. dynamicvit)."),
                  set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Method parameter KEY=VALUE, or a training-only one (evit: shrink_start_epoch, shrink_epochs)."),
                  data: str = typer.Option("fashion-mnist", "--data",
                                           help="Training data: fashion-mnist, imagenet or folder (DATA_DIR/train and "
                                                "DATA_DIR/val class folders; DeiT augmentation without mixup/cutmix), "
                                                "synthetic (random images, smoke runs)."),
                  data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
                  num_workers: Optional[int] = typer.Option(None, "--num-workers",
                                                            help="DataLoader workers for imagenet/folder "
                                                                 "(default min(8, CPUs))."),
                  out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default results/<model>-<method>-<params>)."),
                  epochs: Optional[float] = typer.Option(None, "--epochs"),
                  lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the method's new parts."),
                  batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
                  backbone_lr_scale: Optional[float] = typer.Option(None, "--backbone-lr-scale",
                                                                    help="Backbone learning-rate multiplier."),
                  fix_epochs: Optional[float] = typer.Option(None, "--fix-epochs", help="Epochs the backbone stays frozen."),
                  grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip the gradient's global norm (off by default, as the official recipe)."),
                  loss_weight: Optional[List[str]] = typer.Option(None, "--loss-weight",
                                                                  help="Loss weight NAME=VALUE (e.g. ratio_weight=2.0)."),
                  seed: int = typer.Option(0, "--seed"),
                  max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N steps (resume later)."),
                  device: str = typer.Option("cpu", "--device"),
                  pretrained: bool = typer.Option(False, "--pretrained"),
                  checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Initial student weights."),
                  teacher_checkpoint: Optional[Path] = typer.Option(None, "--teacher-checkpoint",
                                                                    help="Weights of the dense teacher.")):
        """Train a method on a model: DynamicViT's predictors (with its distillation recipe) or a fine-tune.

        Resumable: run the same command again to continue from the last checkpoint.  The run
        directory gets model.pt (+ .sha256), config.json and train_log.csv; load the result
        anywhere with --checkpoint RUN/model.pt.
        """
        from .measure import resolve_device
        from .checks import unique_set_keys
        from .registry import get_method, parse_set
        from .train import FINETUNE_RECIPE, finetune

        cls = get_method(method)
        unique_set_keys(set_)
        params, train_params = cls.validate_training(parse_set(set_ or []))
        resolve_device(device)
        weights = {}
        for item in loss_weight or []:
            if "=" not in item:
                raise UserError(f"--loss-weight expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            try:
                weights[k] = float(v)
            except ValueError:
                raise UserError(f"--loss-weight {k}: {v!r} is not a number") from None
        if num_workers is not None and num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
        changes = {"seed": seed, "max_steps": max_steps, "device": device, "num_workers": num_workers}
        for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size),
                     ("backbone_lr_scale", backbone_lr_scale), ("fix_epochs", fix_epochs),
                     ("grad_clip", grad_clip)):
            if v is not None:
                if v <= 0 and k not in ("fix_epochs",):
                    raise UserError(f"--{k.replace('_', '-')} must be positive, got {v}")
                changes[k] = v
        cfg = dataclasses.replace(FINETUNE_RECIPE, **changes)
        if out is None:
            tdefaults = {q.name: q.default for q in cls.train_params}
            tag = "-".join([f"{k}{v}" for k, v in params.items()]
                           + [f"{k}{v}" for k, v in train_params.items() if v != tdefaults[k]])
            out = Path("results") / (f"{model}-{method}" + (f"-{tag}" if tag else ""))
        summary = finetune(model, method, {**params, **train_params}, out, cfg, data=data, data_dir=str(data_dir) if data_dir else None,
                           checkpoint=str(checkpoint) if checkpoint else None,
                           teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
                           pretrained=pretrained, loss_weights=weights or None)
        typer.echo(json.dumps({"out": str(out), **summary}))
