"""One typed row per run: what every reporting path (report, figures, bench.py) tabulates.

:func:`row_from_records` builds a :class:`Row` from one run's records (FLOPs, throughput,
paired speedup, accuracy) in one place.  The comparisons against the dense model and the
seed averages are filled in by :mod:`tokenbench.report.stats`; cells are written by
:mod:`tokenbench.report.render`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..errors import UserError
from ..identity import stale_reasons

if TYPE_CHECKING:
    from ..registry import Method

DENSE_METHOD = "none"

RECORD_KINDS = ("flops", "throughput", "speedup", "accuracy", "segmentation")
DENSE_KIND = "segmentation"  # a dense run's record: mIoU, pixel accuracy, per-image IoU, FLOPs of backbone and decoder


@dataclass(eq=False)
class Row:
    """One run (or one setting averaged over its seeds): its identity and every measured number."""

    model: str
    label: str
    method: str
    params: dict
    row_type: str = "run"                 # run | seed (one seed of a seeded setting) | mean (over the seeds)
    family: Optional[str] = None          # the method's declared family (none, pruning, merging, hybrid)
    line_of: Optional[str] = None         # a dense model of another size, drawn as a line on this model's plot
    seed_param: Optional[str] = None
    seed: Optional[int] = None
    n_seeds: Optional[int] = None
    seeds: Optional[list] = None
    targets: list = field(default_factory=list)
    checkpoint: Optional[str] = None
    learned: Optional[str] = None
    # FLOPs
    gflops: Optional[float] = None
    params_m: Optional[float] = None
    flops_rel: Optional[float] = None
    # throughput and the paired speedup
    img_per_s: Optional[float] = None
    img_per_s_q1: Optional[float] = None
    img_per_s_q3: Optional[float] = None
    img_per_s_std: Optional[float] = None
    latency_ms_p50: Optional[float] = None
    speedup: Optional[float] = None
    speedup_q1: Optional[float] = None
    speedup_q3: Optional[float] = None
    device: Optional[str] = None
    device_name: Optional[str] = None
    threads: Optional[int] = None
    batch_size: Optional[int] = None
    precision: Optional[str] = None
    tp_setting: Optional[tuple] = None
    # accuracy and the paired test against dense
    top1: Optional[float] = None
    top1_lo: Optional[float] = None
    top1_hi: Optional[float] = None
    top1_std: Optional[float] = None
    top5: Optional[float] = None
    top5_std: Optional[float] = None
    n: Optional[int] = None
    correct: Optional[str] = None
    acc_setting: Optional[tuple] = None
    mcnemar_p: Optional[float] = None
    only_dense: Optional[float] = None
    only_run: Optional[float] = None
    # dense prediction (a ``segmentation`` record) and the paired test against dense on per-image IoU
    task: str = "classification"
    miou: Optional[float] = None
    miou_lo: Optional[float] = None
    miou_hi: Optional[float] = None
    miou_std: Optional[float] = None
    pixel_accuracy: Optional[float] = None
    gflops_backbone: Optional[float] = None
    gflops_decoder: Optional[float] = None
    per_image_iou: Optional[list] = None
    iou_diff: Optional[float] = None        # mean per-image IoU of this run minus the dense model's
    iou_diff_lo: Optional[float] = None
    iou_diff_hi: Optional[float] = None
    iou_p: Optional[float] = None           # Wilcoxon signed-rank p on per-image IoU against dense
    # provenance and trust
    keys: dict = field(default_factory=dict)  # record kind -> record key
    warnings: list = field(default_factory=list)
    flags: set = field(default_factory=set)  # flags/warnings words: busy, noisy, stale, flops-miss, ...
    stale: Optional[str] = None
    tolerance: float = 0.0
    members: Optional[list] = None          # a mean row's seed rows

    @property
    def target(self) -> Optional[str]:
        return "/".join(f"{x:g}" for x in self.targets) or None

    @property
    def is_seg(self) -> bool:
        return self.task == DENSE_KIND

    @property
    def score(self) -> Optional[float]:
        """What the plots draw on y: mIoU for a dense task, top-1 otherwise (both in %)."""
        return self.miou if self.is_seg else self.top1

    @property
    def score_lo(self) -> Optional[float]:
        return self.miou_lo if self.is_seg else self.top1_lo

    @property
    def score_hi(self) -> Optional[float]:
        return self.miou_hi if self.is_seg else self.top1_hi

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE_METHOD

    @property
    def setting_params(self) -> dict:
        """The parameters without the seed."""
        return {k: v for k, v in self.params.items() if k != self.seed_param}

    def replace(self, **changes) -> "Row":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- settings of records

TIMED_KINDS = ("throughput", "speedup")   # the record kinds a timing setting applies to
TP_FIELDS = ("device", "device_name", "precision", "threads", "batch_size", "compile", "cuda_graphs", "attention",
             "input")  # input: the real images timed (absent: the synthetic batch)


def tp_setting(rec: dict) -> tuple:
    """Where and how a timing (throughput or speedup) ran: two timings of one run compare only when
    all of :data:`TP_FIELDS` agree (the compile mode, CUDA graphs, the attention kernel and the real
    images timed included; of the images, their name, split, count and seed)."""
    kf = rec.get("key_fields", {})
    out = [kf.get(k) for k in TP_FIELDS]
    images = kf.get("input")
    if isinstance(images, dict):
        out[TP_FIELDS.index("input")] = tuple(images.get(k) for k in ("data", "split", "images", "data_seed"))
    return tuple(out)


def tp_setting_text(setting: tuple) -> str:
    """:func:`tp_setting` in words: ``device cpu, ..., batch_size 2`` (fields not set left out)."""
    def text(k, v):
        if k == "input":
            return "timed on {} {}, {} images, seed {}".format(*v)
        return f"{k} {v}"

    return ", ".join(text(k, v) for k, v in zip(TP_FIELDS, setting) if v is not None)


def tp_mode_text(setting: Optional[tuple]) -> str:
    """What in a timing setting differs from eager, timm's fused attention, on a synthetic batch:
    ``", compiled (default), explicit attention"``, or "" for none of it."""
    if not setting:
        return ""
    f = dict(zip(TP_FIELDS, setting))
    parts = [f"compiled ({f['compile']})" if f.get("compile") else None,
             "CUDA graphs" if f.get("cuda_graphs") else None,
             f"{f['attention']} attention" if f.get("attention") else None,
             "on {} {} images".format(*f["input"][:2]) if f.get("input") else None]
    return "".join(", " + p for p in parts if p)


def acc_setting(rec: dict) -> tuple:
    """The data subset, device and precision of an accuracy or segmentation record (and the data's
    fingerprint, last: two subsets of the same name on other files are other images)."""
    kf = rec.get("key_fields", {})
    return tuple(kf.get(k) for k in ("data", "split", "limit", "data_seed", "device", "precision", "data_id"))


def tp_place(rec: dict) -> tuple:
    """:func:`tp_setting` without the images timed: where and how, whatever the input (a method whose
    token count depends on the image is timed on real images, the others on the synthetic batch)."""
    return tuple(None if k == "input" else v for k, v in zip(TP_FIELDS, tp_setting(rec)))


def on_images(rec: dict) -> bool:
    """Whether a FLOPs count or a timing was made on real images (``--data``) rather than the synthetic
    input (an accuracy record always is; a segmentation record's FLOPs are, for a method whose token
    count depends on the image, when its key names ``flops_images``)."""
    kf = rec.get("key_fields", {})
    if rec.get("kind") == DENSE_KIND:
        return bool(kf.get("flops_images"))
    return bool(kf.get("input") or kf.get("data"))


# Each kind with the setting two of its records must share to be compared across a table, and how a
# report says it chose one: (kinds, setting, what several settings are called, the setting in words).
# The input is not among them: it is chosen run by run (a run's records on real images first).
SETTINGS = ((TIMED_KINDS, tp_place, "timing records of several settings", tp_setting_text),
            (("accuracy",), acc_setting, "accuracy records of several data subsets", str),
            (("segmentation",), acc_setting, "segmentation records of several data subsets", str))


def learned_status(spec: dict) -> str:
    """What the record's learned parts are: none, untrained, trained, or fine-tuned (a checkpoint)."""
    status = spec.get("learned_parts") or "none"
    if status == "trained" and spec.get("checkpoint"):
        return "fine-tuned"
    if status == "none" and spec.get("checkpoint") and spec.get("method") not in (None, DENSE_METHOD):
        return "fine-tuned"  # a training-free method on weights trained with it (tokenbench train)
    return status


