"""``tokenbench figure``: regenerate a paper's figure (ours beside the published numbers).

``tokenbench figure list`` lists the recipes; ``tokenbench figure NAME`` runs one (see
:mod:`tokenbench.figures`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("figure")
    def figure_cmd(
        name: Optional[str] = typer.Argument(None, help="A recipe (see `tokenbench figure list`), NAME@embedded for "
                                                        "its version on the embedded model, or `list`."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="ImageNet (its val/ split): measure top-1 "
                                                "(runs with real weights only)."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where the methods' checkpoint "
                                                      "files are (the recipe names them; `results` with --embedded)."),
        pretrained: bool = typer.Option(False, "--pretrained", help="timm's weights for the recipe's pinned tags "
                                        "(needs a network or timm's cache)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default "
                                           "runs/figures/NAME/; the committed results/figures/NAME/ only when "
                                           "named here, its records reused either way)."),
        embedded: bool = typer.Option(False, "--embedded", help="The same recipe on the embedded Fashion-MNIST "
                                      "model (runs here end to end; no published overlays)."),
        model: Optional[str] = typer.Option(None, "--model", help="Replace the recipe's model (a timm name); the "
                                            "published figures then match nothing."),
        img_size: Optional[int] = typer.Option(None, "--img-size", help="Input resolution (timm models)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Top-1 on a seeded stratified subset of N images "
                                            "(default with --embedded: 1000)."),
        throughput: bool = typer.Option(True, "--throughput/--no-throughput", help="Time every run on this device "
                                        "(slow for ViT-B on a CPU)."),
        accuracy: bool = typer.Option(True, "--accuracy/--no-accuracy", help="Measure top-1 where data and weights "
                                      "allow."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Throughput batch size."),
        min_run_time: Optional[float] = typer.Option(None, "--min-run-time", help="Seconds of timing per run."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for timing (default: all)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
        force: bool = typer.Option(False, "--force", help="Measure again what is already recorded."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the runs (after any matched-FLOPs search); "
                                                              "measure nothing."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the plot."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
    ):
        """Regenerate a paper's figure: GFLOPs, tokens per block, throughput and top-1, ours beside the published.

        Without ImageNet or weights it still writes everything that needs neither (GFLOPs and tokens per block,
        throughput here) and marks top-1 "not measured" with the command that measures it.  Writes NAME.md,
        NAME.csv, NAME.png and NAME.pdf to runs/figures/NAME/ (--out results/figures/NAME rewrites the committed one).
        """
        from ..figures.plan import FigureOptions
        from ..figures.tables import public_rows

        if name is None or name == "list":
            return _list_recipes(json_)
        for v, what in ((batch_size, "--batch-size"), (threads, "--threads"), (limit, "--limit"),
                        (img_size, "--img-size")):
            if v is not None and v < 1:
                raise UserError(f"{what} must be positive, got {v}")
        if min_run_time is not None and min_run_time <= 0:
            raise UserError(f"--min-run-time must be positive, got {min_run_time}")
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"data directory {data_dir} does not exist")
        opts = FigureOptions(
            data_dir=str(data_dir) if data_dir else None, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
            pretrained=pretrained, out=str(out) if out else None, embedded=embedded, model=model, img_size=img_size,
            limit=limit, throughput=throughput, accuracy=accuracy, batch_size=batch_size, min_run_time=min_run_time,
            threads=threads, device=device, force=force)
        if dry_run:
            return _dry_run(name, opts, json_)
        fig = _run(name, opts, plots, quiet=json_ or not sys.stderr.isatty())
        if json_:
            typer.echo(json.dumps({"figure": fig["plan"].name, "out": str(fig["plan"].out),
                                   "files": [str(f) for f in fig["files"]], "gflops_agreement": fig["gflops_agreement"],
                                   "measure_command": fig["measure_command"],
                                   "rows": public_rows(fig)}, default=str))
            return
        _print_summary(fig)


def _list_recipes(json_: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..figures.recipe import list_recipes

    recipes = list_recipes()
    if json_:
        typer.echo(json.dumps({"figures": recipes}))
        return
    t = Table(title="tokenbench figures (NAME@embedded: the same on the embedded model)")
    for c in ("name", "model", "description"):
        t.add_column(c, overflow="fold")
    for r in recipes:
        t.add_row(r["name"], ", ".join(r["models"]), r["description"])
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def _dry_run(name: str, opts, json_: bool) -> None:
    """The runs (after any matched-FLOPs search) and whether each one's top-1 can be measured."""
    from rich.console import Console
    from rich.table import Table

    from ..figures.plan import accuracy_status, expand_plan
    from ..figures.run import build_plan
    from ..sweep import CACHE_FILE, FlopsSearch, search_data

    plan = build_plan(name, opts)
    runs = expand_plan(plan, FlopsSearch(plan.out / CACHE_FILE, data=search_data(plan.sweep)))
    items = []
    for r in runs:
        ok, why = accuracy_status(plan, r)
        items.append({"name": r.name, "model": r.model, "method": r.method, "params": r.params,
                      "checkpoint": r.checkpoint, "targets": r.targets,
                      "accuracy": "measured" if ok else why})
    if json_:
        typer.echo(json.dumps({"figure": plan.name, "out": str(plan.out), "runs": items}, default=str))
        return
    t = Table(title=f"{plan.name}: {len(runs)} runs -> {plan.out}")
    for c in ("run", "checkpoint", "top-1"):
        t.add_column(c, overflow="fold")
    for it in items:
        t.add_row(it["name"], it["checkpoint"] or "", it["accuracy"])
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def _run(name: str, opts, plots: bool, quiet: bool) -> dict:
    """The figure, with a progress bar on a terminal (the recipe validated before it)."""
    from rich.console import Console

    from ..figures.run import build_plan, run_figure

    if quiet:
        return run_figure(name, opts, plots=plots)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    with err.status("expanding the recipe..."):
        build_plan(name, opts)  # validate before the progress bar
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err) as prog:
        task = prog.add_task(name, total=None)

        def on_step(i, total, run, kind):
            desc = f"{run.name} [{kind}]" if run is not None else "writing the figure"
            prog.update(task, completed=i, total=total, description=desc[:70])

        return run_figure(name, opts, on_step=on_step, plots=plots)


def _print_summary(fig: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..figures.recipe import GFLOPS_AGREEMENT
    from ..figures.tables import params_text
    from ..report.render import num, signed

    plan = fig["plan"]
    t = Table(title=f"figure {plan.name}")
    cols = ["Method", "Params", "GFLOPs", "pub.", "Δ", "Speedup", "pub.", "Top-1", "pub.", "Flags"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in fig["rows"] + fig["extra"]:
        t.add_row(r["label"] + ("" if r["in_recipe"] else " (published only)"), params_text(r),
                  num(r["gflops"], ".3f"), num(r["gflops_published"], ".1f"),
                  signed(r["gflops_diff"], ".2f"),
                  num(r["speedup"], ".2f"), num(r["speedup_published"], ".2f"),
                  num(r["top1"], ".2f", "n/m" if r["in_recipe"] else "–"),
                  num(r["top1_published"], ".2f"), ", ".join(r["flags"]))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    ag = fig["gflops_agreement"]
    if ag["compared"]:
        typer.echo(f"GFLOPs: {ag['agree']} of {ag['compared']} published values within "
                   f"{GFLOPS_AGREEMENT:g} of ours.")
    if any(r["top1"] is None for r in fig["rows"]):
        typer.echo(f"top-1 not measured for some rows; to measure it: {fig['measure_command']}")
    typer.echo("wrote " + ", ".join(str(f) for f in fig["files"]))
