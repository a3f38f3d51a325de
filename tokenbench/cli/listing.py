"""`tokenbench list`: the methods one line each, and `tokenbench list METHOD`: one method in full.
Plain text wrapped at the terminal's width (80 columns when the output is not a terminal)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from typing import Optional

import typer

from ..errors import UserError


def _width() -> int:
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80


def _kind(m: dict) -> str:
    if m["family"] == "none":
        return "none"
    return f"{m['family']}, {'learned' if m['learned'] else 'training-free'}"


def overview(methods: list[dict], width: int) -> list[str]:
    """One entry per method: name, family and knob on the first line, the summary wrapped under it."""
    reducing = [m for m in methods if m["family"] != "none"]
    name_w = max(len(m["name"]) for m in methods) + 2
    lines = [f"tokenbench methods: {len(reducing)} reduction methods and the dense model", ""]
    for m in methods:
        knob = f"; knob {m['knob']}" if m.get("knob") else ""
        lines.append(f"{m['name']:<{name_w}}{_kind(m)}{knob}")
        lines += textwrap.wrap(m["summary"], width, initial_indent=" " * name_w, subsequent_indent=" " * name_w)
    lines += ["", "`tokenbench list METHOD`: its parameters (type, default, range, help)."]
    return lines


def detail(m: dict, width: int) -> list[str]:
    """Everything a method declares, its parameters one block each."""
    lines = [f"{m['name']} (version {m['version']}): {_kind(m)}"]
    lines += textwrap.wrap(m["summary"], width, initial_indent="  ", subsequent_indent="  ")
    facts = [f"backbones: {', '.join(m['backbones'])}"]
    if m.get("knob"):
        facts.append(f"budget knob: {m['knob']}")
    if m.get("seed_param"):
        facts.append(f"seed: {m['seed_param']}")
    facts.append("deterministic" if m.get("deterministic") else "random choices")
    lines += textwrap.wrap("; ".join(facts), width, initial_indent="  ", subsequent_indent="  ")
    for title, params in (("parameters", m["params"]), ("training parameters", m.get("train_params", []))):
        if not params:
            continue
        lines += ["", f"{title}:"]
        for p in params:
            star = " (the knob)" if p["name"] == m.get("knob") else ""
            rng = f", range {p['range']}" if p.get("range") else ""
            head = f"  {p['name']}{star}: {p['type']}, default {json.dumps(p['default'])}{rng}"
            lines += textwrap.wrap(head, width, subsequent_indent="      ")
            lines += textwrap.wrap(p["help"], width, initial_indent="      ", subsequent_indent="      ")
    if not m["params"]:
        lines += ["", "no parameters"]
    return lines


def markdown_table(methods: list[dict]) -> list[str]:
    """Every method in one Markdown table (the README's): name, family, training, budget knob, summary."""
    lines = ["| method | family | training | budget knob | what it does |", "|---|---|---|---|---|"]
    for m in methods:
        training = "–" if m["family"] == "none" else ("learned" if m["learned"] else "training-free")
        knob = f"`{m['knob']}`" if m.get("knob") else "–"
        summary = m["summary"].replace("|", "\\|")
        lines.append(f"| `{m['name']}` | {m['family']} | {training} | {knob} | {summary} |")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(method: Optional[str] = typer.Argument(None, help="One method to show in full."),
                 json_: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
                 markdown: bool = typer.Option(False, "--markdown", help="Every method in one Markdown table "
                                                                         "(the README's).")):
        """The registered methods, one line each (family, training-free or learned, budget knob,
        summary); with METHOD, that method in full (its parameters: type, default, range, help)."""
        from ..registry import get_method, list_methods

        methods = list_methods()
        if markdown and (method is not None or json_):
            raise UserError("--markdown writes every method's row; it takes no METHOD and no --json")
        if method is not None:
            name = get_method(method).name  # unknown names: one line with suggestions
            m = next(x for x in methods if x["name"] == name)
            if json_:
                typer.echo(json.dumps(m, default=str))
                return
            typer.echo("\n".join(detail(m, _width())))
            return
        if json_:
            typer.echo(json.dumps({"methods": methods}, default=str))
            return
        if markdown:
            typer.echo("\n".join(markdown_table(methods)))
            return
        typer.echo("\n".join(overview(methods, _width())))
