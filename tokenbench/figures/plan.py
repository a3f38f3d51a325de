"""A figure's plan and options: what it holds, the checkpoints it finds, which runs get top-1,
and the command that measures it.

:func:`tokenbench.figures.run.build_plan` makes one from a recipe and the command line's options.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .recipe import DEFAULT_OUT, CheckpointSpec, Published, Recipe
from ..report.render import fmt_value

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


def model_specs(specs: dict[str, CheckpointSpec], models: list[str], searched: bool, source: str
                ) -> dict[str, CheckpointSpec]:
    """The checkpoint specs with ``{model}`` (the architecture: ``convnext_small``) filled in.

    The sweep keys a method entry's checkpoints by the searched value alone, so a pattern that
    names the model applies to one model at a time: with several, it is filled in only when no
    checkpoint directory is ``searched`` (nothing is looked up), else refused."""
    from .recipe import arch

    named = [label for label, sp in specs.items() if "{model}" in sp.file]
    if not named:
        return specs
    archs = list(dict.fromkeys(arch(m) for m in models))
    if len(archs) > 1 and searched:
        raise UserError(f"{source}: the checkpoints of {', '.join(named)} are named by {{model}}: measure one model "
                        f"at a time with --model ({', '.join(models)})")
    fill = archs[0] if len(archs) == 1 else "MODEL"
    return {label: dataclasses.replace(sp, file=sp.file.replace("{model}", fill)) for label, sp in specs.items()}


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
        if cls is not None and cls.knob:
            try:
                v = cls.param(cls.knob).parse(v, cls.name)
            except UserError:
                continue
        out[json.dumps(v)] = str(p)
    return out


def default_out(name: str, opts: FigureOptions) -> Path:
    suffix = "@embedded" if opts.embedded else ""
    if opts.model:
        suffix += "@" + opts.model.replace("/", "_")
    return DEFAULT_OUT / f"{name}{suffix}"


def expand_plan(plan: Plan, searcher=None) -> list:
    """The runs of the plan's sweep (matched-FLOPs values found by ``searcher``)."""
    from ..sweep import expand

    return expand(plan.sweep, searcher)


def accuracy_status(plan: Plan, run) -> tuple[bool, str]:
    """(measure accuracy?, why not) for one run."""
    from ..models import is_embedded
    from ..registry import get_method

    if "accuracy" not in plan.sweep.measure:
        if not plan.options.accuracy:
            return False, "accuracy skipped (--no-accuracy)"
        return False, "no ImageNet (--data-dir)"
    cls = get_method(run.method)
    if cls.learned and not run.checkpoint:
        spec = plan.checkpoints.get(run.label)
        want = ""
        if spec is not None:
            sp = cls.knob
            val = run.params.get(sp) if sp else None
            want = f": expected {spec.file.replace('{value}', fmt_value(val) if val is not None else 'K')}"
        return False, f"no checkpoint for the learned {cls.name}{want}"
    if is_embedded(run.model) or run.checkpoint or run.pretrained:
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
        elif len(plan.sweep.models) > 1 and any("{model}" in sp.file for sp in plan.recipe.checkpoints.values()):
            parts += ["--model", "MODEL"]  # checkpoints named by the model: one size at a time
    if o.img_size:
        parts += ["--img-size", str(o.img_size)]
    if o.out:
        parts += ["--out", str(o.out)]
    return " ".join(parts)


