"""`tokenbench eval` on a dense task: parse the options and measure (:mod:`tokenbench.runner_dense`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..errors import UserError


def wants_dense(model: str, data: Optional[str], task: Optional[str] = None, checkpoint=None) -> bool:
    """Whether a command names a dense model, a dense dataset, the segmentation task, or a
    checkpoint holding a dense model."""
    from ..data_scenes import is_dense_data
    from ..models_seg import is_dense_model
    from ..models_seg_timm import checkpoint_arch

    return (task == "segmentation" or is_dense_model(model) or is_dense_data(data)
            or (checkpoint is not None and checkpoint_arch(checkpoint) is not None))


def eval_dense(model: str, method: str, sets: Optional[List[str]], data: str, data_dir: Optional[Path],
               split: Optional[str], limit: Optional[int], seed: int, batch_size: int, device: str,
               precision: str, checkpoint: Optional[Path], results: Optional[Path], as_json: bool,
               pretrained: bool = False) -> tuple[dict, str]:
    """(the printed record, its one-line summary) of mIoU (95% bootstrap interval), pixel accuracy,
    per-class IoU and GFLOPs of a dense model."""
    from ..checks import eval_options, unique_set_keys
    from ..measure.env import resolve_device
    from ..registry import get_method, parse_set
    from ..runner import Settings, spec_dict
    from ..runner_dense import check_restores_grid, dense_family, measure_dense_run, task_of
    from ..store import Store

    task_of(model, data, checkpoint=checkpoint)  # a model and a dataset of different tasks: refused before anything is built
    resolve_device(device)
    from ..data_scenes import SCENES

    split = split or ("test" if data == SCENES else "val")  # the folders' scored split is val
    eval_options(split, precision, limit, batch_size)
    if pretrained:
        raise UserError(f"--pretrained does not apply to a dense model: {model}'s weights are its training's "
                        "(its committed ones, or --checkpoint RUN/model.pt)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    unique_set_keys(sets)
    params = get_method(method).validate(parse_set(sets or []))
    check_restores_grid(method, params, dense_family(model))
    spec = spec_dict(model, method, params, False, str(checkpoint) if checkpoint else None, None)
    store = None
    if results is not None:
        store = Store(results)
        store.ensure_writable()
    s = Settings(device=device, precision=precision, data=data, data_dir=str(data_dir) if data_dir else None,
                 split=split, limit=limit, data_seed=seed, eval_batch_size=batch_size)
    rec, reused = measure_dense_run(spec, s, store, progress=not as_json and sys.stderr.isatty())
    m = {k: v for k, v in rec["metrics"].items() if k != "per_image_iou"}
    pub = {"model": model, "method": method, "params": params, "task": "segmentation", **m,
           "weights": rec.get("weights"), "env": rec["env"], "key": rec["key"], "reused": reused,
           "recorded_in": None if results is None else str(results)}
    lo, hi = pub["miou_ci95"]
    line = (f"{model} + {method} on {data} {split} ({pub['n']} images): mIoU {pub['miou']:.2f}% "
            f"[95% CI {lo:.2f}, {hi:.2f}], pixel accuracy {pub['pixel_accuracy']:.2f}%; "
            f"{pub['gflops']:.3f} GFLOPs ({pub['gflops_backbone']:.3f} backbone + "
            f"{pub['gflops_decoder']:.3f} decoder)" + (f" (reused from {results})" if reused else ""))
    return pub, line
