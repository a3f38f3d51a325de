"""``tokenbench eval`` on a dense task: parse, measure (:mod:`tokenbench.runner_dense`), print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError


def wants_dense(model: str, data: Optional[str], task: Optional[str] = None) -> bool:
    """Whether a command names a dense model, a dense dataset or the segmentation task."""
    from .data_scenes import is_dense_data
    from .models_seg import is_dense_model

    return task == "segmentation" or is_dense_model(model) or is_dense_data(data)


def eval_dense(model: str, method: str, sets: Optional[List[str]], data: str, data_dir: Optional[Path],
               split: Optional[str], limit: Optional[int], seed: int, batch_size: int, device: str,
               precision: str, checkpoint: Optional[Path], results: Optional[Path], as_json: bool,
               pretrained: bool = False) -> None:
    """mIoU (95% bootstrap interval), pixel accuracy, per-class IoU and GFLOPs of a dense model."""
    from .cli import _spec, _store, out_json
    from .measure import resolve_device
    from .runner import Settings
    from .runner_dense import check_restores_grid, measure_dense_run, task_of

    task_of(model, data)  # a model and a dataset of different tasks: refused before anything is built
    resolve_device(device)
    split = split or "test"
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown split {split!r} (use train, val or test)")
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown precision {precision!r} (use fp32, fp16 or bf16)")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if pretrained:
        raise UserError(f"{model} has no timm pretrained weights: its own are loaded when trained, or pass "
                        "--checkpoint")
    spec = _spec(model, method, sets, False, checkpoint, None)
    check_restores_grid(method, spec["params"])
    s = Settings(device=device, precision=precision, data=data, data_dir=str(data_dir) if data_dir else None,
                 split=split, limit=limit, data_seed=seed, eval_batch_size=batch_size)
    rec, reused = measure_dense_run(spec, s, _store(results), progress=not as_json and sys.stderr.isatty())
    m = {k: v for k, v in rec["metrics"].items() if k != "per_image_iou"}
    pub = {"model": model, "method": method, "params": spec["params"], "task": "segmentation", **m,
           "weights": rec.get("weights"), "env": rec["env"], "key": rec["key"], "reused": reused,
           "recorded_in": None if results is None else str(results)}
    for w in m.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        out_json(pub)
        return
    lo, hi = pub["miou_ci95"]
    typer.echo(f"{model} + {method} on {data} {split} ({pub['n']} images): mIoU {pub['miou']:.2f}% "
               f"[95% CI {lo:.2f}, {hi:.2f}], pixel accuracy {pub['pixel_accuracy']:.2f}%; "
               f"{pub['gflops']:.3f} GFLOPs ({pub['gflops_backbone']:.3f} backbone + "
               f"{pub['gflops_decoder']:.3f} decoder)" + (f" (reused from {results})" if reused else ""))
