"""The sweep file format: reading a TOML (or YAML) sweep, validating it, its data classes.

A sweep is a TOML (or YAML) file, or the same given as ``tokenbench run`` flags
(:mod:`.flags`).  Everything one sweep writes lands in its output directory: the
records (``records/``), the expanded plan (``sweep.json``), the FLOPs-search cache
(``flops_cache.json``), the tables and the plots.

Sweep file format (TOML; YAML with the same structure works too)::

    name = "default"                 # output directory runs/<name>/ unless `out` is given
    description = "one line"         # optional
    out = "runs/default"             # optional; relative paths are relative to the working directory
    reference = "results/default"    # optional: a read-only results directory (the project's reference
                                     # results) whose records are reused when their keys match
    models = ["default"]             # timm names, or `default` (the embedded Fashion-MNIST ViT); or model = "..."
    task = "segmentation"            # optional: classification or segmentation (default: the data decides;
                                     # dense data such as fashion-mnist-scenes with dense models such as
                                     # default-seg, :mod:`.dense`)
    img_size = 224                   # optional input resolution (timm models)
    dense_family = ["default-small"] # optional: other dense models drawn as a line on each model's
                                     # accuracy plot ("use a smaller model"), e.g. DeiT-T/S/B
    pretrained = false               # timm's pretrained weights
    measure = ["flops", "throughput", "accuracy"]   # default: all three (accuracy only with data)
    flops_targets = [0.5, 0.7, 0.9]  # matched-FLOPs levels, fractions of the dense model's FLOPs
    flops_tolerance = 0.01           # a run landing further than this from its target is flagged (1 point)
    seeds = [0, 1, 2]                # seeds of non-deterministic methods (their declared seed parameter)
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
    cuda_graphs = false              # CUDA: time the eager forward replayed as CUDA graphs
    time_by_default = ["dense", "tome@0.7"]   # optional: only these settings are timed unless their
                                     # timings are recorded already (LABEL: every run of an entry,
                                     # LABEL@0.7: its run at that FLOPs target); the others with
                                     # `tokenbench run --all-timings`

    [methods.none]                   # a table per method entry; the table name is the entry's label
    [methods.tome]
    r = [4, 8]                       # a list is a grid of values; a per-block schedule is a nested list: [[5, 5, 4]]
    prop_attn = true
    [methods.tome-plain]             # a second entry of one method: name it with `method`
    method = "tome"
    prop_attn = false
    flops_targets = [0.7]            # per-entry targets (replace the sweep's; [] for none)
    models = ["default"]             # only on these of the sweep's models (default: all of them)
    [methods.random]
    seeds = [0, 1, 2, 3]             # per-entry seeds
    [methods.dynamicvit]
    checkpoints = { "0.7" = "results/dynamicvit-0.7/model.pt" }   # per value of the method's budget knob
    # checkpoint = "path.pt"         # or one checkpoint for every run of the entry

How the entries become runs: :mod:`.expand`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..errors import UserError, did_you_mean

if TYPE_CHECKING:
    from ..registry import Method

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "sweeps"  # the packaged sweep files
DENSE_METHOD = "none"  # the registry's identity method: the baseline every run is compared with
KINDS = ("flops", "throughput", "accuracy")
DEFAULT_TOLERANCE = 0.01  # one point of the dense model's FLOPs

TOP_KEYS = ("name", "description", "out", "reference", "task", "models", "model", "dense_family", "img_size", "pretrained", "measure", "flops_targets",
            "flops_tolerance", "seeds", "dense", "device", "precision", "data", "throughput", "methods")
DATA_KEYS = ("name", "split", "limit", "seed", "dir", "batch_size")
THROUGHPUT_KEYS = ("batch_size", "threads", "min_run_time", "latency", "rounds", "retries", "compile",
                   "cuda_graphs", "time_by_default")
RUNS_DIR = Path("runs")  # where a sweep writes by default: the user's own results, apart from results/
ENTRY_KEYS = ("method", "models", "flops_targets", "seeds", "checkpoint", "checkpoints")


# --------------------------------------------------------------------------- the spec

@dataclass
class MethodEntry:
    """One ``[methods.<label>]`` table: a method with parameter grids."""

    label: str
    method: str
    grid: dict[str, list] = field(default_factory=dict)
    flops_targets: Optional[list[float]] = None   # None: the sweep's (when the budget knob is free)
    seeds: Optional[list[int]] = None
    checkpoint: Optional[str] = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    models: Optional[list[str]] = None            # None: every model of the sweep


@dataclass
class Sweep:
    name: str
    methods: list[MethodEntry]
    models: list[str] = field(default_factory=lambda: ["default"])
    # dense models of other sizes, measured dense and drawn as one line beside each model's methods
    dense_family: list[str] = field(default_factory=list)
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
    cuda_graphs: bool = False        # timings replay the eager forward as CUDA graphs (CUDA only)
    reference: Optional[str] = None
    # selectors of the settings timed by default (None: all); `--all-timings` empties the restriction
    time_by_default: Optional[list[str]] = None
    reference_timings: bool = True   # reuse the reference's throughput and speedup records
    source: str = "<flags>"
    task: str = "classification"     # segmentation: every run measured by runner_dense (mIoU, :mod:`.dense`)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else RUNS_DIR / self.name

    def reference_dir(self) -> Optional[Path]:
        return Path(self.reference) if self.reference else None

    def settings(self):
        """The measurement settings of this sweep's runs: its fields that ``Settings`` has too."""
        from ..runner import Settings

        own = {f.name for f in fields(self)}
        return Settings(**{f.name: getattr(self, f.name) for f in fields(Settings) if f.name in own})


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
    for root in (Path.cwd().resolve(), SWEEPS_DIR.parents[2]):
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
    from ..measure.compilation import COMPILE_MODES, compile_mode

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
    _check_keys(raw, TOP_KEYS, "the sweep", source)
    name = str(_typed(raw.get("name", "sweep"), str, "name", source))
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"{source}: name {name!r} must be a plain directory name")
    sw = Sweep(name=name, methods=[], source=source)
    sw.description = str(raw.get("description", ""))
    if raw.get("out") is not None:
        sw.out = str(_typed(raw["out"], str, "out", source))
    _parse_models(raw, sw, source)
    _parse_settings(raw, sw, source)
    _parse_data(raw.get("data"), sw, source)
    from .dense import parse_task

    parse_task(raw, sw, source)
    _parse_throughput(raw.get("throughput") or {}, sw, source)
    if raw.get("reference") is not None:
        sw.reference = str(_typed(raw["reference"], str, "reference", source))
    _parse_measure(raw, sw, source)
    sw.methods = _parse_methods(raw.get("methods"), source)
    for e in sw.methods:
        if e.models is not None and not set(e.models) <= set(sw.models):
            raise UserError(f"{source}: [methods.{e.label}] models: {', '.join(sorted(set(e.models) - set(sw.models)))} "
                            f"not among the sweep's models ({', '.join(sw.models)})")
    if sw.time_by_default is not None:
        check_selectors(sw)
    return sw


