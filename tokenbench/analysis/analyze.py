"""``tokenbench analyze DIR``: every analysis of a sweep's settings, as tables and figures.

Reads the sweep's settings (:mod:`tokenbench.analysis.settings`), re-runs only what needs a
model (:mod:`tokenbench.analysis.trace`, cached beside the output), computes the tables
(:mod:`tokenbench.analysis.tables`) and draws them (:mod:`tokenbench.analysis.plots`).  Each
table as ``.md``, ``.csv`` and ``.tex``; each figure as ``.png`` and ``.pdf`` in ``plots/``;
``index.md`` says what was analysed, on which images, and the checks made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import UserError, cannot_write
from . import trace
from .metrics import centre_prior
from .plots import budget_plot, drift_plot, keep_map_grid, kappa_heatmaps, pattern_heatmaps, per_class_heatmap
from .settings import Setting, gather_settings
from .tables import budget_tables, drift_table, kappa_table, pattern_table, per_class_table, spatial_table

# Images re-run by default: over 1000 images a keep frequency has a standard error of at most 0.016 (a mean
# IoU or a CKA less), and re-running a sweep's whole evaluated set (5000 images by default) costs five times as long.
DEFAULT_RERUN_IMAGES = 1000
FIGURE_STEMS = ("patterns_iou_", "errors_kappa_", "per_class_change", "drift", "budget_tokens", "keep_maps")


def analyze(out: str | Path, methods: Optional[Sequence[str]] = None, flops: Optional[Sequence[float]] = None,
            limit: Optional[int] = DEFAULT_RERUN_IMAGES, plots: bool = True, progress: Optional[Any] = None,
            dest: Optional[str | Path] = None, model: Optional[str] = None) -> dict:
    """Write every analysis of the sweep in ``out`` under ``out/analysis`` (or ``dest``); returns a summary.
    ``model``: the model analysed, where ``out`` holds several (by default into ``analysis/<model>``).

    A committed reference sweep (under ``results/``) is analysed into ``runs/analysis/<name>``
    unless ``dest`` says otherwise (:func:`tokenbench.outputs.analysis_dirs`).  The figures
    already in the destination's ``plots/`` are replaced, so that it holds this run's alone; the
    cache of re-runs lives beside the default destination, never in a reference folder.

    ``limit``: models are re-run on the first ``limit`` evaluated images (0 or None: all of them);
    the error tables always use every recorded image.  ``progress``: a rich Progress to report on
    (None: silent).
    """
    t0 = time.time()
    from ..report.write import check_results_dir

    out = check_results_dir(out)
    if limit is not None and limit != 0 and limit < 2:
        raise UserError(f"--limit must be at least 2 (CKA needs two images), or 0 for every image; got {limit}")
    settings, data, notes = gather_settings(out, methods, flops, model)
    if not data.get("name"):
        raise UserError(f"the accuracy records in {out} do not say which data they measured")
    adir, cache_dir = _writable_dirs(out, dest, None if dest is not None else model)
    files: list[Path] = kappa_table(settings).write(adir)   # error agreement: the records alone

    models = _Models()
    dnet = models.net(next(s for s in settings if s.is_dense))
    full_ds, labels, class_names = _evaluated_images(dnet, data, settings)
    per_class, class_mat = per_class_table(settings, labels, class_names)
    files += per_class.write(adir)

    n_img = min(limit or len(full_ds), len(full_ds))
    blocks = trace.comparison_blocks(_depth(dnet))
    traced = [s for s in settings if s.traced]
    re_run = _retrace(traced, models, trace.evaluated_dataset(dnet, data, n_img)[0], data, n_img, blocks,
                      cache_dir, progress)
    checks = _check_predictions(traced, n_img, limited=n_img < len(full_ds))

    grid = _grid(dnet)
    pat, pat_mats = pattern_table(traced, blocks)
    drift = drift_table(traced)
    budget, budget_cls, dists = budget_tables(traced, labels, class_names, dnet)
    spatial, maps = spatial_table(traced, grid, blocks)
    for table in (pat, drift, budget, budget_cls, spatial):
        files += table.write(adir)
    if plots:
        files += _draw(adir / "plots", progress, [
            lambda pdir: pattern_heatmaps(pat_mats, blocks, pdir), lambda pdir: kappa_heatmaps(settings, pdir),
            lambda pdir: per_class_heatmap(class_mat, class_names, pdir), lambda pdir: drift_plot(drift.rows, pdir),
            lambda pdir: budget_plot(dists, pdir), lambda pdir: keep_map_grid(maps, centre_prior(grid), pdir)])
    elapsed = time.time() - t0
    command = " ".join([f"tokenbench analyze {out}"]
                       + ([f"--methods {','.join(methods)}"] if methods else [])
                       + ([f"--flops {','.join(f'{f:g}' for f in flops)}"] if flops else [])
                       + ([f"--limit {limit}"] if limit != DEFAULT_RERUN_IMAGES else [])
                       + ([f"--model {model}"] if model else []) + ([f"--out {dest}"] if dest is not None else []))
    files.append(_write_index(adir, out, settings, data, n_img, len(full_ds), blocks, checks, notes,
                              command, cache_dir))
    warnings_ = [c for c in checks if "differently" in c] + notes
    return {"out": str(adir), "settings": len(settings), "traced": len(traced), "re_run": re_run,
            "n_images": n_img, "files": [str(f) for f in files], "notes": warnings_, "seconds": round(elapsed, 1)}


def _writable_dirs(out: Path, dest: Optional[str | Path], model: Optional[str] = None) -> tuple[Path, Path]:
    """(where the analysis is written, where re-runs are cached), the first made and checked writable
    (``model``: in a folder of its own inside the default destination)."""
    from ..outputs import analysis_dirs

    adir, cache_dir = analysis_dirs(out, dest)
    if model is not None:
        adir = adir / model
    try:
        adir.mkdir(parents=True, exist_ok=True)
        probe = adir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(cannot_write(adir, e)) from None
    return adir, cache_dir


class _Models:
    """The settings' models, each built once (per accuracy record) and dropped once re-run."""

    def __init__(self):
        self._nets: dict[str, Any] = {}

    @staticmethod
    def _key(s: Setting) -> str:
        return s.keys.get("accuracy") or s.name

    def net(self, s: Setting):
        key = self._key(s)
        if key not in self._nets:
            from ..api import load

            sp = s.spec
            self._nets[key], _ = load(sp.get("model", "default"), sp.get("method", s.method),
                                      sp.get("params", s.params), pretrained=bool(sp.get("pretrained")),
                                      checkpoint=sp.get("checkpoint"), img_size=sp.get("img_size"))
        return self._nets[key]

    def drop(self, s: Setting) -> None:
        self._nets.pop(self._key(s), None)


