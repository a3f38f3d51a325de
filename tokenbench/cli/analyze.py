"""``tokenbench analyze DIR``: which tokens each method uses, and how the methods agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def _floats(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.replace(" ", "").strip("[]").split(",") if x]
    except ValueError:
        raise UserError(f"--flops takes comma-separated fractions of the dense FLOPs (0.5,0.66), got {text!r}") from None
    for v in vals:
        if not 0 < v <= 1:
            raise UserError(f"--flops takes fractions of the dense model's FLOPs in (0, 1], got {v:g}")
    return vals


def _words(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [w for w in text.replace(" ", "").split(",") if w] or None


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        directory: Path = typer.Argument(..., help="A results directory (a sweep's output, e.g. results/default)."),
        methods: Optional[str] = typer.Option(None, "--methods", help="Only these methods (sweep labels or method "
                                              "names, comma-separated); dense is always included."),
        flops: Optional[str] = typer.Option(None, "--flops", help="Only these matched-FLOPs levels (fractions of "
                                            "dense, comma-separated, e.g. 0.5,0.66)."),
        limit: int = typer.Option(1000, "--limit", help="Re-run models on the first N evaluated images (0: every "
                                  "image); the error tables always use every recorded image."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the figures too."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the tables and figures here (default: "
                                           "DIRECTORY/analysis; runs/analysis/NAME for a committed results/NAME, "
                                           "which only an explicit --out results/... rewrites)."),
        model: Optional[str] = typer.Option(None, "--model", help="The model analysed, where DIRECTORY holds several "
                                            "(written to its own folder, analysis/MODEL, unless --out says)."),
        json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
    ):
        """Analyse a sweep: reduction-pattern agreement (IoU), error agreement (kappa, per-class change), representation drift (CKA, cosine), budget spending, and keep maps against a centre prior.

        Reads the records and plan of DIRECTORY, re-runs models only for what the records lack (cached beside the output), and writes tables (md, csv, tex) and figures (png, pdf) under DIRECTORY/analysis/, or runs/analysis/NAME/ for the committed results/NAME (see --out)."""
        import sys

        from rich.console import Console

        from ..analysis.analyze import analyze

        from ..report.write import check_results_dir

        check_results_dir(directory)
        err = Console(stderr=True)
        kw = dict(methods=_words(methods), flops=_floats(flops), limit=limit, plots=plots, dest=out, model=model)
        if json_ or not sys.stderr.isatty():
            res = analyze(directory, **kw)
        else:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=err) as prog:
                res = analyze(directory, progress=prog, **kw)
        if json_:
            typer.echo(json.dumps(res, default=str))
            return
        for n in res["notes"]:
            typer.echo(f"warning: {n}", err=True)
        typer.echo(f"{res['settings']} settings ({res['traced']} traced, {res['re_run']} re-run now) on "
                   f"{res['n_images']} images: {len(res['files'])} files in {res['out']}/ ({res['seconds']:.0f} s)")
