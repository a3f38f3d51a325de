"""Rows from a results directory: which records belong to which run, by the sweep's plan or by grouping."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..identity import stale_reasons
from .stats import aggregate_seeds, closing_notes, compare_with_dense, timing_notes
from .rows import DENSE_METHOD, SETTINGS, method_info, on_images, row_from_records
from ..sweep import DEFAULT_TOLERANCE, read_plan


def run_identity(spec: dict) -> str:
    """What one run is, whatever its records' keys: model, method, parameters, weights, input size."""
    from ..store import canonical

    return canonical({k: spec.get(k) for k in ("model", "method", "params", "pretrained", "checkpoint",
                                               "img_size")})


def _latest(recs: list[dict]) -> Optional[dict]:
    """The record to report among several of one run and kind: a current one before a stale one, then
    one made on real images before one on the synthetic input (for a method whose token count depends
    on the image it is the right one, for the others the same number), then the newest."""
    return max(recs, key=lambda r: (not stale_reasons(r), on_images(r), r.get("meta", {}).get("time", ""))) \
        if recs else None


def _entries_from_plan(plan: dict, by_key: dict) -> list[dict]:
    out = []
    for r in plan["runs"]:
        keys = r.get("keys") or {}
        out.append({
            "label": r.get("label") or r["method"], "spec": r["spec"], "targets": r.get("targets") or [],
            "seed_param": r.get("seed_param"), "planned": sorted(keys),
            "recs": {k: by_key.get(v) for k, v in keys.items()}, "line_of": r.get("line_of"),
            "untimed": bool(r.get("untimed")), "per_image": bool(r.get("per_image")),
        })
    return out


def _newest_weights(recs: list[dict], notes: list[str]) -> list[dict]:
    """``recs`` without the records of a model's older weights: the runs on the model's own weights
    (no checkpoint of their own: the dense model and the training-free methods, pretrained or not)
    are compared with one another, so all must come from one set of weights, the newest measured (a
    retrained model).  A record that names no weights is kept."""
    def own(r: dict) -> Optional[tuple]:
        spec, weights = r["spec"], r.get("key_fields", {}).get("weights")
        return None if spec.get("checkpoint") or weights is None else (spec["model"], bool(spec.get("pretrained")))

    newest: dict[tuple, str] = {}
    for r in sorted(recs, key=lambda r: r.get("meta", {}).get("time", "")):
        if own(r) is not None:
            newest[own(r)] = r["key_fields"]["weights"]
    older = [r for r in recs if own(r) is not None and r["key_fields"]["weights"] != newest[own(r)]]
    if older:
        models = sorted({r["spec"]["model"] for r in older})
        notes.append(f"{len(older)} record(s) of older weights of {', '.join(models)} left out (a retrained "
                     "model: compared with its older numbers they would mix two models)")
    gone = {id(r) for r in older}
    return [r for r in recs if id(r) not in gone]


def _entries_from_records(recs: list[dict], notes: list[str]) -> list[dict]:
    recs = _newest_weights(recs, notes)
    chosen = {}  # kind -> the one setting of its records reported (a speedup with the throughput beside it)
    for kinds, setting, several, words in SETTINGS:
        of_kind = [r for r in recs if r["kind"] in kinds]
        counts = Counter(map(setting, of_kind))
        if not counts:
            continue
        top = counts.most_common(1)[0][0]
        if len(counts) > 1:
            notes.append(f"{several}: reporting {words(top)}")
        chosen.update({k: (setting, top) for k in kinds})
    groups: dict[str, dict] = {}
    for r in recs:
        setting, top = chosen.get(r["kind"], (None, None))
        if setting is not None and setting(r) != top:
            continue
        g = groups.setdefault(run_identity(r["spec"]), {"spec": r["spec"], "by_kind": {}})
        g["by_kind"].setdefault(r["kind"], []).append(r)
    out = []
    for g in groups.values():
        spec = g["spec"]
        _, seed_p = method_info(spec["method"])
        out.append({"label": spec["method"], "spec": spec, "targets": [], "seed_param": seed_p,
                    "planned": sorted(g["by_kind"]), "recs": {k: _latest(v) for k, v in g["by_kind"].items()}})

    def order(e):
        s = e["spec"]
        g = (e["recs"].get("flops") or {}).get("metrics", {}).get("gflops", 0.0)
        return (s["model"], s["method"] != DENSE_METHOD, s["method"], -g, json.dumps(s["params"], sort_keys=True))

    return sorted(out, key=order)


def collect(out: str | os.PathLike) -> dict:
    """Rows (all, for the CSV) and display rows (seeds aggregated) from the records in ``out``."""
    from ..store import Store

    out = Path(out)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store(out)
        recs = store.records()
        plan = read_plan(out)
    for w in caught:
        notes.append(str(w.message))
    notes += (plan or {}).get("skipped") or []  # a dense sweep's methods that cannot restore the grid
    dense = [r for r in recs if r["kind"] == "segmentation"]
    classification = [r for r in recs if r["kind"] in ("flops", "accuracy")]
    if dense and classification:  # a dense sweep writes no FLOPs or accuracy records: one table of the two
        if plan and any("segmentation" in (run.get("keys") or {}) for run in plan["runs"]):  # a dense plan
            recs = [r for r in recs if r["kind"] not in ("flops", "accuracy")]
            notes.append(f"{len(classification)} classification record(s) left out of the dense table")
        else:
            recs = [r for r in recs if r["kind"] != "segmentation"]
            notes.append(f"{len(dense)} dense (segmentation) record(s) left out of the classification table")
    if not recs:
        raise UserError(f"no records in {out / 'records'} (run a sweep there first: tokenbench run --out {out})")
    by_key = {r["key"]: r for r in recs}
    tolerance = DEFAULT_TOLERANCE
    if plan:
        tolerance = float(plan.get("sweep", {}).get("flops_tolerance") or DEFAULT_TOLERANCE)
        entries = _entries_from_plan(plan, by_key)
    else:
        entries = _entries_from_records(recs, notes)
    rows = [row_from_records(e["label"], e["spec"], e["recs"], e["planned"], e["targets"], e["seed_param"], tolerance,
                             line_of=e.get("line_of"), untimed=e.get("untimed", False),
                             per_image=e.get("per_image", False)) for e in entries]
    compare_with_dense(rows)
    display = aggregate_seeds(rows)
    notes += closing_notes(rows)
    return {"rows": rows, "display": display, "notes": notes, "plan": plan, "out": out,
            "timing_notes": timing_notes(rows)}
