"""Sweeps: what to measure, expanded into runs, executed against a results store.

A sweep is a TOML (or YAML) file, or the same given as ``tokenbench run`` flags.
Everything one sweep writes lands in its output directory: the records
(``records/``), the expanded plan (``sweep.json``), the FLOPs-search cache
(``flops_cache.json``), the tables and the plots.

Sweep file format (TOML; YAML with the same structure works too)::

    name = "default"                 # output directory runs/<name>/ unless `out` is given
    description = "one line"         # optional
    out = "runs/default"             # optional; relative paths are relative to the working directory
    reference = "results/default"    # optional: a read-only results directory (the project's reference
                                     # results) whose records are reused when their keys match
    models = ["default"]             # timm names, or `default` (the embedded Fashion-MNIST ViT); or model = "..."
    img_size = 224                   # optional input resolution (timm models)
    pretrained = false               # timm's pretrained weights
    measure = ["flops", "throughput", "accuracy"]   # default: all three (accuracy only with data)
    flops_targets = [0.5, 0.7, 0.9]  # matched-FLOPs levels, fractions of the dense model's FLOPs
    flops_tolerance = 0.03           # a run landing further than this from its target is flagged
    seeds = [0, 1, 2]                # seeds of non-deterministic methods (their `seed` parameter)
    dense = true                     # always measure the dense model (the reference of every comparison)
    device = "cpu"                   # auto, cpu, cuda (throughput and accuracy)
    precision = "fp32"               # fp32, fp16, bf16

    [data]                           # or data = "fashion-mnist"
    name = "fashion-mnist"           # fashion-mnist, imagenet, folder, synthetic
    split = "test"
    limit = 5000                     # a seeded, class-stratified subset: the same images for every run
    seed = 0                         # seed of that subset
    dir = "/path/to/data"            # optional
    batch_size = 256                 # evaluation batch size

    [throughput]
    batch_size = 64
    threads = 2                      # default: all cores
    min_run_time = 1.0               # seconds of timing per run
    latency = true                   # also batch-1 latency (p50, p90)
    rounds = 10                      # speedups: interleaved rounds of the method and its dense model
    retries = 2                      # a busy or noisy timing is taken again up to this many times
    compile = false                  # or "default" / "max-autotune": time under torch.compile

    [methods.none]                   # a table per method entry; the table name is the entry's label
    [methods.tome]
    r = [4, 8]                       # a list is a grid of values; a per-block schedule is a nested list: [[5, 5, 4]]
    prop_attn = true
    [methods.tome-plain]             # a second entry of one method: name it with `method`
    method = "tome"
    prop_attn = false
    flops_targets = [0.7]            # per-entry targets (replace the sweep's; [] for none)
    [methods.random]
    seeds = [0, 1, 2, 3]             # per-entry seeds
    [methods.dynamicvit]
    checkpoints = { "0.7" = "results/dynamicvit-0.7/model.pt" }   # per value of the searched parameter
    # checkpoint = "path.pt"         # or one checkpoint for every run of the entry

Expansion: the cross product of every entry's parameter grids, for every model.  A
method that declares a ``search_param`` (``keep_rate``, ``r``) and whose entry does not
fix it gets one run per FLOPs target, at the value the matched-FLOPs search finds (see
:class:`FlopsSearch`); an entry that lists values of it runs those values (and, with an
explicit ``flops_targets`` of its own, the targets too).  Non-deterministic methods run
once per seed (their ``seed`` parameter; throughput is timed for the first seed only:
the seed changes which tokens are kept, not how many).  A method entry with
``checkpoints`` runs each checkpointed value with its checkpoint; a FLOPs target picks a
checkpointed value when one lands within the tolerance.  Runs without a checkpoint for
a learned method measure its untrained parts (the table says so).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .errors import UserError, did_you_mean
from . import distributed

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
DENSE_METHOD = "none"  # the registry's identity method: the baseline every run is compared with
KINDS = ("flops", "throughput", "accuracy")
DEFAULT_TOLERANCE = 0.03

TOP_KEYS = ("name", "description", "out", "reference", "models", "model", "img_size", "pretrained", "measure", "flops_targets",
            "flops_tolerance", "seeds", "dense", "device", "precision", "data", "throughput", "methods")
DATA_KEYS = ("name", "split", "limit", "seed", "dir", "batch_size")
THROUGHPUT_KEYS = ("batch_size", "threads", "min_run_time", "latency", "rounds", "retries", "compile")
RUNS_DIR = Path("runs")  # where a sweep writes by default: the user's own results, apart from results/
ENTRY_KEYS = ("method", "flops_targets", "seeds", "checkpoint", "checkpoints")


# --------------------------------------------------------------------------- the spec

@dataclass
class MethodEntry:
    """One ``[methods.<label>]`` table: a method with parameter grids."""

    label: str
    method: str
    grid: dict[str, list] = field(default_factory=dict)
    flops_targets: Optional[list[float]] = None   # None: the sweep's (when the search parameter is free)
    seeds: Optional[list[int]] = None
    checkpoint: Optional[str] = None
    checkpoints: dict[str, str] = field(default_factory=dict)


@dataclass
class Sweep:
    name: str
    methods: list[MethodEntry]
    models: list[str] = field(default_factory=lambda: ["default"])
    description: str = ""
    out: Optional[str] = None
    img_size: Optional[int] = None
    pretrained: bool = False
    measure: list[str] = field(default_factory=lambda: list(KINDS))
    flops_targets: list[float] = field(default_factory=list)
    flops_tolerance: float = DEFAULT_TOLERANCE
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    dense: bool = True
    device: str = "auto"
    precision: str = "fp32"
    data: Optional[str] = None
    data_dir: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    data_seed: int = 0
    eval_batch_size: int = 256
    batch_size: int = 64
    threads: Optional[int] = None
    min_run_time: float = 2.0
    latency: bool = True
    rounds: int = 10
    retries: int = 2
    compile: Optional[str] = None    # torch.compile mode for timings (None: eager)
    reference: Optional[str] = None
    source: str = "<flags>"

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else RUNS_DIR / self.name

    def reference_dir(self) -> Optional[Path]:
        return Path(self.reference) if self.reference else None

    def settings(self):
        from .runner import Settings

        return Settings(batch_size=self.batch_size, device=self.device, precision=self.precision,
                        threads=self.threads, min_run_time=self.min_run_time, latency=self.latency,
                        rounds=self.rounds, retries=self.retries, compile=self.compile,
                        data=self.data, data_dir=self.data_dir, split=self.split, limit=self.limit,
                        data_seed=self.data_seed, eval_batch_size=self.eval_batch_size)


@dataclass
class Run:
    """One model x method x parameters: measured for each of the sweep's kinds."""

    label: str
    model: str
    method: str
    params: dict
    img_size: Optional[int] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    targets: list[float] = field(default_factory=list)
    search: Optional[dict] = None        # the matched-FLOPs search's answer for this run
    seed_param: Optional[str] = None     # the parameter varied over seeds (non-deterministic methods)
    seed_index: int = 0

    def spec(self) -> dict:
        from .runner import spec_dict

        return spec_dict(self.model, self.method, self.params, self.pretrained, self.checkpoint, self.img_size)

    def identity(self) -> str:
        from .store import canonical

        return canonical(self.spec())

    @property
    def name(self) -> str:
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in self.params.items())
        s = self.label + (f" ({shown})" if shown else "")
        if self.targets:
            s += " @" + "/".join(f"{t:g}" for t in self.targets)
        return s


