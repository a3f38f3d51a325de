"""The settings ``tokenbench analyze`` compares: one per accuracy record of the sweep measured on
the dense model's images (one per seed of a seeded method), each with its FLOPs level, its
per-image correctness and predictions, and the record keys a re-run is cached under.

Read through :func:`tokenbench.report.collect.collect`, so the analysis keys on what the
records contain, whatever their keys are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..sweep import DENSE_METHOD, fmt_value
from .metrics import flops_level


# --------------------------------------------------------------------------- settings

@dataclass
class Setting:
    """One measured setting of the sweep (one seed of a seeded method)."""

    label: str                      # the sweep entry's label (method name unless the sweep says otherwise)
    method: str
    params: dict
    seed_param: Optional[str]
    seed_index: int
    level: Optional[float]          # matched-FLOPs level (None: dense)
    flops_rel: Optional[float]
    gflops: Optional[float]
    top1: float
    correct: np.ndarray             # bool [n], the record's per-image correctness
    predictions: Optional[np.ndarray]
    keys: dict                      # record keys of the FLOPs and accuracy records
    spec: dict                      # the accuracy record's spec (model, method, params, checkpoint, ...)
    learned: Optional[str] = None
    trace: Optional[dict] = None    # the re-run's arrays, when traced
    notes: list = field(default_factory=list)

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE_METHOD

    @property
    def level_text(self) -> str:
        if self.is_dense:
            return "dense"
        return "–" if self.level is None else f"{100 * self.level:.0f}%"

    @property
    def seed(self):
        return self.params.get(self.seed_param) if self.seed_param else None

    def knob(self) -> str:
        """The parameters that tell this setting apart (the seed excluded)."""
        shown = {k: v for k, v in self.params.items() if k != self.seed_param and not isinstance(v, bool)}
        return " ".join(fmt_value(v) for v in shown.values())

    @property
    def name(self) -> str:
        """Method label and parameters, the seed last: ``topk 0.48``, ``random 0.48 s1``."""
        if self.is_dense:
            return "dense"
        s = f"{self.label} {self.knob()}".strip()
        return s + (f" s{self.seed}" if self.seed_param else "")

    @property
    def short(self) -> str:
        """The name within one FLOPs level: the label (and seed)."""
        if self.is_dense:
            return "dense"
        return self.label + (f" s{self.seed}" if self.seed_param else "")

    @property
    def group(self) -> str:
        """The name of the setting with its seeds pooled."""
        return "dense" if self.is_dense else f"{self.label} {self.knob()}".strip()

    @property
    def traced(self) -> bool:
        """Re-run with the model: every setting, but only the first seed of a seeded method."""
        return self.seed_index == 0



def gather_settings(out: Path, methods: Optional[Sequence[str]] = None,
                    flops: Optional[Sequence[float]] = None,
                    model: Optional[str] = None) -> tuple[list[Setting], dict, list[str]]:
    """The settings of ``out`` with an accuracy record on the dense model's images, narrowed to
    ``methods`` (labels or method names) and ``flops`` levels; dense always included.  Of one
    model: ``model``, or the only one ``out`` holds (several and none named: one line).

    Returns (settings, data settings, notes).
    """
    from ..report.collect import collect
    from ..store import Store

    res = collect(out)
    if any(r.is_seg for r in res["rows"]) and not any(r.keys.get("accuracy") for r in res["rows"]):
        raise UserError(f"{out} holds a dense sweep (mIoU): analyze reads classification sweeps (top-1 per image); "
                        f"compare its settings with tokenbench compare {out} A B --model MODEL")
    notes = [n for n in res["notes"] if n not in res.get("timing_notes", ())]  # the analysis uses no timing
    plan = res.get("plan") or {}
    sweep = plan.get("sweep") or {}
    targets = [float(t) for t in sweep.get("flops_targets") or []]
    tolerance = float(sweep.get("flops_tolerance") or 0.03)
    store = Store(out)
    from ..report.stats import one_model

    rows = one_model([r for r in res["rows"] if r.correct and r.keys.get("accuracy") and not r.line_of], model, out)
    dense_rows = [r for r in rows if r.method == DENSE_METHOD]
    if not dense_rows:
        raise UserError(f"{out} has no accuracy record of the dense model (method none): every analysis "
                        "compares against it; run the sweep with dense = true")
    dense_row = dense_rows[0]
    same = [r for r in rows if r.acc_setting == dense_row.acc_setting and len(r.correct) == len(dense_row.correct)]
    if len(same) < len(rows):
        notes.append(f"{len(rows) - len(same)} accuracy records measured on other images than the dense "
                     "model's were left out")
    settings: list[Setting] = []
    for r in same:
        rec = store.get(r.keys["accuracy"])
        if rec is None:
            continue
        m = rec.get("metrics", {})
        preds = m.get("predictions")
        # what determines a re-run: the FLOPs and accuracy records (not throughput: a re-timing changes nothing)
        keys = {k: r.keys[k] for k in ("flops", "accuracy") if r.keys.get(k)}
        s = Setting(label=r.label, method=r.method, params=dict(r.params), seed_param=r.seed_param,
                    seed_index=0, level=None, flops_rel=r.flops_rel, gflops=r.gflops,
                    top1=float(r.top1), correct=np.frombuffer(r.correct.encode(), dtype=np.uint8) == ord("1"),
                    predictions=np.asarray(preds, dtype=np.int64) if preds is not None else None, keys=keys,
                    spec=dict(rec.get("spec") or {}), learned=r.learned)
        if not s.is_dense:
            s.level = flops_level(r.targets, s.flops_rel, targets, tolerance)
        settings.append(s)
    _number_seeds(settings)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(s.label for s in settings))}
    settings.sort(key=lambda s: (not s.is_dense, order[s.label], s.level or 0.0, s.seed_index))
    settings = _narrow(settings, methods, flops)
    data = _data_settings(store.get(dense_row.keys["accuracy"]), sweep)
    return settings, data, notes


def _number_seeds(settings: list[Setting]) -> None:
    """Seed index within each group of seeds, in plan order (the first seed is the one re-run)."""
    seen: dict[str, int] = {}
    for s in settings:
        if s.seed_param:
            key = json.dumps([s.label, s.group, s.spec.get("checkpoint")])
            s.seed_index = seen.get(key, 0)
            seen[key] = s.seed_index + 1


def _narrow(settings: list[Setting], methods: Optional[Sequence[str]], flops: Optional[Sequence[float]]
            ) -> list[Setting]:
    if methods:
        known = {s.label for s in settings} | {s.method for s in settings}
        unknown = [m for m in methods if m not in known]
        if unknown:
            from ..errors import did_you_mean

            raise UserError(f"--methods: no setting of {unknown[0]!r} here{did_you_mean(unknown[0], known)}; "
                            f"methods here: {', '.join(sorted(known - {DENSE_METHOD, 'dense'}))}")
        settings = [s for s in settings if s.is_dense or s.label in methods or s.method in methods]
    if flops:
        levels = sorted({s.level for s in settings if s.level is not None})
        for f in flops:
            if not any(abs(f - lv) < 0.005 for lv in levels):
                raise UserError(f"--flops {f:g}: no setting at that level; levels here: "
                                f"{', '.join(f'{lv:g}' for lv in levels)}")
        settings = [s for s in settings if s.is_dense or (s.level is not None and any(abs(f - s.level) < 0.005 for f in flops))]
    return settings


def _data_settings(rec: Optional[dict], sweep: dict) -> dict:
    """The evaluated images, from the dense accuracy record (the plan fills what it lacks)."""
    rec = rec or {}
    kf = rec.get("key_fields", {})
    md = (rec.get("metrics") or {}).get("data") or {}
    return {"name": kf.get("data") or md.get("name") or sweep.get("data"),
            "split": kf.get("split") or md.get("split") or sweep.get("split") or "test",
            "limit": kf.get("limit", md.get("limit", sweep.get("limit"))),
            "seed": kf.get("data_seed", md.get("seed", sweep.get("data_seed", 0))),
            "dir": md.get("data_dir") or sweep.get("data_dir"),
            "indices_sha": md.get("indices_sha"),
            "batch_size": int(sweep.get("eval_batch_size") or 256)}
