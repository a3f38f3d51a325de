"""Paper figures: recipes that regenerate the papers' tables and plots, ours beside theirs.

A figure recipe (``tokenbench/figures/<name>.toml``) is a sweep (the ``[sweep]`` table,
in the format of :mod:`tokenbench.sweep`: models, methods, parameter grids or FLOPs
targets, throughput settings) plus what the figure needs beyond it (the ``[figure]``
table)::

    [figure]
    description = "one line"          # `tokenbench figure list`
    papers = ["DynamicViT"]           # which papers' rows of published.csv to compare with
    x = "keep_rate"                   # first panel's x axis: a method parameter, or "target"
    data = "imagenet"                 # the dataset accuracy is measured on (with --data-dir)
    split = "val"

    [figure.checkpoints.<label>]      # checkpoint files a method entry uses, in --checkpoint-dir
    file = "dynamicvit-deit-s-{value}.pth"   # {value}: the entry's searched parameter (keep_rate, r)
    help = "where the files come from"       # printed when accuracy cannot be measured without them
    required = false                  # true: drop the entry when its file is missing

    [figure.embedded]                 # the same recipe on the embedded Fashion-MNIST model
    drop = ["label"]                  # entries that make no sense there
    limit = 1000                      # accuracy on a seeded stratified subset of the test split
    [figure.embedded.methods.tome]    # parameter grids replaced for the embedded model
    r = [1, 2, 3, 4]
    [figure.embedded.checkpoints.dynamicvit]
    file = "dynamicvit-{value}/model.pt"     # relative to --checkpoint-dir (default `results`)

    [sweep]                           # a sweep file's content (name and out are set here)
    models = ["deit_small_patch16_224.fb_in1k"]   # timm names with the weight tag the paper used
    [sweep.methods.none]
    [sweep.methods.dynamicvit]
    keep_rate = [0.5, 0.6, 0.7, 0.8, 0.9]

:func:`run_figure` builds the sweep (the recipe's, with the command line's data,
weights, checkpoints and throughput settings), runs it with :mod:`tokenbench.sweep` and
:mod:`tokenbench.runner` into ``results/figures/<name>/`` (records are reused, as in
any sweep), reads the rows with :func:`tokenbench.report.collect`, matches each row with
the published figures (``figures/published.csv``: same architecture, method and
parameters, from one of the recipe's papers) and writes ``<name>.md`` and ``<name>.csv``
(ours, published and the difference: GFLOPs, speedup over dense, top-1) and
``<name>.png`` / ``<name>.pdf`` (the published points overlaid).

Without data or real weights everything that needs neither is still produced: GFLOPs and
tokens per block for every row (random weights do not change them), throughput on the
device at hand (``throughput=False`` skips it), and top-1 marked "not measured" with the
command that would measure it.  Accuracy is measured only for runs whose weights are
real (timm's pretrained tag, a checkpoint, the embedded model); a learned method
(DynamicViT) needs its checkpoint.

Published throughput is never set beside ours: each paper's speedup is its own method
over its own dense model on its own hardware, and ours is ours over our dense model on
ours.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import UserError, did_you_mean
from .sweep import DENSE_METHOD, fmt_value

FIGURES_DIR = Path(__file__).resolve().parent / "figures"
PUBLISHED_FILE = FIGURES_DIR / "published.csv"
DEFAULT_OUT = Path("results") / "figures"
GFLOPS_AGREEMENT = 0.1  # published GFLOPs are rounded to 0.1: ours must land within this of them
EMBEDDED_SUFFIXES = ("@embedded", "@default")
EMBEDDED_LIMIT = 1000
EMBEDDED_CKPT_DIR = Path("results")

FIGURE_KEYS = ("description", "papers", "x", "data", "split", "checkpoints", "embedded")
CKPT_KEYS = ("file", "help", "required")
EMBEDDED_KEYS = ("methods", "checkpoints", "drop", "limit")
PUBLISHED_COLUMNS = ("paper", "source", "model", "weights", "method", "params", "gflops", "top1", "throughput",
                     "hardware", "dense_throughput", "note")

FLAG_HELP = {
    "gflops-differs": f"our GFLOPs differ from the published value by more than {GFLOPS_AGREEMENT}",
    "weights-differ": "our top-1 is of other weights than the published one (e.g. off the shelf vs trained)",
    "flops-miss": "FLOPs land further than the tolerance from the matched-FLOPs target",
    "noisy": "throughput interquartile range above 10% of the median",
    "busy": "the machine was busy while timing",
    "incomplete": "a planned measurement is missing (rerun to complete)",
    "warning": "the records carry warnings",
}


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

    from .sweep import parse_sweep

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


# --------------------------------------------------------------------------- options and the sweep

@dataclass
class FigureOptions:
    data_dir: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    pretrained: bool = False
    out: Optional[str] = None
    embedded: bool = False
    model: Optional[str] = None          # replaces every model of the recipe (published rows then match none)
    img_size: Optional[int] = None
    limit: Optional[int] = None
    throughput: bool = True
    accuracy: bool = True
    batch_size: Optional[int] = None
    min_run_time: Optional[float] = None
    threads: Optional[int] = None
    device: Optional[str] = None
    force: bool = False


@dataclass
class Plan:
    recipe: Recipe
    name: str                      # the variant's name (NAME or NAME@embedded)
    embedded: bool
    sweep: Any                     # tokenbench.sweep.Sweep
    out: Path
    checkpoint_dir: Optional[Path]
    checkpoints: dict[str, CheckpointSpec]
    found: dict[str, dict[str, str]]     # label -> {value key or "*": path}
    dropped: list[str]
    published: list[Published]
    options: FigureOptions


def _template_regex(template: str) -> re.Pattern:
    parts = template.split("{value}")
    return re.compile("^" + "(?P<value>[^/]+?)".join(re.escape(p) for p in parts) + "$")


def find_checkpoints(ck_dir: Optional[Path], spec: CheckpointSpec, cls=None) -> dict[str, str]:
    """{json value key (or "*"): path} of the spec's files present in ``ck_dir``."""
    if ck_dir is None or not Path(ck_dir).is_dir():
        return {}
    ck_dir = Path(ck_dir)
    if not spec.templated:
        p = ck_dir / spec.file
        return {"*": str(p)} if p.is_file() else {}
    rx = _template_regex(spec.file)
    glob = spec.file.replace("{value}", "*")
    out = {}
    for p in sorted(ck_dir.glob(glob)):
        if not p.is_file():
            continue
        m = rx.match(p.relative_to(ck_dir).as_posix())
        if not m:
            continue
        raw = m.group("value")
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            v = raw
        if cls is not None and cls.search_param:
            try:
                v = cls.param(cls.search_param).parse(v, cls.name)
            except UserError:
                continue
        out[json.dumps(v)] = str(p)
    return out


