"""Accuracy: top-1 and top-5 in percent with their sample size, a Wilson 95% interval and
per-image correctness (for paired tests), in one process or sharded under torchrun."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from .env import resolve_device
from .forward import eval_mode, precision_context
from .memory import check_batch_fits
from .stats import wilson_interval


def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
             precision: str = "fp32", progress: bool = False, num_workers: int = 0,
             desc: str = "eval") -> dict[str, Any]:
    """Top-1/top-5 accuracy in percent with a Wilson 95% interval and per-image correctness.

    Under torchrun each process evaluates its shard of whole batches and the per-image
    results are gathered back in dataset order: the same dict as one process returns.
    """
    from torch.utils.data import DataLoader, Subset

    from .. import distributed

    dev = resolve_device(device) if isinstance(device, str) else device
    ctx, note = precision_context(dev, precision)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    # Global indices (into ``dataset``) of the images this process evaluates, in order.
    mine = distributed.shard(len(dataset), batch_size, distributed.rank(), distributed.world_size())
    # The largest batch the loader will really make: a huge --batch-size on a small set is harmless.
    check_batch_fits(model, min(batch_size, max(1, len(mine))), dev, precision)
    params_dev = next(model.parameters()).device
    if params_dev != dev:
        model.to(dev)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        with _progress(progress, desc, len(mine)) as advance:
            got = _predict(model, loader, mine, dev, ctx, advance)
    finally:
        if params_dev != dev:
            model.to(params_dev)
    if distributed.active():
        got = {k: distributed.gather_in_rank_order(v) for k, v in got.items()}
        if got["seen"] != list(range(len(dataset))):
            raise RuntimeError("the shards did not cover the evaluation set exactly once, in order")
    out = _accuracy(got["correct1"], got["correct5"], got["predictions"])
    if note:
        out["precision_note"] = note
    return out


@contextlib.contextmanager
def _progress(show: bool, desc: str, total: int):
    """Yields ``advance(images)``: a transient progress bar over ``total`` images when ``show``."""
    if not show:
        yield lambda n: None
        return
    from rich.progress import Progress

    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task(desc, total=total)
    try:
        yield lambda n: prog.update(task, advance=n)
    finally:
        prog.stop()


def _predict(model: nn.Module, loader, mine: Sequence[int], dev: torch.device, ctx,
             advance: Callable[[int], None]) -> dict[str, list[int]]:
    """Per image, in order: its global index (``seen``), whether its label is the top-1 and among
    the top-5 predictions, and the top-1 prediction."""
    from ..backbones import image_ids

    got: dict[str, list[int]] = {"seen": [], "correct1": [], "correct5": [], "predictions": []}
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            # Each image's global index in the evaluated set (the same under torchrun as in one
            # process): random choices follow the image, not its place in a batch or a shard.
            batch_ids = list(mine[len(got["seen"]):len(got["seen"]) + len(y)])
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            ids = torch.tensor(batch_ids, device=dev, dtype=torch.long)
            with ctx, image_ids(model, ids):
                logits = model(x)
            logits = logits.float()
            if not torch.isfinite(logits).all():
                raise UserError("the model produced NaN or infinite logits; accuracy would be meaningless")
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            got["seen"] += batch_ids
            got["correct1"] += (top[:, 0] == y).int().tolist()
            got["predictions"] += top[:, 0].tolist()
            got["correct5"] += (top == y[:, None]).any(-1).int().tolist()
            advance(len(y))
    return got


def _accuracy(correct1: Sequence[int], correct5: Sequence[int], predictions: list[int]) -> dict[str, Any]:
    """Top-1 and top-5 in percent, the top-1's Wilson interval, the sample size, per-image
    correctness as a string of 0 and 1, and the predictions."""
    n = len(correct1)
    k1 = sum(correct1)
    lo, hi = wilson_interval(k1, n)
    return {
        "top1": 100.0 * k1 / n if n else float("nan"),
        "top1_ci95": [100.0 * lo, 100.0 * hi],
        "top5": 100.0 * sum(correct5) / n if n else float("nan"),
        "n": n,
        "correct": "".join("1" if c else "0" for c in correct1),
        "predictions": predictions,
    }
