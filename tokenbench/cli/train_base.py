"""``tokenbench train-base``: train an embedded model from scratch on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import JSON_OPT


def register(app: typer.Typer) -> None:
    app.command("train-base")(train_base_cmd)


def train_base_cmd(model: str = typer.Option("default", "--model",
                                              help="The embedded model to train: default (ViT), default-small "
                                                   "(its smaller dense sibling) or default-convnext."),
                   out: Optional[Path] = typer.Option(None, "--out",
                                                      help="Run directory (resumable; a finished one, such as "
                                                           "the committed results/embedded*, only with --force; "
                                                           "default runs/embedded, runs/embedded-convnext or "
                                                           "runs/default-small)."),
                   data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
                   epochs: Optional[float] = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
                   seed: int = typer.Option(0, "--seed"),
                   max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N more steps "
                                                       "(rerun to continue: each run goes N further)."),
                   threads: Optional[int] = typer.Option(None, "--threads"),
                   reschedule: bool = typer.Option(False, "--reschedule",
                                                   help="Resume with a different --epochs (recorded in config.json)."),
                   force: bool = typer.Option(False, "--force", help="Train again from scratch over a finished run."),
                   json_: bool = JSON_OPT):
    """Train an embedded model from scratch on Fashion-MNIST (resumable; rerun to continue)."""
    import dataclasses

    from .train import check_max_steps, print_train_summary
    from ..models import EMBEDDED_MODELS
    from ..train import BASE_RECIPES, check_run_dir, train_base

    check_max_steps(max_steps)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be positive, got {threads}")
    if model not in EMBEDDED_MODELS:
        raise UserError(f"--model {model!r}: train-base trains an embedded model: {', '.join(EMBEDDED_MODELS)}")
    out = out or Path({"default": "runs/embedded", "default-convnext": "runs/embedded-convnext"}.get(model, f"runs/{model}"))
    check_run_dir(out, force, reschedule)
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    cfg = BASE_RECIPES[model]
    changes = {"seed": seed, "max_steps": max_steps, "threads": threads}
    if epochs is not None:
        if epochs <= 0:
            raise UserError(f"--epochs must be positive, got {epochs}")
        changes["epochs"] = epochs
    cfg = dataclasses.replace(cfg, **changes)
    summary = train_base(out, cfg, data_dir=str(data_dir) if data_dir else None, reschedule=reschedule, force=force,
                         progress=not json_, model=model)
    print_train_summary(out, summary, json_)