def default_out(name: str, opts: FigureOptions) -> Path:
    suffix = "@embedded" if opts.embedded else ""
    if opts.model:
        suffix += "@" + opts.model.replace("/", "_")
    return DEFAULT_OUT / f"{name}{suffix}"


def build_plan(name: str, opts: Optional[FigureOptions] = None) -> Plan:
    """The recipe's sweep with the options applied (validated), and what the figure compares with."""
    from .registry import get_method
    from .sweep import parse_sweep

    opts = copy.copy(opts or FigureOptions())
    base, emb_suffix = split_name(name)
    if emb_suffix:
        opts.embedded = True
    recipe = load_recipe(base)
    embedded = opts.embedded
    if embedded and opts.model:
        raise UserError("--embedded replaces the model with the embedded one: give --embedded or --model, not both")
    variant = recipe.name + ("@embedded" if embedded else "")
    out = Path(opts.out) if opts.out else default_out(recipe.name, opts)

    raw = copy.deepcopy(recipe.sweep)
    raw["name"] = variant
    raw["out"] = str(out)
    raw.setdefault("description", recipe.description)
    methods = raw["methods"]
    for label in list(methods):
        methods[label] = dict(methods[label] or {})
    dropped: list[str] = []
    if embedded:
        from .models import EMBEDDED_NAME

        raw.pop("model", None)
        raw["models"] = [EMBEDDED_NAME]
        raw.pop("img_size", None)
        for label in recipe.embedded.get("drop", []):
            if methods.pop(label, None) is not None:
                dropped.append(label)
        for label, body in (recipe.embedded.get("methods") or {}).items():
            methods.setdefault(label, {}).update(body or {})
    elif opts.model:
        raw.pop("model", None)
        raw["models"] = [opts.model]
    if opts.img_size is not None:
        raw["img_size"] = opts.img_size
    raw["pretrained"] = bool(opts.pretrained) and not embedded

    # checkpoints present in the directory
    specs = recipe.embedded_checkpoints() if embedded else recipe.checkpoints
    ck_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else (EMBEDDED_CKPT_DIR if embedded else None)
    if opts.checkpoint_dir and not Path(opts.checkpoint_dir).is_dir():
        raise UserError(f"checkpoint directory {opts.checkpoint_dir} does not exist")
    found: dict[str, dict[str, str]] = {}
    for label, spec in specs.items():
        if label not in methods:
            continue
        body = methods[label]
        cls = get_method(body.get("method", label))
        if spec.templated and not cls.search_param:
            raise UserError(f"{recipe.source}: checkpoint file {spec.file!r} uses {{value}} but {cls.name} has no "
                            "searched parameter")
        got = find_checkpoints(ck_dir, spec, cls)
        if spec.templated and cls.search_param in body:  # a grid: only its values
            grid = body[cls.search_param]
            grid = grid if isinstance(grid, list) else [grid]
            keys = {json.dumps(cls.param(cls.search_param).parse(v, cls.name)) for v in grid}
            got = {k: v for k, v in got.items() if k in keys}
        if not got:
            if spec.required:
                methods.pop(label)
                dropped.append(label)
            continue
        found[label] = got
        if spec.templated:
            body["checkpoints"] = dict(got)
        else:
            body["checkpoint"] = got["*"]

    # what to measure
    measure = ["flops"] + (["throughput"] if opts.throughput else [])
    data = None
    if opts.accuracy:
        if embedded:
            data = {"name": "fashion-mnist", "split": "test",
                    "limit": opts.limit if opts.limit is not None else int(recipe.embedded.get("limit",
                                                                                             EMBEDDED_LIMIT))}
            if opts.data_dir:
                data["dir"] = str(opts.data_dir)
        elif opts.data_dir:
            data = {"name": recipe.data, "split": recipe.split, "dir": str(opts.data_dir)}
            if opts.limit is not None:
                data["limit"] = opts.limit
    if data:
        raw["data"] = data
        measure.append("accuracy")
    else:
        raw.pop("data", None)
    raw["measure"] = measure
    tp = dict(raw.get("throughput") or {})
    for k, v in (("batch_size", opts.batch_size), ("min_run_time", opts.min_run_time), ("threads", opts.threads)):
        if v is not None:
            tp[k] = v
    raw["throughput"] = tp
    if opts.device:
        raw["device"] = opts.device
    sw = parse_sweep(raw, f"figure {variant}")

    published = []
    if not embedded:
        archs = {arch(m) for m in sw.models}
        published = [p for p in load_published() if p.paper in recipe.papers and arch(p.model) in archs]
    return Plan(recipe=recipe, name=variant, embedded=embedded, sweep=sw, out=out, checkpoint_dir=ck_dir,
                checkpoints=specs, found=found, dropped=dropped, published=published, options=opts)