def _parse_models(raw: dict, sw: Sweep, source: str) -> None:
    """``models`` (or ``model``) and ``dense_family``: timm names or the embedded models."""
    import timm

    from ..models import DENSE_MODELS, is_embedded

    if "model" in raw and "models" in raw:
        raise UserError(f"{source}: give `models` or `model`, not both")
    models = raw.get("models", raw.get("model", ["default"]))
    models = _as_list(models, "models", source)
    for m in models:
        _typed(m, str, "each model", source)
    sw.models = list(dict.fromkeys(models))
    family = raw.get("dense_family", [])
    family = family if isinstance(family, list) else [family]
    for m in family:
        _typed(m, str, "each dense_family model", source)
    sw.dense_family = [m for m in dict.fromkeys(family) if m not in sw.models]
    for m in sw.models + sw.dense_family:
        if not is_embedded(m) and m not in DENSE_MODELS and not timm.is_model(m):
            raise UserError(f"{source}: unknown model {m!r}{did_you_mean(m, timm.list_models())} "
                            "(a timm model name, or `default` / `default-small` / `default-convnext` for the "
                            "embedded models, `default-seg` / `default-convnext-seg` for the dense ones)")


def _parse_settings(raw: dict, sw: Sweep, source: str) -> None:
    """Input size, weights, the dense row, device and precision."""
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