def fmt_value(v: Any) -> str:
    """A parameter value, short: schedules run-length encoded (``5x3,4x9``)."""
    if isinstance(v, (list, tuple)):
        parts, i = [], 0
        while i < len(v):
            j = i
            while j < len(v) and v[j] == v[i]:
                j += 1
            parts.append(f"{v[i]}x{j - i}" if j - i > 1 else f"{v[i]}")
            i = j
        return "[" + ",".join(parts) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --------------------------------------------------------------------------- loading and validation

def packaged_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.toml")) if SWEEPS_DIR.is_dir() else []


def resolve_sweep_path(source: str | os.PathLike) -> Path:
    """A sweep file's path: an existing file, or the name of a packaged sweep (``default``)."""
    p = Path(source)
    if p.is_file():
        return p
    if p.exists():
        raise UserError(f"sweep {p} is not a file")
    for ext in (".toml", ".yaml", ".yml"):
        q = SWEEPS_DIR / f"{p.name}{ext}" if p.suffix == "" and p.parent == Path(".") else None
        if q is not None and q.is_file():
            return q
    names = packaged_sweeps()
    raise UserError(f"sweep {str(source)!r} not found: neither a file nor a packaged sweep"
                    f"{did_you_mean(p.stem, names)} (packaged: {', '.join(names) or 'none'})")


def read_sweep_file(path: str | os.PathLike) -> dict:
    """The raw mapping in a TOML or YAML sweep file, syntax errors as one-line :class:`UserError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{path}: invalid YAML{where}: {what}") from None
        if raw is None:
            raw = {}
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e).splitlines()[0]
            if "at end of document" in msg:
                msg = msg.replace("at end of document", f"at end of document, line {len(text.splitlines())}")
            raise UserError(f"{path}: invalid TOML: {msg}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file holds a mapping of keys (name, models, methods, ...), "
                        f"not a {type(raw).__name__}")
    return raw


def load_sweep(source: str | os.PathLike, overrides: Optional[dict] = None) -> Sweep:
    """Read, merge ``overrides`` (top-level keys, as in a file) and validate a sweep file."""
    path = resolve_sweep_path(source)
    raw = read_sweep_file(path)
    raw.setdefault("name", path.stem)
    merge_overrides(raw, overrides or {})
    return parse_sweep(raw, _display_path(path))


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory (or the package) when under it: records and
    plans then read the same on every checkout."""
    p = Path(path).resolve()
    for root in (Path.cwd().resolve(), SWEEPS_DIR.parent.parent):
        try:
            return str(p.relative_to(root))
        except ValueError:
            continue
    return str(path)


def merge_overrides(raw: dict, overrides: dict) -> dict:
    """Top-level overrides; ``data``/``throughput`` sub-keys merge into their tables."""
    for k, v in overrides.items():
        if v is None:
            continue
        if k in ("data", "throughput") and isinstance(v, dict):
            cur = raw.get(k)
            if isinstance(cur, str):
                cur = {"name": cur}
            cur = dict(cur or {})
            cur.update({kk: vv for kk, vv in v.items() if vv is not None})
            raw[k] = cur
        else:
            raw[k] = v
    return raw


def _check_keys(d: dict, allowed: Iterable[str], where: str, source: str) -> None:
    allowed = list(allowed)
    for k in d:
        if k not in allowed:
            hint = did_you_mean(k, allowed) or f" (allowed: {', '.join(allowed)})"
            raise UserError(f"{source}: unknown key {k!r} in {where}{hint}")


def _typed(v: Any, kind: type | tuple, what: str, source: str, allow_none: bool = False):
    if v is None and allow_none:
        return None
    ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "a table"}
        want = names.get(kind, "a number") if not isinstance(kind, tuple) else "a number"
        raise UserError(f"{source}: {what} must be {want}, got {v!r}")
    return v


def _compile_setting(v: Any, source: str) -> Optional[str]:
    """``[throughput] compile``: false (eager), true or a torch.compile mode name."""
    from .measure import COMPILE_MODES, compile_mode

    if not isinstance(v, (bool, str)):
        raise UserError(f"{source}: throughput compile must be true, false or one of {', '.join(COMPILE_MODES)}, "
                        f"got {v!r}")
    try:
        return compile_mode(v)
    except UserError as e:
        raise UserError(f"{source}: [throughput] {e}") from None


def _as_list(v: Any, what: str, source: str) -> list:
    out = v if isinstance(v, list) else [v]
    if not out:
        raise UserError(f"{source}: {what} is an empty grid (give at least one value)")
    return out


