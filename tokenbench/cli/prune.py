"""`tokenbench prune DIR`: remove the stale records a newer measurement of the same run replaced."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_cmd)


def superseded(out: Path) -> list[Path]:
    """Record files of ``out`` that are stale (this checkout would write them differently) and
    that a current record of the same run stands beside: what a rerun replaced.  A stale record
    with no current replacement is kept (it is still the only measurement of its run)."""
    from ..identity import stale_reasons
    from ..report.collect import run_identity
    from ..store import Store

    recs = Store(out, read_only=True).records()
    current = {_measurement(r, run_identity) for r in recs if not stale_reasons(r)}
    return [Store(out).path(r["key"]) for r in recs if stale_reasons(r) and _measurement(r, run_identity) in current]


def _measurement(rec: dict, run_identity) -> tuple:
    """One measurement of one run: its kind, the run, and where and on what it was measured."""
    from ..report.rows import acc_setting, tp_setting

    where = acc_setting(rec) if rec["kind"] == "accuracy" else tp_setting(rec) if rec["kind"] in (
        "throughput", "speedup") else ()
    return rec["kind"], run_identity(rec["spec"]), where


def prune_cmd(out: Path = typer.Argument(..., help="A results directory (holding records/)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing.")):
    """Remove DIR's stale records that a current record of the same run replaced (after a rerun
    with changed code or protocol); a stale record that is its run's only measurement is kept."""
    if not (out / "records").is_dir():
        raise UserError(f"{out} holds no records/ folder; pass a results directory")
    paths = superseded(out)
    for p in paths:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {p}")
        if not dry_run:
            p.unlink()
    typer.echo(f"{len(paths)} superseded stale record(s){' (dry run)' if dry_run else ''}")