def _evaluated_images(dnet, data: dict, settings: list[Setting]) -> tuple[Any, np.ndarray, list[str]]:
    """(the evaluated images, their labels, the class names), through the dense model's
    preprocessing; refused where they are not the images the records measured."""
    dense = next(s for s in settings if s.is_dense)
    full_ds, dspec = trace.evaluated_dataset(dnet, data)
    if data.get("indices_sha") and dspec.indices_sha and data["indices_sha"] != dspec.indices_sha:
        raise UserError(f"the data subset rebuilt here ({dspec.indices_sha}) is not the one the records measured "
                        f"({data['indices_sha']}): different dataset files?")
    if len(full_ds) != len(dense.correct):
        raise UserError(f"the records measured {len(dense.correct)} images, the data here gives {len(full_ds)}")
    labels = trace.dataset_labels(full_ds)
    return full_ds, labels, _class_names(full_ds, data["name"], int(labels.max()) + 1)


def _retrace(traced: list[Setting], models: _Models, ds, data: dict, n_img: int, blocks: list[int],
             cache_dir: Path, progress: Optional[Any]) -> int:
    """Every traced setting's re-run on ``ds``: from the cache where it holds these images, else
    run with the model (one in memory at a time) and cached.  Returns how many were run."""
    data_id = {k: data.get(k) for k in ("name", "split", "limit", "seed", "indices_sha")}
    todo = []
    for s in traced:
        key = trace.cache_key(s.keys, data_id, n_img, data["batch_size"], blocks)
        got = trace.load_cached(cache_dir, key)
        if got is not None and len(got.get("pred", ())) == n_img:
            s.trace = got
        else:
            todo.append((s, key))
    task = None
    if progress is not None and todo:
        task = progress.add_task(f"re-running {len(todo)} settings", total=len(todo) * n_img)
    for s, key in todo:
        if task is not None:
            progress.update(task, description=f"re-run {s.name}"[:60])
        s.trace = trace.trace_setting(models.net(s), ds, data["batch_size"], blocks,
                                      on_batch=(lambda k: progress.advance(task, k)) if task is not None else None)
        trace.save_cached(cache_dir, key, s.trace)
        if not s.is_dense:
            models.drop(s)
    return len(todo)