def expand_plan(plan: Plan, searcher=None) -> list:
    """The runs of the plan's sweep (matched-FLOPs values found by ``searcher``)."""
    from .sweep import expand

    return expand(plan.sweep, searcher)


def accuracy_status(plan: Plan, run) -> tuple[bool, str]:
    """(measure accuracy?, why not) for one run."""
    from .models import EMBEDDED_NAME
    from .registry import get_method

    if "accuracy" not in plan.sweep.measure:
        if not plan.options.accuracy:
            return False, "accuracy skipped (--no-accuracy)"
        return False, "no ImageNet (--data-dir)"
    cls = get_method(run.method)
    if cls.learned and not run.checkpoint:
        spec = plan.checkpoints.get(run.label)
        want = ""
        if spec is not None:
            sp = cls.search_param
            val = run.params.get(sp) if sp else None
            want = f": expected {spec.file.replace('{value}', fmt_value(val) if val is not None else 'K')}"
        return False, f"no checkpoint for the learned {cls.name}{want}"
    if run.model == EMBEDDED_NAME or run.checkpoint or run.pretrained:
        return True, ""
    return False, "random-init weights (add --pretrained)"


def measure_command(plan: Plan) -> str:
    """The command that measures this figure's accuracy."""
    o = plan.options
    parts = ["tokenbench", "figure", plan.recipe.name]
    if plan.embedded:
        parts.append("--embedded")
        if plan.checkpoints and o.checkpoint_dir:
            parts += ["--checkpoint-dir", str(o.checkpoint_dir)]
    else:
        parts += ["--data-dir", str(o.data_dir) if o.data_dir else "/path/to/imagenet", "--pretrained"]
        if plan.checkpoints:
            parts += ["--checkpoint-dir", str(o.checkpoint_dir) if o.checkpoint_dir else "/path/to/checkpoints"]
        if o.model:
            parts += ["--model", o.model]
    if o.img_size:
        parts += ["--img-size", str(o.img_size)]
    if o.out:
        parts += ["--out", str(o.out)]
    return " ".join(parts)