def method_declaration(name: str) -> Optional[type[Method]]:
    """The method's class from the registry, or None for a method not installed here."""
    try:
        from ..registry import get_method

        return get_method(name)
    except UserError:
        return None


def method_info(name: str) -> tuple[bool, Optional[str]]:
    """(deterministic, seed parameter) from the method's declaration (unknown methods: deterministic)."""
    cls = method_declaration(name)
    if cls is None:
        return True, None
    return cls.deterministic, (cls.seed_param if not cls.deterministic else None)


def method_family(name: str) -> Optional[str]:
    cls = method_declaration(name)
    return cls.family if cls is not None else None


# --------------------------------------------------------------------------- a row from records

# A dense task's FLOPs are counted on one synthetic image; a method whose token count depends on the
# image spends another amount on each evaluated image, so its FLOPs column is that one image's.
DENSE_PER_IMAGE_FLOPS = ("FLOPs of one synthetic image: this method's token count depends on the image, and "
                         "a dense task's FLOPs (and its matched-FLOPs search) are not counted on the evaluated "
                         "images")


def row_from_records(label: str, spec: dict, recs: dict[str, Optional[dict]], planned: list[str],
                     targets: list, seed_param: Optional[str], tolerance: float, line_of: Optional[str] = None,
                     untimed: bool = False, per_image: bool = False) -> Row:
    """One run's row: ``recs`` maps a record kind to its record (None: planned, not measured).
    ``line_of``: the run is a dense model of another size, compared with that model's dense run.
    ``untimed``: the sweep left its timings out on this CPU (flag ``untimed``).  ``per_image``: the
    method's token count depends on the image (the plan says so)."""
    f, t, a, sp = recs.get("flops"), recs.get("throughput"), recs.get("accuracy"), recs.get("speedup")
    params = dict(spec.get("params") or {})
    plain_dense = spec["method"] == DENSE_METHOD and not line_of and not spec.get("checkpoint")
    row = Row(model=spec["model"], label="dense" if plain_dense else label,
              line_of=line_of,
              method=spec["method"], params=params, row_type="seed" if seed_param else "run",
              family=method_family(spec["method"]), seed_param=seed_param,
              seed=params.get(seed_param) if seed_param else None, targets=list(targets),
              checkpoint=spec.get("checkpoint"), tolerance=tolerance)
    flags = row.flags
    stale = []
    for kind, rec in recs.items():
        if rec is not None:
            stale += [f"{kind}: {why}" for why in stale_reasons(rec)]
            row.keys[kind] = rec["key"]
            row.learned = row.learned or learned_status(rec.get("spec", {}))
            row.warnings += list(rec.get("metrics", {}).get("warnings") or [])
    if any(recs.get(k) is None for k in planned):
        flags.add("incomplete")
    if untimed:
        flags.add("untimed")
    if f is not None:
        row.gflops = f["metrics"].get("gflops")
        if f["metrics"].get("schedule_mismatch"):
            flags.add("schedule-mismatch")
        row.params_m = f["metrics"].get("params_m")
    if t is not None:
        m, kf = t["metrics"], t.get("key_fields", {})
        row.img_per_s, row.img_per_s_q1, row.img_per_s_q3 = m.get("img_per_s"), m.get("img_per_s_q1"), m.get(
            "img_per_s_q3")
        row.latency_ms_p50 = m.get("latency_ms_p50")
        row.device, row.device_name, row.threads = kf.get("device"), kf.get("device_name"), kf.get("threads")
        row.batch_size, row.precision = kf.get("batch_size"), kf.get("precision")
        row.tp_setting = tp_setting(t)
        if m.get("spread_flag"):
            flags.add("noisy")
        if t.get("env", {}).get("busy"):
            flags.add("busy")
    if sp is not None:
        m = sp["metrics"]
        row.speedup, row.speedup_q1, row.speedup_q3 = m.get("speedup"), m.get("speedup_q1"), m.get("speedup_q3")
        if m.get("spread_flag"):
            flags.add("noisy")
        if sp.get("env", {}).get("busy"):
            flags.add("busy")
    if stale:
        flags.add("stale")
        row.stale = "; ".join(dict.fromkeys(stale))
    if recs.get(DENSE_KIND) is not None:
        _dense_cells(row, recs[DENSE_KIND], t is None)
        if per_image and not recs[DENSE_KIND]["metrics"].get("flops_images"):
            row.warnings.append(DENSE_PER_IMAGE_FLOPS)
    if a is not None:
        m, kf = a["metrics"], a.get("key_fields", {})
        row.top1_lo, row.top1_hi = (m.get("top1_ci95") or [None, None])[:2]
        row.top1, row.top5, row.n, row.correct = m.get("top1"), m.get("top5"), m.get("n"), m.get("correct")
        row.acc_setting = acc_setting(a)
        if t is None:  # the throughput record's device and precision come first
            row.device, row.precision = kf.get("device"), kf.get("precision")
    for w in row.warnings:
        if "busy" in w:
            flags.add("busy")
        elif "spread" in w:
            flags.add("noisy")
        else:
            flags.add("warning")
    return row


def _dense_cells(row: Row, rec: dict, device_from_it: bool) -> None:
    """A dense record's mIoU (and interval), pixel accuracy, per-image IoU and FLOPs, in ``row``."""
    m, kf = rec["metrics"], rec.get("key_fields", {})
    row.task = DENSE_KIND
    row.miou, row.pixel_accuracy, row.n = m.get("miou"), m.get("pixel_accuracy"), m.get("n")
    row.miou_lo, row.miou_hi = (m.get("miou_ci95") or [None, None])[:2]
    row.per_image_iou = m.get("per_image_iou")
    row.gflops, row.params_m = m.get("gflops"), m.get("params_m")
    row.gflops_backbone, row.gflops_decoder = m.get("gflops_backbone"), m.get("gflops_decoder")
    row.acc_setting = acc_setting(rec)
    if device_from_it:  # the throughput record's device and precision come first
        row.device, row.precision = kf.get("device"), kf.get("precision")


def setting_key(row: Row) -> str:
    """What a row's seeds share: model, label, parameters without the seed, targets, checkpoint."""
    return json.dumps([row.model, row.label, row.setting_params, row.targets, row.checkpoint], sort_keys=True)
