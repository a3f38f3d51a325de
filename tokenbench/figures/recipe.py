"""Figure recipes and the published figures they compare with: the files, read and validated.

A recipe is ``tokenbench/recipes/figures/<name>.toml`` (its format: :mod:`tokenbench.figures`);
the published figures are ``tokenbench/recipes/figures/published.csv``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError, did_you_mean

FIGURES_DIR = Path(__file__).resolve().parent.parent / "recipes" / "figures"  # the packaged figure recipes
PUBLISHED_FILE = FIGURES_DIR / "published.csv"
DEFAULT_OUT = Path("runs") / "figures"          # git-ignored: a figure of one's own
REFERENCE_OUT = Path("results") / "figures"     # the committed figures (only an explicit --out rewrites them)
GFLOPS_AGREEMENT = 0.1  # published GFLOPs are rounded to 0.1: ours must land within this of them
EMBEDDED_SUFFIXES = ("@embedded", "@default")
EMBEDDED_LIMIT = 1000
EMBEDDED_CKPT_DIR = Path("results")

FIGURE_KEYS = ("description", "papers", "x", "data", "split", "checkpoints", "embedded")
CKPT_KEYS = ("file", "help", "required")
EMBEDDED_KEYS = ("methods", "checkpoints", "drop", "limit", "model")
PUBLISHED_COLUMNS = ("paper", "source", "model", "weights", "method", "params", "gflops", "top1", "throughput",
                     "hardware", "dense_throughput", "note")


# --------------------------------------------------------------------------- recipes

@dataclass
class CheckpointSpec:
    """Checkpoint files of one method entry, relative to the checkpoint directory."""

    label: str
    file: str
    help: str = ""
    required: bool = False

    @property
    def templated(self) -> bool:
        return "{value}" in self.file


@dataclass
class Recipe:
    name: str
    description: str
    papers: list[str]
    x: str
    sweep: dict
    data: str = "imagenet"
    split: str = "val"
    checkpoints: dict[str, CheckpointSpec] = field(default_factory=dict)
    embedded: dict = field(default_factory=dict)
    source: str = ""

    def embedded_checkpoints(self) -> dict[str, CheckpointSpec]:
        return self.embedded.get("checkpoints", {})


def recipe_names() -> list[str]:
    return sorted(p.stem for p in FIGURES_DIR.glob("*.toml")) if FIGURES_DIR.is_dir() else []


def split_name(name: str) -> tuple[str, bool]:
    """(recipe name, embedded variant?) of ``NAME`` or ``NAME@embedded`` / ``NAME@default``."""
    for s in EMBEDDED_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)], True
    if "@" in name:
        raise UserError(f"unknown figure variant {name!r}: use NAME or NAME@embedded")
    return name, False


def _ckpt_specs(raw: Any, where: str, source: str) -> dict[str, CheckpointSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where} must be a table of method entries")
    out = {}
    for label, body in raw.items():
        if isinstance(body, str):
            body = {"file": body}
        if not isinstance(body, dict) or "file" not in body:
            raise UserError(f"{source}: {where}.{label} needs a `file`")
        for k in body:
            if k not in CKPT_KEYS:
                raise UserError(f"{source}: unknown key {k!r} in {where}.{label}{did_you_mean(k, CKPT_KEYS)}")
        out[label] = CheckpointSpec(label=label, file=str(body["file"]), help=str(body.get("help", "")),
                                    required=bool(body.get("required", False)))
    return out


def load_recipe(name: str | os.PathLike) -> Recipe:
    """A recipe by packaged name (``dynamicvit-deit-s``) or path, validated (its sweep too)."""
    import tomllib

    from ..sweep import parse_sweep

    p = Path(name)
    if not p.is_file():
        p = FIGURES_DIR / f"{name}.toml"
    if not p.is_file():
        names = recipe_names()
        raise UserError(f"no figure recipe {str(name)!r}{did_you_mean(str(name), names)} "
                        f"(available: {', '.join(names) or 'none'}; see `tokenbench figure list`)")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read figure recipe {p}: {str(e).splitlines()[0]}") from None
    source = str(p)
    for k in raw:
        if k not in ("figure", "sweep"):
            raise UserError(f"{source}: unknown top-level table {k!r} (a recipe has [figure] and [sweep])")
    fig = raw.get("figure") or {}
    sw = raw.get("sweep")
    if not isinstance(sw, dict) or not sw.get("methods"):
        raise UserError(f"{source}: a recipe needs a [sweep] with methods")
    for k in fig:
        if k not in FIGURE_KEYS:
            raise UserError(f"{source}: unknown key {k!r} in [figure]{did_you_mean(k, FIGURE_KEYS)}")
    emb = dict(fig.get("embedded") or {})
    for k in emb:
        if k not in EMBEDDED_KEYS:
            raise UserError(f"{source}: unknown key {k!r} in [figure.embedded]{did_you_mean(k, EMBEDDED_KEYS)}")
    emb["checkpoints"] = _ckpt_specs(emb.get("checkpoints"), "[figure.embedded.checkpoints]", source)
    from ..models import EMBEDDED_MODELS

    if emb.get("model", EMBEDDED_MODELS[0]) not in EMBEDDED_MODELS:  # the embedded model of the recipe's family
        raise UserError(f"{source}: [figure.embedded] model must be one of {', '.join(EMBEDDED_MODELS)}, "
                        f"got {emb['model']!r}")
    papers = fig.get("papers", [])
    papers = [papers] if isinstance(papers, str) else list(papers)
    rec = Recipe(name=p.stem, description=str(fig.get("description", "")), papers=[str(x) for x in papers],
                 x=str(fig.get("x", "target")), sweep=sw, data=str(fig.get("data", "imagenet")),
                 split=str(fig.get("split", "val")),
                 checkpoints=_ckpt_specs(fig.get("checkpoints"), "[figure.checkpoints]", source),
                 embedded=emb, source=source)
    # the sweep must parse as it stands (methods, parameters, grids)
    check = copy.deepcopy(sw)
    check.setdefault("name", rec.name)
    parse_sweep(check, f"{source} [sweep]")
    for label in list(rec.checkpoints) + list(rec.embedded_checkpoints()):
        if label not in sw["methods"]:
            raise UserError(f"{source}: checkpoints for {label!r}, which is no [sweep.methods] entry")
    for label in emb.get("drop", []) + list(emb.get("methods", {})):
        if label not in sw["methods"]:
            raise UserError(f"{source}: [figure.embedded] names {label!r}, which is no [sweep.methods] entry")
    return rec


def list_recipes() -> list[dict]:
    return [{"name": r.name, "description": r.description, "papers": r.papers,
             "models": r.sweep.get("models", [r.sweep.get("model")])}
            for r in map(load_recipe, recipe_names())]


# --------------------------------------------------------------------------- published figures

@dataclass
class Published:
    """One published figure: a paper's numbers for one model, method and parameters."""

    paper: str
    source: str
    model: str
    weights: str
    method: str
    params: dict
    gflops: Optional[float] = None
    top1: Optional[float] = None
    throughput: Optional[float] = None
    hardware: str = ""
    dense_throughput: Optional[float] = None
    note: str = ""
    row: int = 0

    @property
    def speedup(self) -> Optional[float]:
        """The paper's own speedup: its method over its dense model, on its hardware."""
        if self.throughput and self.dense_throughput:
            return self.throughput / self.dense_throughput
        return None