def _draw(pdir: Path, progress: Optional[Any], drawings: Sequence[Callable[[Path], list[Path]]]) -> list[Path]:
    """Each drawing into ``pdir``, after removing the figures an earlier run left there (a narrower
    run leaves no figure of a wider one behind)."""
    for old in pdir.glob("*"):
        if old.suffix in (".png", ".pdf") and old.stem.startswith(FIGURE_STEMS) and old.is_file():
            old.unlink()
    files: list[Path] = []
    task = progress.add_task("drawing figures", total=len(drawings)) if progress is not None else None
    for draw in drawings:
        files += draw(pdir)
        if task is not None:
            progress.advance(task)
    return files


def _grid(net) -> tuple[int, int]:
    from ..visual.trace import token_geometry

    return token_geometry(net).grid


def _depth(net) -> int:
    from ..visual.trace import token_geometry

    return token_geometry(net).depth


def _class_names(ds, data: str, k: int) -> list[str]:
    from torch.utils.data import Subset

    base = ds
    while isinstance(base, Subset):
        base = base.dataset
    names = getattr(base, "classes", None)
    if data == "fashion-mnist":
        from ..data import FMNIST_CLASSES

        names = list(FMNIST_CLASSES)
    if names and len(names) >= k:
        return [str(n) for n in names[:k]]
    return [f"class {i}" for i in range(k)]


def _check_predictions(traced: list[Setting], n: int, limited: bool) -> list[str]:
    """The re-run's predictions against the records' (they should be the same images, the same model)."""
    out = []
    why = (" (the image limit shortens the last batch: a method whose choices depend on the batch, such as "
           "random today, draws differently)" if limited else "")
    for s in traced:
        if s.predictions is None:
            out.append(f"{s.name}: the record keeps no predictions; not checked")
            continue
        diff = int((s.trace["pred"][:n] != s.predictions[:n]).sum())
        if diff:
            out.append(f"{s.name}: the re-run predicts differently from its record on {diff} of {n} images; "
                       f"the analysis describes the re-run{why}")
    if not any("differently" in c for c in out):
        out.append(f"every re-run checked predicts exactly what its record holds, on all {n} images")
    return out


def _write_index(adir: Path, out: Path, settings: list[Setting], data: dict, n_img: int, n_all: int,
                 blocks: list[int], checks: list[str], notes: list[str], command: str, cache_dir: Path) -> Path:
    from ..outputs import repository_relative
    from ..store import atomic_write_text

    traced = [s for s in settings if s.traced]
    lines = [f"# tokenbench analysis: {out.name}", "",
             f"Written by `{command}`. {len(settings)} settings from the records "
             f"({len(traced)} re-run with the model: the first seed of a seeded method), on "
             f"{data['name']} {data['split']}: {n_all} images in the records"
             + (f" (seeded stratified subset, seed {data['seed']})" if data.get("limit") else "")
             + (f", the first {n_img} re-run" if n_img < n_all else ", all re-run")
             + f" in dataset order at batch {data['batch_size']}. Reduction patterns compared after blocks "
             + ", ".join(map(str, blocks)) + ".", "",
             "FLOPs levels: a setting's FLOPs target in the plan, or, without one, the nearest target within the "
             "tolerance, else its own FLOPs ratio.", "",
             "| table | what |", "|---|---|",
             "| [patterns](patterns.md) | IoU of surviving patches, pairs of methods at matched FLOPs, per stage |",
             "| [errors_kappa](errors_kappa.md) | Cohen's kappa on correctness, pairs of settings |",
             "| [per_class](per_class.md) | per-class top-1 change against dense |",
             "| [drift](drift.md) | linear CKA and cosine of final features against dense |",
             "| [budget](budget.md), [budget_per_class](budget_per_class.md) | tokens and FLOPs per image |",
             "| [spatial](spatial.md) | keep maps against a centre prior |", "",
             "Figures (PNG and PDF) in [plots/](plots/): "
             + (", ".join(sorted({p.stem for p in (adir / "plots").glob("*.png")})) or "none drawn") + ".", "",
             "Checks:", ""] + [f"- {c}" for c in checks] + [""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += [f"Model re-runs are cached in `{repository_relative(cache_dir)}` (not results), keyed by the records' keys, "
              "the data subset, the image count and the batch size: a second run re-runs nothing, and re-keyed "
              "records are simply re-run."]
    p = adir / "index.md"
    atomic_write_text(p, "\n".join(lines) + "\n")
    return p