# --------------------------------------------------------------------------- running

def run_figure(name: str, opts: Optional[FigureOptions] = None,
               on_step: Optional[Callable[[int, int, Any, str], None]] = None, plots: bool = True) -> dict:
    """Measure what the figure needs (reusing records), then write its table and plot."""
    from . import sweep as sw_mod
    from .store import Store

    plan = build_plan(name, opts)
    sw = plan.sweep
    out, runs, keys, searcher = sw_mod.prepare(sw, plan.out, force=plan.options.force)
    status = [accuracy_status(plan, r) for r in runs]
    store = Store(out)
    base = dataclasses.replace(sw, measure=[k for k in sw.measure if k != "accuracy"])
    acc_runs = [r for r, (ok, _) in zip(runs, status) if ok] if "accuracy" in sw.measure else []
    total = sum(len(sw_mod.kinds_for(r, base)) for r in runs) + len(acc_runs)
    done = [0]

    def step(i, n, run, kind):
        if on_step and run is not None:
            on_step(done[0] + i, total, run, kind)

    sw_mod.execute(base, runs, store, force=plan.options.force, on_step=step)
    done[0] = sum(len(sw_mod.kinds_for(r, base)) for r in runs)
    if acc_runs:
        sw_mod.execute(dataclasses.replace(sw, measure=["accuracy"]), acc_runs, store, force=plan.options.force,
                       on_step=step)
    if on_step:
        on_step(total, total, None, "")
    # the plan lists only the measurements that were meant to be made
    keys = [{k: v for k, v in kk.items() if k != "accuracy" or ok} for kk, (ok, _) in zip(keys, status)]
    sw_mod.write_plan(out, sw, runs, keys)
    return write_figure(plan, runs, keys, status, searcher, plots=plots)


def _row_run_index(keys: list[dict]) -> dict[str, int]:
    return {kk["flops"]: i for i, kk in enumerate(keys) if "flops" in kk}


def _weights_text(weights: Optional[str], checkpoint: Optional[str]) -> str:
    if checkpoint:
        return f"checkpoint {Path(checkpoint).name}"
    if not weights:
        return "–"
    if weights.startswith("random-init"):
        return "random-init"
    return weights


def collect_figure(plan: Plan, runs: list, keys: list[dict], status: list[tuple[bool, str]], searcher=None) -> dict:
    """Figure rows: each of our rows beside every published figure it matches, and the differences."""
    from .report import collect
    from .store import Store

    res = collect(plan.out)
    store = Store(plan.out)
    idx = _row_run_index(keys)
    rows: list[dict] = []
    used: set[int] = set()
    for r in res["display"]:
        i = idx.get(r.get("flops_key"))
        run = runs[i] if i is not None else None
        frec = store.get(r["flops_key"]) if r.get("flops_key") else None
        fm = (frec or {}).get("metrics", {})
        params = dict(r["_params"])
        ok, why = status[i] if i is not None else (False, "")
        ours = {
            "model": r["model"], "label": r["label"], "method": r["method"], "params": params,
            "seeds": r.get("_seeds"), "target": r.get("target"), "targets": r.get("_targets") or [],
            "tokens": fm.get("tokens"), "tokens_mlp": fm.get("tokens_mlp"),
            "gflops": r.get("gflops"), "flops_rel": r.get("flops_rel"),
            "img_per_s": r.get("img_per_s"), "speedup": r.get("speedup"),
            "top1": r.get("top1"), "top1_lo": r.get("top1_lo"), "top1_hi": r.get("top1_hi"), "n": r.get("n"),
            "weights": (frec or {}).get("weights"), "checkpoint": r.get("checkpoint"),
            "learned": r.get("learned"), "accuracy_status": "measured" if r.get("top1") is not None else (
                why or "not measured"),
            "report_flags": sorted(r["_flags"]), "warnings": r.get("warnings") or [],
            "device": r.get("device"), "device_name": r.get("device_name"), "threads": r.get("threads"),
            "batch_size": r.get("batch_size"),
        }
        pubs = [p for p in plan.published if matches(p, r["model"], r["method"], params)]
        for p in pubs:
            used.add(p.row)
        for p in pubs or [None]:
            rows.append(_compare_row(ours, p, in_recipe=True))
    # published figures of the recipe's models that no run reproduces: our GFLOPs for the same configuration
    extra = []
    if searcher is not None:
        for p in plan.published:
            if p.row in used:
                continue
            model = next((m for m in plan.sweep.models if arch(m) == arch(p.model)), None)
            if model is None:
                continue
            from .registry import get_method

            try:
                params = get_method(p.method).validate(dict(p.params))
                g = searcher.count(model, plan.sweep.img_size, p.method, params)
            except UserError:
                continue
            ours = {"model": model, "label": "dense" if p.method == DENSE_METHOD else p.method, "method": p.method,
                    "params": params, "seeds": None, "target": None, "targets": [], "tokens": None,
                    "tokens_mlp": None, "gflops": g, "flops_rel": None, "img_per_s": None, "speedup": None,
                    "top1": None, "top1_lo": None, "top1_hi": None, "n": None, "weights": None, "checkpoint": None,
                    "learned": None, "accuracy_status": "not in this recipe's runs (GFLOPs only)",
                    "report_flags": [], "warnings": []}
            extra.append(_compare_row(ours, p, in_recipe=False))
    return {"rows": rows, "extra": extra, "res": res, "plan": plan}