def _parse_data(data: Any, sw: Sweep, source: str) -> None:
    """``[data]`` (or its name alone): the evaluated dataset, split, limit, seed, folder and batch."""
    if isinstance(data, str):
        data = {"name": data}
    if data is not None:
        _typed(data, dict, "data", source)
        _check_keys(data, DATA_KEYS, "[data]", source)
        if "name" not in data:
            raise UserError(f"{source}: [data] needs a `name` (fashion-mnist, imagenet, folder, synthetic)")
        from ..data import DATASETS as CLASSIFICATION_DATA
        from ..data_scenes import DENSE_DATASETS
        from .dense import default_split

        DATASETS = CLASSIFICATION_DATA + DENSE_DATASETS
        sw.data = str(_typed(data["name"], str, "data name", source))
        if sw.data not in DATASETS:
            raise UserError(f"{source}: unknown dataset {sw.data!r}{did_you_mean(sw.data, DATASETS)}; "
                            f"choose from {', '.join(DATASETS)}")
        sw.split = str(_typed(data.get("split", default_split(sw.data)), str, "data split", source))
        if sw.split not in ("val", "test", "train"):
            raise UserError(f"{source}: unknown data split {sw.split!r}"
                            f"{did_you_mean(sw.split, ('val', 'test', 'train'))} (use train, val or test)")
        sw.limit = _typed(data.get("limit"), int, "data limit", source, allow_none=True)
        if sw.limit is not None and sw.limit <= 0:
            raise UserError(f"{source}: data limit must be positive, got {sw.limit}")
        sw.data_seed = int(_typed(data.get("seed", 0), int, "data seed", source))
        if data.get("dir") is not None:
            sw.data_dir = str(_typed(data["dir"], str, "data dir", source))
        sw.eval_batch_size = int(_typed(data.get("batch_size", 256), int, "data batch_size", source))
        if sw.eval_batch_size < 1:
            raise UserError(f"{source}: data batch_size must be positive")


def _parse_throughput(tp: Any, sw: Sweep, source: str) -> None:
    """``[throughput]``: batch size, threads, run time, rounds, retries, compilation, CUDA graphs."""
    _typed(tp, dict, "throughput", source)
    _check_keys(tp, THROUGHPUT_KEYS, "[throughput]", source)
    sw.batch_size = int(_typed(tp.get("batch_size", 64), int, "throughput batch_size", source))
    sw.threads = _typed(tp.get("threads"), int, "throughput threads", source, allow_none=True)
    sw.min_run_time = float(_typed(tp.get("min_run_time", 2.0), (int, float), "throughput min_run_time", source))
    sw.latency = bool(_typed(tp.get("latency", True), bool, "throughput latency", source))
    sw.rounds = int(_typed(tp.get("rounds", 10), int, "throughput rounds", source))
    sw.retries = int(_typed(tp.get("retries", 2), int, "throughput retries", source))
    sw.compile = _compile_setting(tp.get("compile", False), source)
    sw.cuda_graphs = bool(_typed(tp.get("cuda_graphs", False), bool, "throughput cuda_graphs", source))
    if sw.cuda_graphs and sw.compile:
        raise UserError(f"{source}: throughput cuda_graphs times the eager model; compiled, CUDA graphs are "
                        "compile = \"reduce-overhead\"")
    if sw.batch_size < 1 or (sw.threads is not None and sw.threads < 1) or sw.min_run_time <= 0:
        raise UserError(f"{source}: throughput batch_size, threads and min_run_time must be positive")
    if sw.rounds < 3 or sw.retries < 0:
        raise UserError(f"{source}: throughput rounds must be at least 3 and retries at least 0")
    if tp.get("time_by_default") is not None:
        sw.time_by_default = [str(_typed(x, str, "throughput time_by_default", source))
                              for x in _as_list(tp["time_by_default"], "throughput time_by_default", source)]


def _parse_measure(raw: dict, sw: Sweep, source: str) -> None:
    """What to measure, the FLOPs targets and tolerance, the seeds."""
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


def _parse_methods(methods: Any, source: str) -> list[MethodEntry]:
    """``[methods.<label>]`` tables, each a method's parameter grid."""
    from ..registry import load_methods

    if methods is None or methods == {}:
        raise UserError(f"{source}: no methods: add a [methods.<name>] table (`tokenbench list` names them) "
                        "or --method")
    _typed(methods, dict, "methods", source)
    load_methods()
    return [_parse_entry(label, body, source) for label, body in methods.items()]