def parse_sweep(raw: dict, source: str = "<sweep>") -> Sweep:
    """A validated :class:`Sweep` from a raw mapping (a parsed file or the CLI flags)."""
    from .registry import get_method, load_methods

    _check_keys(raw, TOP_KEYS, "the sweep", source)
    name = str(_typed(raw.get("name", "sweep"), str, "name", source))
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"{source}: name {name!r} must be a plain directory name")
    sw = Sweep(name=name, methods=[], source=source)
    sw.description = str(raw.get("description", ""))
    if raw.get("out") is not None:
        sw.out = str(_typed(raw["out"], str, "out", source))
    if "model" in raw and "models" in raw:
        raise UserError(f"{source}: give `models` or `model`, not both")
    models = raw.get("models", raw.get("model", ["default"]))
    models = _as_list(models, "models", source)
    for m in models:
        _typed(m, str, "each model", source)
    sw.models = list(dict.fromkeys(models))
    import timm

    from .models import EMBEDDED_NAME

    for m in sw.models:
        if m != EMBEDDED_NAME and not timm.is_model(m):
            raise UserError(f"{source}: unknown model {m!r}{did_you_mean(m, timm.list_models())} "
                            "(a timm model name, or `default` for the embedded model)")
    sw.img_size = _typed(raw.get("img_size"), int, "img_size", source, allow_none=True)
    if sw.img_size is not None and sw.img_size <= 0:
        raise UserError(f"{source}: img_size must be positive, got {sw.img_size}")
    sw.pretrained = bool(_typed(raw.get("pretrained", False), bool, "pretrained", source))
    sw.dense = bool(_typed(raw.get("dense", True), bool, "dense", source))
    sw.device = str(_typed(raw.get("device", "auto"), str, "device", source))
    if sw.device not in ("auto", "cpu", "mps") and not sw.device.startswith("cuda"):
        raise UserError(f"{source}: unknown device {sw.device!r} (use auto, cpu or cuda)")
    sw.precision = str(_typed(raw.get("precision", "fp32"), str, "precision", source))
    if sw.precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"{source}: unknown precision {sw.precision!r} (use fp32, fp16 or bf16)")

    # data
    data = raw.get("data")
    if isinstance(data, str):
        data = {"name": data}
    if data is not None:
        _typed(data, dict, "data", source)
        _check_keys(data, DATA_KEYS, "[data]", source)
        if "name" not in data:
            raise UserError(f"{source}: [data] needs a `name` (fashion-mnist, imagenet, folder, synthetic)")
        from .data import DATASETS

        sw.data = str(_typed(data["name"], str, "data name", source))
        if sw.data not in DATASETS:
            raise UserError(f"{source}: unknown dataset {sw.data!r}{did_you_mean(sw.data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        sw.split = str(_typed(data.get("split", "test"), str, "data split", source))
        if sw.split not in ("val", "test", "train"):
            raise UserError(f"{source}: unknown data split {sw.split!r}"
                            f"{did_you_mean(sw.split, ('val', 'test', 'train'))} (use val or test)")
        sw.limit = _typed(data.get("limit"), int, "data limit", source, allow_none=True)
        if sw.limit is not None and sw.limit <= 0:
            raise UserError(f"{source}: data limit must be positive, got {sw.limit}")
        sw.data_seed = int(_typed(data.get("seed", 0), int, "data seed", source))
        if data.get("dir") is not None:
            sw.data_dir = str(_typed(data["dir"], str, "data dir", source))
        sw.eval_batch_size = int(_typed(data.get("batch_size", 256), int, "data batch_size", source))
        if sw.eval_batch_size < 1:
            raise UserError(f"{source}: data batch_size must be positive")

    # throughput
    tp = raw.get("throughput") or {}
    _typed(tp, dict, "throughput", source)
    _check_keys(tp, THROUGHPUT_KEYS, "[throughput]", source)
    sw.batch_size = int(_typed(tp.get("batch_size", 64), int, "throughput batch_size", source))
    sw.threads = _typed(tp.get("threads"), int, "throughput threads", source, allow_none=True)
    sw.min_run_time = float(_typed(tp.get("min_run_time", 2.0), (int, float), "throughput min_run_time", source))
    sw.latency = bool(_typed(tp.get("latency", True), bool, "throughput latency", source))
    sw.rounds = int(_typed(tp.get("rounds", 10), int, "throughput rounds", source))
    sw.retries = int(_typed(tp.get("retries", 2), int, "throughput retries", source))
    sw.compile = _compile_setting(tp.get("compile", False), source)
    if sw.batch_size < 1 or (sw.threads is not None and sw.threads < 1) or sw.min_run_time <= 0:
        raise UserError(f"{source}: throughput batch_size, threads and min_run_time must be positive")
    if sw.rounds < 3 or sw.retries < 0:
        raise UserError(f"{source}: throughput rounds must be at least 3 and retries at least 0")
    if raw.get("reference") is not None:
        sw.reference = str(_typed(raw["reference"], str, "reference", source))

    # measure
    measure = raw.get("measure", list(KINDS) if sw.data else ["flops", "throughput"])
    measure = _as_list(measure, "measure", source)
    for k in measure:
        if k not in KINDS:
            raise UserError(f"{source}: unknown measurement {k!r} in measure{did_you_mean(str(k), KINDS)} "
                            f"(choose from {', '.join(KINDS)})")
    if "accuracy" in measure and not sw.data:
        raise UserError(f"{source}: measuring accuracy needs data (data = \"fashion-mnist\", or --data)")
    # FLOPs are always counted: cheap, and every comparison (and the FLOPs-miss flag) needs them.
    sw.measure = [k for k in KINDS if k in measure or k == "flops"]

    sw.flops_targets = _targets(raw.get("flops_targets", []), "flops_targets", source)
    tol = _typed(raw.get("flops_tolerance", DEFAULT_TOLERANCE), (int, float), "flops_tolerance", source)
    if not 0 < tol < 1:
        raise UserError(f"{source}: flops_tolerance is a fraction of the dense FLOPs in (0, 1), got {tol}")
    sw.flops_tolerance = float(tol)
    sw.seeds = _seeds(raw.get("seeds", [0, 1, 2]), "seeds", source)

    # methods
    methods = raw.get("methods")
    if methods is None or methods == {}:
        raise UserError(f"{source}: no methods: add a [methods.<name>] table (e.g. [methods.tome]) or --method")
    _typed(methods, dict, "methods", source)
    load_methods()
    for label, body in methods.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise UserError(f"{source}: [methods.{label}] must be a table of parameters, got {body!r}")
        mname = body.get("method", label)
        _typed(mname, str, f"[methods.{label}] method", source)
        try:
            cls = get_method(mname)
        except UserError as e:
            raise UserError(f"{source}: [methods.{label}]: {e}") from None
        pnames = [p.name for p in cls.params]
        _check_keys(body, list(ENTRY_KEYS) + pnames, f"[methods.{label}] ({mname}'s parameters: "
                    f"{', '.join(pnames) or 'none'})", source)
        entry = MethodEntry(label=str(label), method=mname)
        for k, v in body.items():
            if k in ENTRY_KEYS:
                continue
            values = _as_list(v, f"[methods.{label}] {k}", source)
            p = cls.param(k)
            parsed = []
            for val in values:
                try:
                    parsed.append(p.parse(val, mname))
                except UserError as e:
                    raise UserError(f"{source}: [methods.{label}]: {e}") from None
            entry.grid[k] = list({json.dumps(x): x for x in parsed}.values())
        if "flops_targets" in body:
            entry.flops_targets = _targets(body["flops_targets"], f"[methods.{label}] flops_targets", source)
            if entry.flops_targets and not cls.search_param:
                raise UserError(f"{source}: [methods.{label}]: {mname} declares no parameter a FLOPs search can "
                                "move, so it takes no flops_targets")
        if "seeds" in body:
            entry.seeds = _seeds(body["seeds"], f"[methods.{label}] seeds", source)
            if cls.deterministic or "seed" not in pnames:
                raise UserError(f"{source}: [methods.{label}]: seeds apply to non-deterministic methods with a "
                                f"`seed` parameter; {mname} is deterministic")
        if body.get("checkpoint") is not None:
            entry.checkpoint = str(_typed(body["checkpoint"], str, f"[methods.{label}] checkpoint", source))
        if body.get("checkpoints") is not None:
            cks = _typed(body["checkpoints"], dict, f"[methods.{label}] checkpoints", source)
            if not cls.search_param:
                raise UserError(f"{source}: [methods.{label}]: checkpoints are keyed by values of the searched "
                                f"parameter, and {mname} declares none; use `checkpoint`")
            if entry.checkpoint:
                raise UserError(f"{source}: [methods.{label}]: give `checkpoint` or `checkpoints`, not both")
            p = cls.param(cls.search_param)
            for key, path in cks.items():
                _typed(path, str, f"[methods.{label}] checkpoints.{key}", source)
                try:
                    val = p.parse(_decode(key), mname)
                except UserError as e:
                    raise UserError(f"{source}: [methods.{label}] checkpoints: key {key!r}: {e}") from None
                entry.checkpoints[json.dumps(val)] = path
        sw.methods.append(entry)
    return sw


def _decode(s: str) -> Any:
    try:
        return json.loads(s)
    except (json.JSONDecodeError, TypeError):
        return s


def _targets(v: Any, what: str, source: str) -> list[float]:
    if v is None:
        return []
    vals = v if isinstance(v, list) else [v]
    out = []
    for t in vals:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise UserError(f"{source}: {what} are fractions of the dense model's FLOPs in (0, 1], got {t!r}")
        out.append(float(t))
    return sorted(set(out))


def _seeds(v: Any, what: str, source: str) -> list[int]:
    vals = _as_list(v, what, source)
    for s in vals:
        _typed(s, int, f"each of {what}", source)
    return list(dict.fromkeys(vals))


# --------------------------------------------------------------------------- CLI flags as a sweep

def sweep_from_flags(models: list[str], methods: list[str], sets: list[str], name: Optional[str] = None) -> dict:
    """The raw mapping of a sweep given as flags: ``--method tome --set r=[4,8]``.

    ``--set KEY=VALUE`` applies to every listed method that declares KEY (``METHOD.KEY=VALUE``
    to one of them); a list value is a grid, a nested list a per-block schedule; repeating
    a key adds to its grid.
    Entry keys (``flops_targets``, ``seeds``, ``checkpoint``, ``checkpoints``) work too.
    """
    from .registry import get_method, parse_set

    methods = list(dict.fromkeys(methods or []))
    entries: dict[str, dict] = {m: {} for m in methods}

    def put(entry: dict, k: str, v: Any) -> None:
        if k in entry and k not in ENTRY_KEYS:  # a repeated --set of one parameter adds to its grid
            old = entry[k] if isinstance(entry[k], list) else [entry[k]]
            v = old + (v if isinstance(v, list) else [v])
        entry[k] = v

    for item in sets or []:
        kv = parse_set([item])
        (k, v), = kv.items()
        if "." in k:
            target, k = k.split(".", 1)
            if target not in entries:
                raise UserError(f"--set {item}: {target!r} is not one of the --method values"
                                f"{did_you_mean(target, entries)}")
            put(entries[target], k, v)
            continue
        takers = [m for m in methods if k in ENTRY_KEYS or k in [p.name for p in get_method(m).params]]
        if not takers:
            known = sorted({p.name for m in methods for p in get_method(m).params})
            raise UserError(f"--set {item}: no listed method takes {k!r}{did_you_mean(k, known)}"
                            f" (their parameters: {', '.join(known) or 'none'})")
        for m in takers:
            put(entries[m], k, v)
    raw: dict[str, Any] = {"methods": entries}
    if models:
        raw["models"] = models
    raw["name"] = name or "-".join([*(models or ["default"]), *methods]).replace("/", "_")
    return raw


# --------------------------------------------------------------------------- matched-FLOPs search

@dataclass
class SearchResult:
    value: Any
    gflops: float
    dense_gflops: float
    target: float
    ratio: float
    miss: bool
    checkpointed: bool = False
    counted: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class FlopsSearch:
    """The parameter value whose FLOPs land closest to a fraction of the dense model's.

    Candidates: for a float parameter (``keep_rate``) every distinct token schedule on a
    grid of 0.01 (then 0.005, 0.001) steps over its range, each represented by its
    roundest value; for an ``int_or_list`` parameter (``r``) every constant value and,
    between ``r`` and ``r + 1``, the schedules ``r + 1`` for the first ``k`` blocks and ``r``
    after (constant ``r`` is coarse on short sequences).  Token schedules come from the
    method's declared ``expected_tokens``; an analytic cost (linear layers ~ n d^2,
    attention ~ n^2 d, MLP ~ m d h, per block) ranks them; fvcore counts the nearest
    ones, a multiplicative correction for what the analytic cost leaves out (the method's
    own scoring, norms, the stem) is refit after each count, and the final answer is the
    fvcore-counted candidate closest to the target (so the reported ratio is exact).
    Methods that declare no schedule are searched by bisection on fvcore counts.
    Every fvcore count is cached in ``cache_path`` (JSON), so reruns are quick.
    """

    def __init__(self, cache_path: Optional[Path] = None, force: bool = False, seed_path: Optional[Path] = None):
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, float] = {}
        if not force:
            # counts from a reference directory's cache first (keys carry the code identity, so
            # a count made by other code never matches), then this directory's own
            if seed_path is not None and Path(seed_path).is_file():
                self.cache = self._read_cache(Path(seed_path))
            self.cache.update(self._read_cache())
        self._bases: dict[tuple, Any] = {}
        self._cands: dict[str, Any] = {}
        self.counts = 0  # fvcore counts made (not cached)
        self.on_count: Optional[Callable[[int], None]] = None  # told the running total after each count

    # ----------------------------------------------------------- models and counting
    def base(self, model: str, img_size: Optional[int]):
        """The architecture (no method, weights irrelevant to FLOPs), built once."""
        key = (model, img_size)
        if key not in self._bases:
            import torch

            from .models import EMBEDDED_NAME, build_embedded, embedded_paths

            torch.manual_seed(0)
            if model == EMBEDDED_NAME:
                cfg = embedded_paths()["config"]
                arch = json.loads(cfg.read_text()).get("arch", {}) if cfg.is_file() else {}
                net = build_embedded(arch)
                arch_id = {"embedded": net.tokenbench_arch}
            else:
                from .models import create_model

                net, _ = create_model(model, pretrained=False, **({"img_size": img_size} if img_size else {}))
                arch_id = {"timm": model, "img_size": img_size}
            import timm

            arch_id["timm_version"] = timm.__version__
            net.eval()
            self._bases[key] = (net, arch_id)
        return self._bases[key]

    def _key(self, model, img_size, method, params) -> str:
        from . import identity
        from .registry import get_method
        from .store import canonical

        _, arch_id = self.base(model, img_size)
        return canonical({"arch": arch_id, "method": method, "params": params,
                          "code": identity.method_code(get_method(method)),
                          "protocol": identity.PROTOCOLS["flops"]})

    def count(self, model: str, img_size: Optional[int], method: str, params: dict) -> float:
        """fvcore GFLOPs of ``model`` with ``method(params)`` applied (cached)."""
        from .registry import apply, get_method

        params = get_method(method).validate(params)
        key = self._key(model, img_size, method, params)
        if key not in self.cache:
            import torch

            from . import measure

            net, _ = self.base(model, img_size)
            net = copy.deepcopy(net)
            apply(net, method, **params)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tracing is Python-bound; more threads only contend
            try:
                self.cache[key] = float(measure.flops(net, img_size=img_size)["gflops"])
            finally:
                torch.set_num_threads(threads)
            self.counts += 1
            self.save()
            if self.on_count:
                self.on_count(self.counts)
        return self.cache[key]

    def dense(self, model: str, img_size: Optional[int]) -> float:
        return self.count(model, img_size, DENSE_METHOD, {})

    def save(self) -> None:
        if self.cache_path is None:
            return
        from .store import atomic_write_text

        # Another sweep may be writing the same cache: keep its counts too (each write is
        # atomic, so the file is always whole; at worst a concurrent count is made twice).
        merged = dict(self._read_cache())
        merged.update(self.cache)
        try:
            atomic_write_text(self.cache_path, json.dumps({"about": "fvcore GFLOPs per architecture, method and "
                                                           "parameters (tokenbench matched-FLOPs search cache)",
                                                           "gflops": merged}, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a cache, not a result

    def _read_cache(self, path: Optional[Path] = None) -> dict[str, float]:
        path = path or self.cache_path
        if not (path and path.is_file()):
            return {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("gflops"), dict):
                return {k: float(v) for k, v in data["gflops"].items()}
        except (OSError, ValueError, TypeError):
            import warnings

            warnings.warn(f"FLOPs cache {path} is damaged; counting again")
        return {}

    # ----------------------------------------------------------- candidates
    def candidates(self, model: str, img_size: Optional[int], cls, fixed: dict, param: str
                   ) -> Optional[list[tuple[Any, tuple]]]:
        """(value, token schedule) for every distinct schedule, or None without a declared schedule."""
        from .store import canonical

        memo_key = canonical([model, img_size, cls.name, fixed, param])
        if memo_key not in self._cands:
            self._cands[memo_key] = self._candidates(model, img_size, cls, fixed, param)
        return self._cands[memo_key]

    def _candidates(self, model, img_size, cls, fixed, param):
        net, _ = self.base(model, img_size)
        inst = cls()
        p = cls.param(param)

        def schedule(v):
            try:
                out = inst.expected_tokens(net, **cls.validate({**fixed, param: v}))
            except UserError:
                return "invalid"
            if out is None:
                return None
            return tuple(tuple(float(t) for t in seq) for seq in out)

        seen: dict[tuple, Any] = {}
        if p.type == "float":
            lo = 0.0 if p.min is None else float(p.min)
            hi = 1.0 if p.max is None else float(p.max)
            for step in (0.01, 0.005, 0.001):
                n = int(round((hi - lo) / step))
                for i in range(n + 1):
                    v = round(lo + i * step, 6)
                    if v < lo or v > hi or (p.min_exclusive and v == lo):
                        continue
                    s = schedule(v)
                    if s is None:
                        return None
                    if s != "invalid" and s not in seen:
                        seen[s] = v
        elif p.type in ("int", "int_or_list"):
            lo = 0 if p.min is None else int(math.ceil(p.min))
            hi = int(p.max) if p.max is not None else 4096
            depth = len(getattr(net, "blocks", []))
            prev, same = None, 0
            for r in range(lo, hi + 1):
                s = schedule(r)
                if s is None:
                    return None
                if s == "invalid":
                    continue
                if s not in seen:
                    seen[s] = r
                if p.type == "int_or_list" and depth > 1 and r + 1 <= hi:
                    for k in range(1, depth):
                        v = [r + 1] * k + [r] * (depth - k)
                        sv = schedule(v)
                        if sv not in ("invalid", None) and sv not in seen:
                            seen[sv] = v
                same = same + 1 if s == prev else 0
                prev = s
                if same >= 2:  # saturated: larger values change nothing
                    break
        else:
            return None
        return [(v, s) for s, v in seen.items()]

    @staticmethod
    def _analytic(net, sched: tuple) -> Optional[float]:
        """Per-image multiply-adds of the blocks for a token schedule (tokens, tokens entering MLP)."""
        try:
            d = int(net.embed_dim)
            h = int(net.blocks[0].mlp.fc1.out_features)
        except (AttributeError, IndexError):
            return None
        tokens, tokens_mlp = sched
        return float(sum(4 * n * d * d + 2 * n * n * d + 2 * m * d * h for n, m in zip(tokens, tokens_mlp)))

    # ----------------------------------------------------------- the search
    def search(self, model: str, img_size: Optional[int], cls, fixed: dict, param: str, target: float,
               tolerance: float = DEFAULT_TOLERANCE, preferred: Iterable[Any] = ()) -> SearchResult:
        """The value of ``param`` (others ``fixed``) closest to ``target`` x dense FLOPs.

        ``preferred`` values (those with a checkpoint) win whenever one lands within ``tolerance``.
        """
        dense = self.dense(model, img_size)
        goal = target * dense
        before = self.counts

        def cnt(v) -> float:
            return self.count(model, img_size, cls.name, {**fixed, param: v})

        counted: dict[str, tuple[Any, float]] = {}
        cands = self.candidates(model, img_size, cls, fixed, param)
        net, _ = self.base(model, img_size)
        est = None
        if cands:
            dense_sched = self.candidates_dense(net)
            a_dense = self._analytic(net, dense_sched) if dense_sched else None
            if a_dense is not None:
                fixed_part = dense - a_dense / 1e9
                est = [fixed_part + self._analytic(net, s) / 1e9 for _, s in cands]
        if cands and est is not None:
            scale = 1.0
            order_tried: set[int] = set()
            for _ in range(6):
                i = min(range(len(cands)), key=lambda j: (abs(scale * est[j] - goal), j))
                if i in order_tried:
                    break
                order_tried.add(i)
                g = cnt(cands[i][0])
                counted[json.dumps(cands[i][0])] = (cands[i][0], g)
                scale = g / est[i] if est[i] > 0 else 1.0
            # the bracketing neighbours of the goal under the refit cost
            below = [j for j in range(len(cands)) if scale * est[j] <= goal]
            above = [j for j in range(len(cands)) if scale * est[j] >= goal]
            for group, pick in ((below, max), (above, min)):
                if group:
                    j = pick(group, key=lambda j: (est[j], -j))
                    counted.setdefault(json.dumps(cands[j][0]), (cands[j][0], cnt(cands[j][0])))
        else:
            self._bisect(cls, param, goal, cnt, counted, close=0.1 * tolerance * dense)
        pref = {json.dumps(cls.param(param).parse(v, cls.name)): v for v in preferred}
        for k, v in pref.items():
            counted.setdefault(k, (v, cnt(v)))
        # the closest count; but a checkpointed value wins whenever one lands within the tolerance
        pool = [k for k, (_, g) in counted.items() if k in pref and abs(g / dense - target) <= tolerance]
        pool = pool or list(counted)
        best_key = min(pool, key=lambda k: (abs(counted[k][1] - goal), k))
        value, g = counted[best_key]
        ratio = g / dense
        return SearchResult(value=value, gflops=g, dense_gflops=dense, target=target, ratio=ratio,
                            miss=abs(ratio - target) > tolerance + 1e-12, checkpointed=best_key in pref,
                            counted=self.counts - before)

    @staticmethod
    def candidates_dense(net) -> Optional[tuple]:
        try:
            from . import vit

            n = float(vit.num_patches(net) + net.num_prefix_tokens)
            d = len(net.blocks)
        except AttributeError:
            return None
        return (tuple([n] * d), tuple([n] * d))

    def _bisect(self, cls, param: str, goal: float, cnt: Callable, counted: dict, close: float = 0.0) -> None:
        """Bisection on fvcore counts (FLOPs assumed monotone in the parameter); stops within ``close``."""
        p = cls.param(param)
        if p.type == "float":
            lo = (0.0 if p.min is None else float(p.min))
            hi = 1.0 if p.max is None else float(p.max)
            if p.min_exclusive:
                lo = lo + min(1e-3, (hi - lo) / 1000)
            a, b = lo, hi
            ga, gb = cnt(round(a, 4)), cnt(round(b, 4))
            counted[json.dumps(round(a, 4))] = (round(a, 4), ga)
            counted[json.dumps(round(b, 4))] = (round(b, 4), gb)
            increasing = gb >= ga
            for _ in range(12):
                m = round((a + b) / 2, 4)
                if m in (round(a, 4), round(b, 4)):
                    break
                gm = cnt(m)
                counted[json.dumps(m)] = (m, gm)
                if abs(gm - goal) <= close:
                    break
                if (gm < goal) == increasing:
                    a = m
                else:
                    b = m
        elif p.type in ("int", "int_or_list"):
            lo = 0 if p.min is None else int(math.ceil(p.min))
            hi = lo + 1
            g_lo = cnt(lo)
            counted[json.dumps(lo)] = (lo, g_lo)
            g_prev = g_lo
            while hi < (int(p.max) if p.max is not None else 4096):  # find where FLOPs stop changing
                g_hi = cnt(hi)
                counted[json.dumps(hi)] = (hi, g_hi)
                if g_hi == g_prev or (g_hi - goal) * (g_lo - goal) <= 0:
                    break
                g_prev, hi = g_hi, hi * 2
            a, b = lo, hi
            increasing = counted[json.dumps(b)][1] >= g_lo
            while b - a > 1:
                m = (a + b) // 2
                gm = cnt(m)
                counted[json.dumps(m)] = (m, gm)
                if (gm < goal) == increasing:
                    a = m
                else:
                    b = m
        else:
            raise UserError(f"{cls.name}: cannot search parameter {param!r} of type {p.type}")


# --------------------------------------------------------------------------- expansion

def _entry_targets(sw: Sweep, e: MethodEntry, cls) -> list[float]:
    """The FLOPs targets an entry's knob is searched for."""
    if e.flops_targets is not None:
        return e.flops_targets
    sp = cls.search_param
    return sw.flops_targets if (sp and sp not in e.grid) else []


def count_searches(sw: Sweep) -> int:
    """How many matched-FLOPs searches :func:`expand` makes (each answered from the cache when it can)."""
    from .registry import get_method

    n = 0
    for e in sw.methods:
        cls = get_method(e.method)
        combos = math.prod(len(v) for k, v in e.grid.items() if k != cls.search_param)
        n += combos * len(_entry_targets(sw, e, cls))
    return n * len(sw.models)


def expand(sw: Sweep, searcher: Optional[FlopsSearch] = None,
           on_search: Optional[Callable[[int, int, str, int], None]] = None) -> list[Run]:
    """Every run of the sweep (dense first), matched-FLOPs values found by ``searcher``.

    ``on_search(done, total, what, counts)`` is called before each search (``what``: method, knob,
    target and model), after each fvcore count it makes (``counts``: made so far) and once at the
    end (``done == total``)."""
    from .registry import get_method

    searcher = searcher or FlopsSearch()
    n_searches = count_searches(sw) if on_search else 0
    now = {"done": 0, "what": ""}

    def tell(counts: Optional[int] = None) -> None:
        if on_search:
            on_search(now["done"], n_searches, now["what"], searcher.counts if counts is None else counts)

    outer_on_count = searcher.on_count
    if on_search:
        searcher.on_count = tell
    runs: list[Run] = []
    seen: dict[str, Run] = {}

    def add(run: Run) -> None:
        ident = run.identity()
        if ident in seen:
            old = seen[ident]
            old.targets = sorted(set(old.targets) | set(run.targets))
            if run.search and not old.search:
                old.search = run.search
            return
        seen[ident] = run
        runs.append(run)

    for model in sw.models:
        if sw.dense:
            add(Run(label="dense", model=model, method=DENSE_METHOD, params={}, img_size=sw.img_size,
                    pretrained=sw.pretrained))
        for e in sw.methods:
            cls = get_method(e.method)
            sp = cls.search_param
            pnames = [p.name for p in cls.params]
            seed_p = "seed" if (not cls.deterministic and "seed" in pnames and "seed" not in e.grid) else None
            seeds = (e.seeds or sw.seeds) if seed_p else [None]
            targets = _entry_targets(sw, e, cls)
            others = {k: v for k, v in e.grid.items() if k != sp}
            keys = list(others)
            for combo in itertools.product(*(others[k] for k in keys)):
                fixed = dict(zip(keys, combo))
                # (value or None for the default, targets, search info)
                values: list[tuple[Any, list, Optional[dict]]] = []
                if sp and sp in e.grid:
                    values += [(v, [], None) for v in e.grid[sp]]
                ck_vals = [json.loads(k) for k in e.checkpoints]
                for t in targets:
                    now["what"] = f"{e.label}: {sp} for {t:g} x dense" + (
                        f" on {model}" if len(sw.models) > 1 else "")
                    tell()
                    fixed_s = {**fixed, **({seed_p: seeds[0]} if seed_p else {})}
                    res = searcher.search(model, sw.img_size, cls, fixed_s, sp, t, sw.flops_tolerance,
                                          preferred=ck_vals)
                    values.append((res.value, [t], res.as_dict()))
                    now["done"] += 1
                if not values:
                    values.append((None, [], None))
                chosen = {json.dumps(v) for v, _, _ in values}
                values += [(v, [], None) for v in ck_vals if json.dumps(v) not in chosen]
                for v, tg, info in values:
                    for i, seed in enumerate(seeds):
                        params = dict(fixed)
                        if v is not None:
                            params[sp] = v
                        if seed_p:
                            params[seed_p] = seed
                        params = cls.validate(params)
                        ck = e.checkpoint
                        if sp and e.checkpoints:
                            ck = e.checkpoints.get(json.dumps(params[sp]), None)
                        if ck is not None and not Path(ck).is_file():
                            raise UserError(f"{sw.source}: [methods.{e.label}]: checkpoint {ck} does not exist")
                        add(Run(label=e.label, model=model, method=e.method, params=params, img_size=sw.img_size,
                                pretrained=sw.pretrained, checkpoint=ck, targets=list(tg),
                                search=dict(info) if info else None, seed_param=seed_p, seed_index=i))
    now["what"] = ""
    tell()
    searcher.on_count = outer_on_count
    return runs


# --------------------------------------------------------------------------- the plan and execution

PLAN_FILE = "sweep.json"
CACHE_FILE = "flops_cache.json"


def baseline_spec(run: Run) -> dict:
    """The dense model a run's speedup is timed against: same model, input size and pretrained
    weights, no method, no checkpoint."""
    from .runner import spec_dict

    return spec_dict(run.model, DENSE_METHOD, {}, run.pretrained, None, run.img_size)


def run_keys(run: Run, sw: Sweep) -> dict[str, str]:
    """The store keys this run's records have (or will have), per kind."""
    from .registry import get_method
    from .runner import record_key_of

    spec = run.spec()
    spec["params"] = get_method(run.method).validate(spec["params"])
    s = sw.settings()
    out = {}
    for k in kinds_for(run, sw):
        out[k] = record_key_of(k, spec, s, baseline_spec(run) if k == "speedup" else None)[0]
    return out


def kinds_for(run: Run, sw: Sweep) -> list[str]:
    """What a run measures: the sweep's kinds, and with throughput, the speedup over the dense
    model timed interleaved with it (a seeded method's throughput for its first seed only)."""
    out = []
    for k in sw.measure:
        if k == "throughput":
            if run.seed_index > 0:
                continue
            out.append(k)
            if run.method != DENSE_METHOD and sw.dense:
                out.append("speedup")
        else:
            out.append(k)
    return out


def plan_dict(sw: Sweep, runs: list[Run], keys: Optional[list[dict]] = None) -> dict:
    d = asdict(sw)
    d.pop("methods")
    return {"sweep": d, "methods": [asdict(e) for e in sw.methods], "settings": asdict(sw.settings()),
            "runs": [{**asdict(r), "name": r.name, "spec": r.spec(), "keys": (keys[i] if keys else {})}
                     for i, r in enumerate(runs)]}


def write_plan(out: Path, sw: Sweep, runs: list[Run], keys: list[dict]) -> Path:
    from .store import atomic_write_text

    p = Path(out) / PLAN_FILE
    try:
        atomic_write_text(p, json.dumps(plan_dict(sw, runs, keys), indent=1, default=str) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {p}: {e.strerror or e}") from None
    return p


def read_plan(out: Path) -> Optional[dict]:
    p = Path(out) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        import warnings

        warnings.warn(f"{p} is damaged; reporting every record in {out}")
        return None
    return d if isinstance(d, dict) and isinstance(d.get("runs"), list) else None


@dataclass
class Step:
    run: Run
    kind: str
    key: str
    reused: bool


def execute(sw: Sweep, runs: list[Run], store, force: bool = False,
            on_step: Optional[Callable[[int, int, Run, str], None]] = None,
            on_note: Optional[Callable[[str], None]] = None,
            retime: Optional[set[str]] = None) -> list[Step]:
    """Measure every run and kind not already in ``store`` (all of them with ``force``).

    Records found in the sweep's ``reference`` directory are copied, not measured.
    ``retime``: keys of timing records to measure again although recorded (``--retime-flagged``).
    Each measurement is claimed first (:meth:`Store.claim`): one that another runner of the
    same directory is measuring is left to it, and waited for at the end."""
    from .runner import Loaded, measure_run
    from .store import Store

    settings = sw.settings()
    ref = sw.reference_dir()
    reference = Store(ref, read_only=True) if ref is not None and ref.is_dir() else None
    total = sum(len(kinds_for(r, sw)) for r in runs)
    steps: list[Step] = []
    dense_loaded: dict[str, Loaded] = {}
    claimed: list[tuple[Run, str, Any]] = []  # (run, kind, claim) another runner holds
    i = 0
    for run in runs:
        loaded = Loaded(run.spec())
        keys = run_keys(run, sw)
        for kind in kinds_for(run, sw):
            if on_step:
                on_step(i, total, run, kind)
            again = force or (retime is not None and keys.get(kind) in retime)
            extra: dict[str, Any] = {}
            if kind == "speedup":
                base = baseline_spec(run)
                ident = canonical_spec(base)
                dense_loaded.setdefault(ident, Loaded(base))
                extra = {"baseline": base, "baseline_loaded": dense_loaded[ident]}
            with distributed.claim(store, keys[kind]) as claim:
                if not claim.held:
                    claimed.append((run, kind, claim))
                    continue
                if kind == "flops":
                    import torch

                    threads = torch.get_num_threads()
                    torch.set_num_threads(1)  # tracing is Python-bound; more threads only contend
                    try:
                        rec, reused = measure_run(kind, run.spec(), settings, store, force=again, loaded=loaded,
                                                  reference=reference)
                    finally:
                        torch.set_num_threads(threads)
                else:
                    rec, reused = measure_run(kind, run.spec(), settings, store, force=again, loaded=loaded,
                                              reference=reference, **extra)
            steps.append(Step(run, kind, rec["key"], reused))
            i += 1
        del loaded
    steps += _await_claimed(sw, claimed, store, force, on_step, on_note, done=i, total=total)
    if on_step:
        on_step(total, total, None, "")
    return steps


def canonical_spec(spec: dict) -> str:
    from .store import canonical

    return canonical(spec)


def flagged_timing_keys(store, keys: list[dict]) -> set[str]:
    """Keys of the plan's timing records that are flagged busy or noisy (``--retime-flagged``)."""
    out = set()
    for kd in keys:
        for kind in ("throughput", "speedup"):
            k = kd.get(kind)
            rec = store.get(k) if k else None
            if rec is not None and (rec["metrics"].get("spread_flag") or rec.get("env", {}).get("busy")):
                out.add(k)
    return out


def _await_claimed(sw: Sweep, claimed: list, store, force: bool, on_step, on_note, done: int,
                   total: int) -> list[Step]:
    """The measurements other runners held: wait for their records; measure those given up."""
    import sys
    import time

    missing = [c for _, _, c in claimed if not store.has(c.key)]
    if missing:
        h = missing[0].holder or {}
        (on_note or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"waiting for {len(missing)} measurement(s) another runner is making (pid {h.get('pid', '?')} on "
            f"{h.get('host', '?')} since {h.get('since', '?')}; claims in {missing[0].path.parent})")
    steps: list[Step] = []
    for run, kind, claim in claimed:
        if on_step:
            on_step(done + len(steps), total, run, f"{kind}: waiting for another runner")
        while (rec := store.get(claim.key)) is None and not claim.is_free():
            time.sleep(1.0)
        if rec is not None:
            steps.append(Step(run, kind, rec["key"], True))
        else:  # the other runner gave up without a record: measure it here
            steps += execute(replace(sw, measure=[kind]), [run], store, force=force, on_note=on_note)
    return steps


def prepare(sw: Sweep, out: Optional[Path] = None, force: bool = False,
            on_search: Optional[Callable[[int, int, str, int], None]] = None) -> tuple[Path, list[Run],
                                                                                      list[dict], FlopsSearch]:
    """Expand ``sw`` (searching matched-FLOPs values, cached in the output dir) and write its plan.

    ``on_search(done, total, what, counts)`` follows the matched-FLOPs searches (see :func:`expand`)."""
    out = Path(out) if out else sw.out_dir()
    from .store import Store, ensure_writable_dir

    Store(out).ensure_writable()
    ensure_writable_dir(out, "output directory")  # the plan, the FLOPs cache, the tables
    ref = sw.reference_dir()
    searcher = FlopsSearch(out / CACHE_FILE, force=force,
                           seed_path=(ref / CACHE_FILE) if ref is not None else None)
    preflight(sw, searcher)
    runs = expand(sw, searcher, on_search=on_search)
    keys = [run_keys(r, sw) for r in runs]
    write_plan(out, sw, runs, keys)
    return out, runs, keys, searcher


def preflight(sw: Sweep, searcher: FlopsSearch) -> None:
    """Refuse, before anything is written or measured, what would fail part-way through the sweep.

    Every model is built (random weights; the embedded model's checkpoint is verified), every
    method entry is applied to it and every value of its grid checked against the model
    (declared schedule), every checkpoint is loaded into the method-applied model, the
    device is resolved, the data is found and read, and the throughput and evaluation
    batches are checked against the free memory.
    """
    import copy as _copy

    from . import measure
    from .checkpoint import load_state_dict_checked, read_state_dict
    from .models import EMBEDDED_NAME, embedded_paths, verify_checksum
    from .registry import apply, get_method

    timed = [k for k in sw.measure if k != "flops"]
    dev = measure.resolve_device(sw.device) if timed else None
    for model in sw.models:
        net, _ = searcher.base(model, sw.img_size)
        if model == EMBEDDED_NAME:  # its trained weights load under every run (checkpoints load on top)
            p = embedded_paths()
            verify_checksum(p["ckpt"], p["sha"])
        if sw.dense:
            apply(_copy.deepcopy(net), DENSE_METHOD)
        for e in sw.methods:
            cls = get_method(e.method)
            inst = cls()
            keys = list(e.grid)
            first = None
            for combo in itertools.product(*(e.grid[k] for k in keys)):
                params = cls.validate(dict(zip(keys, combo)))
                first = first or params
                try:
                    inst.expected_tokens(net, **params)
                except UserError as err:
                    raise UserError(f"{sw.source}: [methods.{e.label}] on {model}: {err}") from None
            trial = _copy.deepcopy(net)
            try:
                apply(trial, e.method, **(first or {}))
            except UserError as err:
                raise UserError(f"{sw.source}: [methods.{e.label}] on {model}: {err}") from None
            for ck in dict.fromkeys([e.checkpoint, *e.checkpoints.values()]):
                if ck is None:
                    continue
                if not Path(ck).is_file():
                    raise UserError(f"{sw.source}: [methods.{e.label}]: checkpoint {ck} does not exist")
                try:
                    load_state_dict_checked(trial, read_state_dict(ck), source=f"checkpoint {ck}")
                except UserError as err:
                    raise UserError(f"{sw.source}: [methods.{e.label}]: {err}") from None
            del trial
        if "throughput" in sw.measure:
            try:
                measure.check_batch_fits(net, sw.batch_size, dev, sw.precision, sw.img_size)
            except UserError as err:
                raise UserError(f"{sw.source}: throughput {err} ([throughput] batch_size)") from None
        if "accuracy" in sw.measure:
            from .data import build_dataset

            ds, _ = build_dataset(sw.data, sw.split, sw.data_dir, model=net, limit=sw.limit, seed=sw.data_seed)
            try:
                measure.check_batch_fits(net, min(sw.eval_batch_size, max(1, len(ds))), dev, sw.precision)
            except UserError as err:
                msg = str(err).replace("--batch-size", "--eval-batch-size")
                raise UserError(f"{sw.source}: evaluation {msg} ([data] batch_size)") from None