def _compare_row(ours: dict, p: Optional[Published], in_recipe: bool) -> dict:
    row = dict(ours)
    row["in_recipe"] = in_recipe
    flags = set(ours["report_flags"])
    row.update({"paper": None, "source": None, "source_row": None, "gflops_published": None, "gflops_diff": None,
                "speedup_published": None, "speedup_diff": None, "top1_published": None, "top1_diff": None,
                "weights_published": None, "hardware_published": None, "throughput_published": None,
                "dense_throughput_published": None, "weights_same": None})
    if p is not None:
        row.update({"paper": p.paper, "source": p.source, "source_row": p.row, "gflops_published": p.gflops,
                    "speedup_published": p.speedup, "top1_published": p.top1, "weights_published": p.weights,
                    "hardware_published": p.hardware, "throughput_published": p.throughput,
                    "dense_throughput_published": p.dense_throughput})
        if p.gflops is not None and ours["gflops"] is not None:
            row["gflops_diff"] = ours["gflops"] - p.gflops
            if abs(row["gflops_diff"]) > GFLOPS_AGREEMENT + 1e-9:
                flags.add("gflops-differs")
        if p.speedup is not None and ours["speedup"] is not None:
            row["speedup_diff"] = ours["speedup"] - p.speedup
        if p.top1 is not None and ours["top1"] is not None:
            row["top1_diff"] = ours["top1"] - p.top1
            row["weights_same"] = weights_same(p, ours["weights"] or "", ours["checkpoint"])
            if not row["weights_same"]:
                flags.add("weights-differ")
    row["flags"] = sorted(flags)
    return row


# --------------------------------------------------------------------------- tables

CSV_COLUMNS = ["in_recipe", "model", "label", "method", "params", "target", "tokens", "tokens_mlp", "gflops",
               "gflops_published", "gflops_diff", "flops_rel", "img_per_s", "speedup", "speedup_published",
               "speedup_diff", "top1", "top1_lo", "top1_hi", "n", "top1_published", "top1_diff", "accuracy_status",
               "weights", "checkpoint", "weights_published", "paper", "source", "hardware_published",
               "throughput_published", "dense_throughput_published", "device", "device_name", "threads",
               "batch_size", "flags"]


