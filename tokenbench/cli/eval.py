"""``tokenbench eval``: accuracy with its interval (mIoU on dense data)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .common import (CKPT_OPT, JSON_OPT, METHOD_OPT, MODEL_ARG, PRETRAINED_OPT, RESULTS_OPT, SET_OPT,
                     check_data_dir, open_store, out_json, print_record, reused_text, run_spec)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def eval_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
             data: str = typer.Option(..., "--data", help="fashion-mnist, imagenet, folder or synthetic; dense: "
                                      "fashion-mnist-scenes, voc or ade20k (with a dense model such as default-seg, or "
                                      "a --checkpoint trained with --task segmentation)."),
             data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
             split: Optional[str] = typer.Option(None, "--split", help="train, val or test (default: test for "
                                                 "fashion-mnist and synthetic, val for image folders). "
                                                 "Fashion-MNIST's val: 5,000 train images held out (500 per "
                                                 "class, seed 0), not trained on; its train: the other 55,000."),
             limit: Optional[int] = typer.Option(None, "--limit", help="A seeded, class-stratified subset of N images."),
             seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
             batch_size: int = typer.Option(256, "--batch-size", "-b"),
             device: str = typer.Option("auto", "--device"),
             precision: str = typer.Option("fp32", "--precision"),
             pretrained: bool = PRETRAINED_OPT, checkpoint: Optional[Path] = CKPT_OPT,
             results: Optional[Path] = RESULTS_OPT, json_: bool = JSON_OPT):
    """Top-1 and top-5 accuracy with a 95% (Wilson) interval; on a dense dataset (fashion-mnist-scenes,
    voc) mIoU with a 95% bootstrap interval, pixel accuracy and per-class IoU."""
    from .dense import eval_dense, wants_dense
    from ..data import DATASETS
    from ..data_scenes import unknown_dataset
    from ..errors import did_you_mean
    from ..measure.env import resolve_device
    from ..runner import Settings, measure_run

    if wants_dense(model, data, checkpoint=checkpoint):
        pub, line = eval_dense(model, method, set_, data, data_dir, split, limit, seed, batch_size, device,
                               precision, checkpoint, results, json_, pretrained)
        for w in pub.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)
        return out_json(pub) if json_ else typer.echo(line)
    resolve_device(device)
    if data not in DATASETS:
        raise unknown_dataset(data)
    split = split or ("val" if data in ("imagenet", "folder") else "test")
    from ..checks import eval_options

    eval_options(split, precision, limit, batch_size, did_you_mean(split, ("val", "test", "train")))
    check_data_dir(data, data_dir)  # cheap, before the model (and any download of its weights)
    spec = run_spec(model, method, set_, pretrained, checkpoint, None)
    s = Settings(device=device, precision=precision, data=data, data_dir=str(data_dir) if data_dir else None,
                 split=split, limit=limit, data_seed=seed, eval_batch_size=batch_size)
    rec, reused = measure_run("accuracy", spec, s, open_store(results), progress=not json_ and sys.stderr.isatty())
    pub = print_record(rec, reused, results, json_)
    if pub is None:
        return
    lo, hi = pub["top1_ci95"]
    typer.echo(f"{model} + {method} on {_data_text(pub.get('data') or {}, data, split)} ({pub['n']} images): "
               f"top-1 {pub['top1']:.2f}% [95% CI {lo:.2f}, {hi:.2f}], top-5 {pub['top5']:.2f}%{reused_text(pub)}")


def _data_text(d: dict, data: str, split: str) -> str:
    """Which images were read: the dataset and split, or the image folder and its layout."""
    if d.get("layout") == "split":
        return f"{data} {d['source']} (split {split})"
    if d.get("layout") == "flat":
        return f"{data} {d['source']} (its class folders; no train/val/test split folders, --split not used)"
    if d.get("carved") and split != "test":
        return f"{data} {split} ({d['carved']})"
    return f"{data} {split}"