def _parse_entry(label: str, body: Any, source: str) -> MethodEntry:
    """One ``[methods.<label>]`` table: its method, parameter grid, targets, seeds, checkpoints."""
    from ..registry import get_method

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
        if entry.flops_targets and not cls.knob:
            raise UserError(f"{source}: [methods.{label}]: {mname} declares no parameter a FLOPs search can "
                            "move, so it takes no flops_targets")
    if "seeds" in body:
        entry.seeds = _seeds(body["seeds"], f"[methods.{label}] seeds", source)
        if cls.seed_param is None:
            raise UserError(f"{source}: [methods.{label}]: seeds apply to non-deterministic methods that "
                            f"declare a seed parameter; {mname} is deterministic")
    if body.get("models") is not None:
        entry.models = [str(_typed(m, str, f"[methods.{label}] models", source))
                        for m in _as_list(body["models"], f"[methods.{label}] models", source)]
    if body.get("checkpoint") is not None:
        entry.checkpoint = str(_typed(body["checkpoint"], str, f"[methods.{label}] checkpoint", source))
    if body.get("checkpoints") is not None:
        _parse_checkpoints(entry, body["checkpoints"], cls, source)
    return entry


def _parse_checkpoints(entry: MethodEntry, cks: Any, cls: type[Method], source: str) -> None:
    """``checkpoints``: one checkpoint per value of the method's knob."""
    label, mname = entry.label, entry.method
    cks = _typed(cks, dict, f"[methods.{label}] checkpoints", source)
    if not cls.knob:
        raise UserError(f"{source}: [methods.{label}]: checkpoints are keyed by values of the searched "
                        f"parameter, and {mname} declares none; use `checkpoint`")
    if entry.checkpoint:
        raise UserError(f"{source}: [methods.{label}]: give `checkpoint` or `checkpoints`, not both")
    p = cls.param(cls.knob)
    for key, path in cks.items():
        _typed(path, str, f"[methods.{label}] checkpoints.{key}", source)
        try:
            val = p.parse(_decode(key), mname)
        except UserError as e:
            raise UserError(f"{source}: [methods.{label}] checkpoints: key {key!r}: {e}") from None
        entry.checkpoints[json.dumps(val)] = path


def parse_selector(text: str, source: str = "<sweep>") -> tuple[str, Optional[float]]:
    """A ``[throughput] time_by_default`` selector: ``LABEL`` -> (label, None); ``LABEL@0.7`` -> (label, 0.7)."""
    label, at, target = text.partition("@")
    if not label.strip():
        raise UserError(f"{source}: [throughput] time_by_default: {text!r} names no setting (LABEL or LABEL@0.7)")
    if not at:
        return label.strip(), None
    try:
        t = float(target)
    except ValueError:
        t = -1.0
    if not 0 < t <= 1:
        raise UserError(f"{source}: [throughput] time_by_default: {text!r}: the part after @ is a FLOPs target "
                        "in (0, 1]")
    return label.strip(), t


def entry_targets(sw: Sweep, e: MethodEntry, cls) -> list[float]:
    """The FLOPs targets an entry's knob is searched for."""
    if e.flops_targets is not None:
        return e.flops_targets
    return sw.flops_targets if (cls.knob and cls.knob not in e.grid) else []


def check_selectors(sw) -> None:
    """Refuse a selector naming no entry of ``sw`` (``dense``, a dense_family model or a method label)."""
    from ..registry import get_method

    labels = ["dense", *sw.dense_family, *(e.label for e in sw.methods)]
    targets = {e.label: entry_targets(sw, e, get_method(e.method)) for e in sw.methods}
    for text in sw.time_by_default or []:
        label, t = parse_selector(text, sw.source)
        if label not in labels:
            raise UserError(f"{sw.source}: [throughput] time_by_default: no entry {label!r}"
                            f"{did_you_mean(label, labels)} (choose from {', '.join(labels)})")
        own = targets.get(label, [])
        if t is not None and not any(abs(x - t) < 1e-9 for x in own):
            has = (f"its FLOPs targets are {', '.join(f'{x:g}' for x in own)}" if own
                   else f"it has no FLOPs targets: write {label!r}")
            raise UserError(f"{sw.source}: [throughput] time_by_default: {text!r} selects nothing ({has})")


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