def _f(x: Optional[float], fmt: str, none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _signed(x: Optional[float], fmt: str) -> str:
    return "–" if x is None else ("+" if x >= 0 else "−") + format(abs(x), fmt)


def tokens_text(tokens: Optional[list]) -> str:
    if not tokens:
        return "–"
    return fmt_value([int(round(t)) if abs(t - round(t)) < 1e-6 else round(t, 1) for t in tokens])


def params_text(row: dict) -> str:
    s = ", ".join(f"{k}={fmt_value(v)}" for k, v in row["params"].items())
    if row.get("seeds"):
        s += (", " if s else "") + f"{len(row['seeds'])} seeds"
    return s or "–"


def _cells(row: dict, src: dict[int, int], matched: bool) -> list[str]:
    top1 = "not measured"
    if row["top1"] is not None:
        top1 = f"{row['top1']:.2f}"
        if row.get("top1_lo") is not None:
            top1 += f" [{row['top1_lo']:.1f}, {row['top1_hi']:.1f}]"
    elif not row["in_recipe"]:
        top1 = "–"
    cells = [row["label"], params_text(row)]
    if matched:
        cells.append(row.get("target") or "–")
    x = "x"
    cells += [
        tokens_text(row.get("tokens")),
        _f(row["gflops"], ".3f"), _f(row["gflops_published"], ".1f"), _signed(row["gflops_diff"], ".2f"),
        _f(row["img_per_s"], ".1f"), _f(row["speedup"], ".2f") + (x if row["speedup"] is not None else ""),
        _f(row["speedup_published"], ".2f") + (x if row["speedup_published"] is not None else ""),
        top1, _f(row["top1_published"], ".2f"), _signed(row["top1_diff"], ".2f"),
        _weights_text(row["weights"], row["checkpoint"]) if row["in_recipe"] else "–",
        f"[{src[row['source_row']]}]" if row.get("source_row") else "–",
        ", ".join(row["flags"]),
    ]
    return cells


def markdown(fig: dict) -> str:
    plan: Plan = fig["plan"]
    rows, extra = fig["rows"], fig["extra"]
    matched = plan.recipe.x == "target"
    cols = ["Method", "Params"] + (["Target"] if matched else []) + [
        "Tokens per block", "GFLOPs", "GFLOPs pub.", "Δ GFLOPs", "img/s", "Speedup", "Speedup pub.", "Top-1 %",
        "Top-1 pub.", "Δ Top-1", "Weights (ours)", "Src", "Flags"]
    # footnotes: published sources in order of first use
    src: dict[int, int] = {}
    for r in rows + extra:
        if r.get("source_row") and r["source_row"] not in src:
            src[r["source_row"]] = len(src) + 1
    by_row = {p.row: p for p in plan.published}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"# Figure {plan.name}", ""]
    if plan.recipe.description:
        lines += [plan.recipe.description + ("" if not plan.embedded else
                                             " — on the embedded Fashion-MNIST model (`default`)."), ""]
    weights = sorted({_weights_text(r["weights"], r["checkpoint"]) for r in rows})
    lines.append(f"Model: {', '.join(models)}; weights: {', '.join(weights)}.")
    from .report import _setting_line

    lines += [_setting_line(fig["res"]), ""]

    def table(rs):
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in rs:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, src, matched)) + " |")
        return out

    lines += table(rows) + [""]
    if extra:
        lines += ["Published figures of this model that none of the runs above reproduces (our GFLOPs counted "
                  "for the same configuration):", ""]
        lines += table(extra) + [""]
    lines += _notes(fig, src, by_row)
    return "\n".join(lines) + "\n"


def gflops_agreement(fig: dict) -> dict:
    """How many published GFLOPs values ours agree with (within GFLOPS_AGREEMENT)."""
    pairs = [r for r in fig["rows"] + fig["extra"] if r["gflops_diff"] is not None]
    differ = [r for r in pairs if abs(r["gflops_diff"]) > GFLOPS_AGREEMENT + 1e-9]
    return {"compared": len(pairs), "agree": len(pairs) - len(differ),
            "differ": [{"label": r["label"], "params": r["params"], "ours": r["gflops"],
                        "published": r["gflops_published"], "source_row": r["source_row"]} for r in differ],
            "max_abs_diff": max((abs(r["gflops_diff"]) for r in pairs), default=None)}


