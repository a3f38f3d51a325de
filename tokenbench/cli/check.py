"""`tokenbench check METHOD`: the shared adapter checks (:mod:`tokenbench.adapter_checks`, the
ones tests/test_adapters.py runs on every method) on one registered method, a plugin included."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check_cmd(method: str = typer.Argument(..., help="A registered method (built-in or plugin)."),
                  json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")):
        """Run the shared adapter checks on METHOD (a tiny random ViT, random images; seconds): its
        declaration, shapes, declared token schedule against the forward, batch independence,
        determinism and seeds, refused bad parameters, restore, fewer FLOPs where it reduces, the full
        map of a dense task as declared, and a training step for learned methods.  Exit status 1 when
        a check fails."""
        from ..adapter_checks import run_checks
        from ..registry import get_method

        name = get_method(method).name
        results = run_checks(name)
        failed = [r for r in results if not r["ok"]]
        if json_:
            typer.echo(json.dumps({"method": name, "passed": not failed, "checks": results}))
        else:
            for r in results:
                typer.echo(f"{'ok  ' if r['ok'] else 'FAIL'}  {r['check']}" + (f": {r['message']}" if r["message"]
                                                                               else ""))
            typer.echo(f"{name}: {len(results) - len(failed)} of {len(results)} checks passed")
        if failed:
            raise typer.Exit(1)
