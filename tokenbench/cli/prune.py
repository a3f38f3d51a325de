"""`tokenbench prune DIR`: remove the stale records a newer measurement of the same run replaced
(and with ``--unplanned``, the records no run of DIR's sweep plan names)."""

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


def unplanned(out: Path) -> list[Path]:
    """Record files of ``out`` that no run of its sweep plan (``sweep.json``) names: measurements of
    an earlier plan, of other weights or of other data, which the sweep's tables do not read."""
    from ..store import Store
    from ..sweep import read_plan

    plan = read_plan(out)
    if plan is None:
        raise UserError(f"{out} holds no readable sweep plan (sweep.json): --unplanned needs the plan "
                        "to know which records its tables read")
    named = {k for r in plan["runs"] for k in (r.get("keys") or {}).values()}
    store = Store(out, read_only=True)
    return [store.path(r["key"]) for r in store.records() if r["key"] not in named]


# Key fields two measurements of one run may differ in when the newer replaces the older: what
# makes a record stale (its code, the protocol, a speedup's baseline code), the library versions and
# a speedup's number of rounds (more of the same measurement).  Not the weights nor the data's
# fingerprint: a measurement of other weights or other images replaces nothing.
REPLACEABLE = frozenset({"code", "protocol", "baseline_code", "torch", "timm", "rounds"})


def _measurement(rec: dict, run_identity) -> tuple:
    """One measurement of one run: its kind, the run, and every other field of its key (where, how
    and on what it was measured: device, batch, compile mode, kernel, real images, data subset, ...)."""
    from ..store import canonical

    where = {k: v for k, v in (rec.get("key_fields") or {}).items() if k not in REPLACEABLE}
    return rec["kind"], run_identity(rec["spec"]), canonical(where)


def prune_cmd(out: Path = typer.Argument(..., help="A results directory (holding records/)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
              unplanned_too: bool = typer.Option(
                  False, "--unplanned", help="Also remove the records no run of DIR's sweep plan (sweep.json) "
                                             "names: earlier plans, weights or data, which its tables do not read.")):
    """Remove DIR's stale records that a current record of the same run replaced (after a rerun
    with changed code or protocol); a stale record that is its run's only measurement is kept.
    With --unplanned, also the records the sweep's plan does not name (after retraining a model or
    changing the sweep's settings)."""
    if not (out / "records").is_dir():
        raise UserError(f"{out} holds no records/ folder; pass a results directory")
    old = superseded(out)
    gone = set(old)
    extra = [p for p in unplanned(out) if p not in gone] if unplanned_too else []
    for p in old + extra:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {p}")
        if not dry_run:
            p.unlink()
    said = f"{len(old)} superseded stale record(s)"
    if unplanned_too:
        said += f", {len(extra)} record(s) no run of the plan names"
    typer.echo(said + (" (dry run)" if dry_run else ""))