def _notes(fig: dict, src: dict[int, int], by_row: dict[int, Published]) -> list[str]:
    plan: Plan = fig["plan"]
    rows = fig["rows"]
    lines = []
    ag = gflops_agreement(fig)
    if plan.embedded:
        lines.append("Published figures: none (they are of ImageNet models; this is the embedded Fashion-MNIST "
                     "model, so only ours are shown).")
    elif plan.options.model:
        lines.append(f"Published figures: none match (the recipe's model was replaced by {plan.options.model}).")
    elif ag["compared"]:
        s = (f"GFLOPs agreement: {ag['agree']} of {ag['compared']} published values within {GFLOPS_AGREEMENT:g} "
             f"of ours (largest difference {ag['max_abs_diff']:.3f}).")
        if ag["differ"]:
            s += " Differing: " + "; ".join(f"{d['label']} ({', '.join(f'{k}={fmt_value(v)}' for k, v in d['params'].items())}): "
                                            f"{d['ours']:.3f} vs {d['published']:.1f} [{src.get(d['source_row'])}]"
                                            for d in ag["differ"]) + "."
        lines.append(s)
    nopub = [r for r in rows if r["paper"] is None] if not plan.embedded and not plan.options.model else []
    if nopub:
        lines.append(f"{len(nopub)} row(s) have no published counterpart in the recipe's papers "
                     f"({', '.join(plan.recipe.papers)}): published cells –.")
    lines += ["",
              "GFLOPs: fvcore, one multiply-add = one FLOP, per image, the method's own scoring/prediction modules "
              "included; published GFLOPs are rounded by the papers to 0.1. Tokens per block: the sequence entering "
              "each block (class token included; `197x3` = 197 in three blocks). Speedup: throughput over the dense "
              "model's, ours on our device, published = the paper's method over the paper's own dense model on the "
              "paper's hardware (never our throughput against theirs). Top-1: 95% Wilson interval.", ""]
    missing = [r for r in rows if r["top1"] is None]
    if missing:
        reasons = sorted({r["accuracy_status"] for r in missing})
        lines.append(f"Top-1 not measured for {len(missing)} of {len(rows)} rows: " + "; ".join(reasons) + ".")
        lines.append(f"To measure it: `{measure_command(plan)}`.")
        need = [s for s in plan.checkpoints.values()]
        if need:
            lines.append("Checkpoints it looks for in --checkpoint-dir:")
            for s in need:
                have = plan.found.get(s.label)
                lines.append(f"- `{s.file}` ({s.label}): {s.help}" + (
                    f" [found: {', '.join(Path(p).name for p in have.values())}]" if have else ""))
        lines.append("")
    if plan.dropped:
        lines += [f"Entries left out: {', '.join(plan.dropped)} (their checkpoint is missing, or they do not apply "
                  "to this model).", ""]
    if src:
        lines.append("Sources of the published figures:")
        for row_no, n in sorted(src.items(), key=lambda kv: kv[1]):
            p = by_row[row_no]
            extra = []
            if p.weights:
                extra.append(f"weights {p.weights}")
            if p.hardware:
                extra.append(f"throughput on {p.hardware}, dense {p.dense_throughput:g} img/s" if p.dense_throughput
                             else f"throughput on {p.hardware}")
            if p.note:
                extra.append(p.note)
            lines.append(f"[{n}] {p.paper}: {p.source}" + (f" ({'; '.join(extra)})" if extra else "") +
                         f" — published.csv row {p.row}.")
        lines.append("")
    used = sorted({f for r in rows + fig["extra"] for f in r["flags"]})
    if used:
        lines += ["Flags: " + "; ".join(f"**{f}**: {FLAG_HELP.get(f, f)}" for f in used) + ".", ""]
    warn = sorted({f"- {r['label']} ({params_text(r)}): {w}" for r in rows for w in r["warnings"]})
    if warn:
        lines += ["Warnings:"] + warn + [""]
    if fig["res"]["notes"]:
        lines += ["Notes:"] + [f"- {n}" for n in fig["res"]["notes"]] + [""]
    return lines