def _num(s: str, what: str, where: str) -> Optional[float]:
    s = (s or "").strip()
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        raise UserError(f"{where}: {what} must be a number, got {s!r}") from None


def load_published(path: str | os.PathLike | None = None) -> list[Published]:
    p = Path(path) if path else PUBLISHED_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read published figures {p}: {e.strerror}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in PUBLISHED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{p}: missing columns {', '.join(missing)}")
    out = []
    for i, r in enumerate(reader, start=1):
        where = f"{p} row {i}"
        try:
            params = json.loads(r["params"] or "{}")
        except json.JSONDecodeError:
            raise UserError(f"{where}: params must be JSON, got {r['params']!r}") from None
        out.append(Published(paper=r["paper"].strip(), source=r["source"].strip(), model=r["model"].strip(),
                             weights=r["weights"].strip(), method=r["method"].strip(), params=params,
                             gflops=_num(r["gflops"], "gflops", where), top1=_num(r["top1"], "top1", where),
                             throughput=_num(r["throughput"], "throughput", where), hardware=r["hardware"].strip(),
                             dense_throughput=_num(r["dense_throughput"], "dense_throughput", where),
                             note=(r.get("note") or "").strip(), row=i))
    return out


def arch(model: str) -> str:
    """The architecture of a timm name with or without its weight tag."""
    return model.split(".", 1)[0]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def matches(pub: Published, model: str, method: str, params: dict) -> bool:
    """Same architecture and method, and every published parameter equal to ours."""
    return (arch(pub.model) == arch(model) and pub.method == method
            and all(k in params and _same(v, params[k]) for k, v in pub.params.items()))


def weights_same(pub: Published, ours: str, checkpoint: Optional[str]) -> bool:
    """Whether our weights are the ones the published figure is of (a checkpoint counts as the release)."""
    if pub.weights.startswith("timm:"):
        return not checkpoint and ours == pub.weights
    return bool(checkpoint)


