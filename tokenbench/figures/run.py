"""A paper figure from its recipe: the plan (:func:`build_plan`), the sweep run, and the
figure written (:func:`run_figure`, :func:`write_figure`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UserError
from .plan import (FigureOptions, Plan, accuracy_status, default_out, find_checkpoints, measure_command,
                          model_specs)
from .plot import plot_figure
from .recipe import (REFERENCE_OUT, EMBEDDED_CKPT_DIR, EMBEDDED_LIMIT, PUBLISHED_FILE, arch, load_published,
                            load_recipe, split_name)
from .tables import collect_figure, csv_text, gflops_agreement, markdown


# --------------------------------------------------------------------------- planning

def build_plan(name: str, opts: Optional[FigureOptions] = None) -> Plan:
    """The recipe's sweep with the options applied (validated), and what the figure compares with.

    The recipe and the published figures are read through this module's ``load_recipe`` and
    ``PUBLISHED_FILE``."""
    from ..sweep import parse_sweep

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
    raw = _sweep_base(recipe, variant, out, opts)
    dropped = _set_models(raw, recipe, opts)
    specs, ck_dir, found = _set_checkpoints(raw, recipe, opts, dropped)
    _set_measurements(raw, recipe, opts)
    sw = parse_sweep(raw, f"figure {variant}")
    published = []
    if not embedded:
        archs = {arch(m) for m in sw.models}
        published = [p for p in load_published(PUBLISHED_FILE) if p.paper in recipe.papers and arch(p.model) in archs]
    return Plan(recipe=recipe, name=variant, embedded=embedded, sweep=sw, out=out, checkpoint_dir=ck_dir,
                checkpoints=specs, found=found, dropped=dropped, published=published, options=opts)


def _sweep_base(recipe, variant: str, out: Path, opts: FigureOptions) -> dict:
    """The recipe's sweep, named and placed; the committed figure's records as its reference."""
    raw = copy.deepcopy(recipe.sweep)
    raw["name"] = variant
    raw["out"] = str(out)
    committed = REFERENCE_OUT / out.name
    if not opts.out and "reference" not in raw and committed.is_dir():
        raw["reference"] = str(committed)  # the committed figure's records are copied, not measured again
    raw.setdefault("description", recipe.description)
    for label in list(raw["methods"]):
        raw["methods"][label] = dict(raw["methods"][label] or {})
    return raw


def _set_models(raw: dict, recipe, opts: FigureOptions) -> list[str]:
    """The model (the embedded one, or --model), its input size and weights; the entries the
    embedded variant drops, returned."""
    methods = raw["methods"]
    dropped: list[str] = []
    if opts.embedded:
        from ..models import EMBEDDED_NAME

        raw.pop("model", None)
        raw["models"] = [recipe.embedded.get("model", EMBEDDED_NAME)]
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
    raw["pretrained"] = bool(opts.pretrained) and not opts.embedded
    return dropped


def _set_checkpoints(raw: dict, recipe, opts: FigureOptions, dropped: list[str]) -> tuple:
    """The checkpoints found in the directory, set on their entries (an entry whose required
    files are missing is dropped): (the specs, the directory, what was found per entry)."""
    from ..registry import get_method

    methods = raw["methods"]
    specs = recipe.embedded_checkpoints() if opts.embedded else recipe.checkpoints
    ck_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else (EMBEDDED_CKPT_DIR if opts.embedded else None)
    if opts.checkpoint_dir and not Path(opts.checkpoint_dir).is_dir():
        raise UserError(f"checkpoint directory {opts.checkpoint_dir} does not exist")
    specs = model_specs(specs, raw.get("models") or [raw.get("model")], ck_dir is not None, recipe.source)
    found: dict[str, dict[str, str]] = {}
    for label, spec in specs.items():
        if label not in methods:
            continue
        body = methods[label]
        cls = get_method(body.get("method", label))
        if spec.templated and not cls.knob:
            raise UserError(f"{recipe.source}: checkpoint file {spec.file!r} uses {{value}} but {cls.name} has no "
                            "searched parameter")
        got = find_checkpoints(ck_dir, spec, cls)
        if spec.templated and cls.knob in body:  # a grid: only its values
            grid = body[cls.knob]
            grid = grid if isinstance(grid, list) else [grid]
            keys = {json.dumps(cls.param(cls.knob).parse(v, cls.name)) for v in grid}
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
    return specs, ck_dir, found


def _set_measurements(raw: dict, recipe, opts: FigureOptions) -> None:
    """What to measure: FLOPs, throughput unless left out, accuracy where there is data (and
    the throughput settings and device asked for)."""
    measure = ["flops"] + (["throughput"] if opts.throughput else [])
    data = None
    if opts.accuracy:
        if opts.embedded:
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


# --------------------------------------------------------------------------- running

def run_figure(name: str, opts: Optional[FigureOptions] = None,
               on_step: Optional[Callable[[int, int, Any, str], None]] = None, plots: bool = True) -> dict:
    """Measure what the figure needs (reusing records), then write its table and plot."""
    from .. import sweep as sw_mod
    from ..store import Store

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



# --------------------------------------------------------------------------- writing

def write_figure(plan: Plan, runs: list, keys: list[dict], status: list[tuple[bool, str]], searcher=None,
                 plots: bool = True) -> dict:
    from ..store import write_texts

    fig = collect_figure(plan, runs, keys, status, searcher)
    base = plan.out / plan.recipe.name
    files = write_texts({base.with_suffix(".md"): markdown(fig), base.with_suffix(".csv"): csv_text(fig)})
    if plots:
        files += plot_figure(fig, base)
    fig["files"] = files
    fig["gflops_agreement"] = gflops_agreement(fig)
    fig["measure_command"] = measure_command(plan)
    return fig