def csv_text(fig: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in fig["rows"] + fig["extra"]:
        row = {}
        for k in CSV_COLUMNS:
            v = r.get(k)
            if k in ("params", "tokens", "tokens_mlp") and v is not None:
                v = json.dumps(v)
            elif k == "flags":
                v = ",".join(v)
            elif isinstance(v, float):
                v = repr(v)
            row[k] = "" if v is None else v
        w.writerow(row)
    return buf.getvalue()


# --------------------------------------------------------------------------- the plot

def _xval(row: dict, x: str) -> Optional[float]:
    if x == "target":
        return row["targets"][0] if row.get("targets") else None
    v = row["params"].get(x)
    if isinstance(v, list):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def plot_figure(fig: dict, base: Path) -> list[Path]:
    """Up to three panels: GFLOPs vs the recipe's x; speedup vs GFLOPs; top-1 vs GFLOPs (published overlaid)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .report import MARKERS, PLOT_RC, _savefig

    plan: Plan = fig["plan"]
    rows = [r for r in fig["rows"] if r["in_recipe"]]
    seen_ids: set[tuple] = set()
    ours_rows = []  # one per run (a row matching two published figures appears twice)
    for r in rows:
        k = (r["label"], json.dumps(r["params"], sort_keys=True), tuple(r["targets"]), r["checkpoint"])
        if k not in seen_ids:
            seen_ids.add(k)
            ours_rows.append(r)
    pubs = [r for r in fig["rows"] + fig["extra"] if r["paper"] is not None]
    x = plan.recipe.x
    labels = list(dict.fromkeys(r["label"] for r in ours_rows if r["method"] != DENSE_METHOD))
    palette = sns.color_palette("colorblind", max(1, len(labels)))
    style = {lab: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}
    dense = [r for r in ours_rows if r["method"] == DENSE_METHOD]
    papers = list(dict.fromkeys(r["paper"] for r in pubs))
    pub_marker = {p: m for p, m in zip(papers, ["X", "P", "d", "*", "h"])}

    def pub_x(r):  # where a published point sits on a GFLOPs axis
        return r["gflops_published"] if r["gflops_published"] is not None else r["gflops"]

    panels = [("gflops", "x")]
    if any(r["speedup"] is not None for r in ours_rows) or any(r["speedup_published"] is not None for r in pubs):
        panels.append(("speedup", "gflops"))
    if any(r["top1"] is not None for r in ours_rows) or any(r["top1_published"] is not None for r in pubs):
        panels.append(("top1", "gflops"))
    xlabel_1 = "FLOPs target (fraction of dense)" if x == "target" else x  # a method parameter's name
    with sns.axes_style("whitegrid"), plt.rc_context(PLOT_RC):
        fig_, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 0.4, 2.6), squeeze=False)
        for ax, (ycol, xcol) in zip(axes[0], panels):
            for lab in labels:
                color, marker = style[lab]
                pts = []
                for r in ours_rows:
                    if r["label"] != lab or r[ycol] is None:
                        continue
                    xv = _xval(r, x) if xcol == "x" else r["gflops"]
                    if xv is not None:
                        pts.append((xv, r[ycol]))
                pts.sort()
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, ms=3.5, lw=1.0,
                            label=lab, zorder=3)
            for d in dense:
                if d[ycol] is None:
                    continue
                if xcol == "x":
                    ax.axhline(d[ycol], color="black", ls=":", lw=0.8, label="dense", zorder=2)
                else:
                    ax.plot([d["gflops"]], [d[ycol]], marker="*", color="black", ms=8, ls="none", label="dense",
                            zorder=4)
            ycol_pub = {"gflops": "gflops_published", "speedup": "speedup_published", "top1": "top1_published"}[ycol]
            for r in pubs:
                yv = r[ycol_pub]
                xv = _xval(r, x) if xcol == "x" else pub_x(r)
                if yv is None or xv is None:
                    continue
                lab = "published" if len(papers) == 1 else f"published ({r['paper']})"
                ax.plot([xv], [yv], marker=pub_marker.get(r["paper"], "X"), ms=6, ls="none", mfc="none",
                        mec="black", mew=0.9, label=lab, zorder=5)
            ax.set_xlabel(xlabel_1 if xcol == "x" else "GFLOPs per image")
            ax.set_ylabel({"gflops": "GFLOPs per image", "speedup": "Speedup over dense",
                           "top1": "Top-1 accuracy (%)"}[ycol])
            if ycol == "top1" and not any(r["top1"] is not None for r in ours_rows):
                ax.set_title("top-1: published only (ours not measured)")
            if ycol == "speedup" and not any(r["speedup"] is not None for r in ours_rows):
                ax.set_title("speedup: published only (ours not measured)")
        handles, labs = [], []
        for ax in axes[0]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labs:
                    handles.append(h)
                    labs.append(l)
        fig_.suptitle(plan.name + ("" if not plan.embedded else " (embedded Fashion-MNIST model)"), fontsize=8)
        ncol = min(6, len(labs))
        rows_ = math.ceil(len(labs) / ncol) if labs else 0
        fig_.legend(handles, labs, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False,
                    handlelength=1.8, columnspacing=1.0)
        fig_.tight_layout(rect=(0, 0.035 + 0.055 * rows_, 1, 1))
        written = _savefig(fig_, base)
        plt.close(fig_)
    return written


# --------------------------------------------------------------------------- writing

def write_figure(plan: Plan, runs: list, keys: list[dict], status: list[tuple[bool, str]], searcher=None,
                 plots: bool = True) -> dict:
    from .store import atomic_write_text

    fig = collect_figure(plan, runs, keys, status, searcher)
    base = plan.out / plan.recipe.name
    files = []
    for ext, fn in (("md", markdown), ("csv", csv_text)):
        p = base.with_suffix(f".{ext}")
        try:
            atomic_write_text(p, fn(fig))
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror}") from None
        files.append(p)
    if plots:
        files += plot_figure(fig, base)
    fig["files"] = files
    fig["gflops_agreement"] = gflops_agreement(fig)
    fig["measure_command"] = measure_command(plan)
    return fig


def public_rows(fig: dict) -> list[dict]:
    """The rows as plain JSON-able dicts (the CSV's columns)."""
    out = []
    for r in fig["rows"] + fig["extra"]:
        out.append({k: r.get(k) for k in CSV_COLUMNS})
    return out
