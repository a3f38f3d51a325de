"""``tokenbench flops``: GFLOPs, parameters and tokens per block of one model and method."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from .common import (CKPT_OPT, JSON_OPT, METHOD_OPT, MODEL_ARG, PRETRAINED_OPT, RESULTS_OPT, SET_OPT,
                     check_data_dir, open_store, print_record, reused_text, run_spec)


def register(app: typer.Typer) -> None:
    app.command("flops")(flops_cmd)


def flops_cmd(model: str = MODEL_ARG, method: str = METHOD_OPT, set_: Optional[List[str]] = SET_OPT,
              img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (default: the model's)."),
              data: Optional[str] = typer.Option(None, "--data", help="Count on real images (fashion-mnist, "
                                                 "imagenet, folder or synthetic): the mean and spread per image, "
                                                 "for methods whose token count depends on the image."),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the dataset lives."),
              limit: Optional[int] = typer.Option(None, "--limit", help="Images counted with --data: a seeded, "
                                                  "class-stratified subset (default 64)."),
              seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
              pretrained: bool = PRETRAINED_OPT, checkpoint: Optional[Path] = CKPT_OPT,
              results: Optional[Path] = RESULTS_OPT, json_: bool = JSON_OPT):
    """GFLOPs per image (fvcore, multiply-add = 1 FLOP), parameters and tokens per block."""
    from ..runner import Settings, measure_run

    settings = Settings()
    if data is not None:
        from ..data import DATASETS
        from ..errors import did_you_mean

        if data not in DATASETS:
            raise UserError(f"unknown dataset {data!r}{did_you_mean(data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        if limit is not None and limit <= 0:
            raise UserError(f"--limit must be positive, got {limit}")
        check_data_dir(data, data_dir)
        settings = Settings(data=data, data_dir=str(data_dir) if data_dir else None,
                            split="val" if data in ("imagenet", "folder") else "test", limit=limit, data_seed=seed,
                            flops_on_data=True)
    elif limit is not None or data_dir is not None:
        raise UserError("--limit and --data-dir count real images: pass --data too")
    spec = run_spec(model, method, set_, pretrained, checkpoint, img_size)
    rec, reused = measure_run("flops", spec, settings, open_store(results),
                              progress=settings.flops_on_data and sys.stderr.isatty())
    pub = print_record(rec, reused, results, json_)
    if pub is None:
        return
    typer.echo(f"{model} + {method} {json.dumps(spec['params'])}: {pub['gflops']:.3f} GFLOPs, "
               f"{pub['params_m']:.2f} M params{reused_text(pub)}")
    spread = pub.get("gflops_per_image")
    if spread:
        typer.echo(f"per image ({pub['flops_images']} images of {data}): mean {spread['mean']:.4f}, "
                   f"std {spread['std']:.4f}, min {spread['min']:.4f}, max {spread['max']:.4f} GFLOPs")
    typer.echo(f"tokens per block:     {pub.get('tokens')}")
    typer.echo(f"tokens entering MLP:  {pub.get('tokens_mlp')}")
    dist = pub.get("tokens_per_image")
    if dist:
        for name, rows in (("block", dist["blocks"]), ("MLP", dist["blocks_mlp"])):
            typer.echo(f"tokens per image entering each {name} (min / median / max): "
                       + ", ".join(f"{r['min']}/{r['q50']}/{r['max']}" for r in rows))
        typer.echo("final token count (tokens: images): "
                   + ", ".join(f"{n}: {k}" for n, k in dist["final_histogram"].items()))
