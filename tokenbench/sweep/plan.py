"""The plan: a sweep expanded into runs, each run's store keys, written to ``<out>/sweep.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError, cannot_write
from .expand import Run, expand
from .format import DENSE_METHOD, Sweep, parse_selector
from .preflight import preflight
from .search import CACHE_FILE, FlopsSearch

PLAN_FILE = "sweep.json"
TIMED = ("throughput", "speedup")


def baseline_spec(run: Run) -> dict:
    """The dense model a run's speedup is timed against: same model, input size and pretrained
    weights, no method, no checkpoint."""
    from ..runner import spec_dict

    return spec_dict(run.model, DENSE_METHOD, {}, run.pretrained, None, run.img_size)


def run_settings(run: Run, sw: Sweep):
    """The settings a run is measured with: the sweep's; for a method whose token count depends
    on the image, with FLOPs counted on the first :data:`~tokenbench.inputs.SEARCH_IMAGES` images
    of the sweep's data (those its matched-FLOPs search counted) and timings on a batch of them."""
    from dataclasses import replace

    from ..inputs import SEARCH_IMAGES

    from .dense import is_dense

    s = sw.settings()
    if run.per_image and sw.data:  # a dense run's FLOPs: runner_dense counts them on the scenes itself
        s = replace(s, timing_on_data=True) if is_dense(sw) else \
            replace(s, flops_on_data=True, flops_images=SEARCH_IMAGES, timing_on_data=True)
    return s


def search_data(sw: Sweep):
    """Where the sweep's matched-FLOPs search counts per-image methods: its data (a dense sweep's too:
    the first images of its scenes, as its segmentation records count them), or None."""
    from ..inputs import SEARCH_IMAGES
    from .search import SearchData

    if not sw.data:
        return None
    return SearchData(sw.data, sw.split, sw.data_dir, sw.data_seed, SEARCH_IMAGES)


def run_keys(run: Run, sw: Sweep) -> dict[str, str]:
    """The store keys this run's records have (or will have), per kind."""
    from ..registry import get_method
    from ..runner import record_key_of

    from .dense import DENSE_KIND, dense_key

    spec = run.spec()
    spec["params"] = get_method(run.method).validate(spec["params"])
    s = run_settings(run, sw)
    out = {}
    for k in kinds_for(run, sw):
        if k == DENSE_KIND:
            out[k] = dense_key(run, sw)
            continue
        out[k] = record_key_of(k, spec, s, baseline_spec(run) if k == "speedup" else None)[0]
    return out


def kinds_for(run: Run, sw: Sweep) -> list[str]:
    """What a run measures: the sweep's kinds, and with throughput, the speedup over the dense
    model timed interleaved with it (a seeded method's throughput for its first seed only; none for a
    run left untimed, :mod:`.timing`); a dense sweep's run, its ``segmentation`` record first (:mod:`.dense`)."""
    from .dense import dense_kinds, is_dense

    if is_dense(sw):
        return dense_kinds(run, sw, run.method != DENSE_METHOD and sw.dense)
    out = []
    for k in sw.measure:
        if k == "throughput":
            if run.seed_index > 0 or run.untimed:
                continue
            out.append(k)
            if run.method != DENSE_METHOD and sw.dense:
                out.append("speedup")
        else:
            out.append(k)
    return out


def reference_store(sw: Sweep):
    """The sweep's reference results as a read-only store (None without one)."""
    from ..store import Store

    ref = sw.reference_dir()
    return Store(ref, read_only=True) if ref is not None and ref.is_dir() else None


# --------------------------------------------------------------------------- runs left untimed

def selected(run: Run, selectors: list[tuple[str, Optional[float]]]) -> bool:
    return any(run.label == label and (t is None or any(abs(x - t) < 1e-9 for x in run.targets))
               for label, t in selectors)


def recorded(key: str, store, reference, min_run_time: Optional[float] = None) -> bool:
    """Whether ``key`` is recorded in ``store`` or ``reference``, as the runner finds it (a timing,
    with ``min_run_time``: not one timed for less)."""
    from ..runner import stored_record

    return stored_record(key, store, reference, min_run_time)[0] is not None


def mark_untimed(sw, runs: list, store, reference) -> int:
    """Mark untimed each run outside the sweep's ``time_by_default`` whose timings are not all
    recorded in ``store`` or ``reference`` (the store whose timing records may be reused: None
    when there is none or they are set aside); returns how many.  No selectors: every run is timed."""
    if sw.time_by_default is None or not any(k == "throughput" for k in sw.measure):
        return 0
    sel = [parse_selector(s, sw.source) for s in sw.time_by_default]
    n = 0
    for run in runs:
        run.untimed = False
        if selected(run, sel):
            continue
        keys = [k for kind, k in run_keys(run, sw).items() if kind in TIMED]
        if keys and not all(recorded(k, store, reference, sw.min_run_time) for k in keys):
            run.untimed = True
            n += 1
    return n


def timing_reference(sw, reference):
    """The reference store as far as timings may be reused from it."""
    return reference if sw.reference_timings else None


def plan_dict(sw: Sweep, runs: list[Run], keys: Optional[list[dict]] = None) -> dict:
    from .dense import skipped_entries

    d = asdict(sw)
    d.pop("methods")
    return {"sweep": d, "methods": [asdict(e) for e in sw.methods], "settings": asdict(sw.settings()),
            "skipped": [s["why"] for s in skipped_entries(sw)],
            "runs": [{**asdict(r), "name": r.name, "spec": r.spec(), "keys": (keys[i] if keys else {})}
                     for i, r in enumerate(runs)]}


def write_plan(out: Path, sw: Sweep, runs: list[Run], keys: list[dict]) -> Path:
    from ..store import atomic_write_text

    p = Path(out) / PLAN_FILE
    try:
        atomic_write_text(p, json.dumps(plan_dict(sw, runs, keys), indent=1, default=str) + "\n")
    except OSError as e:
        raise UserError(cannot_write(p, e)) from None
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


def prepare(sw: Sweep, out: Optional[Path] = None, force: bool = False,
            on_search: Optional[Callable[[int, int, str, int], None]] = None,
            write: bool = True) -> tuple[Path, list[Run], list[dict], FlopsSearch]:
    """Expand ``sw`` (searching matched-FLOPs values, cached in the output dir) and write its plan
    (``write=False``, a dry run: the folder's plan stays as it was, so its report and ``prune
    --unplanned`` still read the runs it measured).

    ``on_search(done, total, what, counts)`` follows the matched-FLOPs searches (see :func:`expand`)."""
    out = Path(out) if out else sw.out_dir()
    from ..store import Store, ensure_writable_dir

    Store(out).ensure_writable()
    ensure_writable_dir(out, "output directory")  # the plan, the FLOPs cache, the tables
    ref = sw.reference_dir()
    searcher = FlopsSearch(out / CACHE_FILE, force=force,
                           seed_path=(ref / CACHE_FILE) if ref is not None else None, data=search_data(sw))
    preflight(sw, searcher)
    runs = expand(sw, searcher, on_search=on_search)
    mark_untimed(sw, runs, Store(out), timing_reference(sw, reference_store(sw)))
    keys = [run_keys(r, sw) for r in runs]
    if write:
        write_plan(out, sw, runs, keys)
    return out, runs, keys, searcher
