"""``tokenbench analyze DIR``: the analyses of a sweep's settings, as tables and figures.

Reads the sweep's records and plan through :func:`tokenbench.report.collect` (so it keys on
what the records contain, whatever their keys are), re-runs only what needs a model
(:mod:`tokenbench.analysis_trace`, cached under ``DIR/analysis/cache/``), computes with
:mod:`tokenbench.analysis` and draws with :mod:`tokenbench.analysis_plots`.  Writes, under
``DIR/analysis/``:

- ``patterns``: IoU of the surviving patches of every pair of methods at matched FLOPs, per stage;
- ``errors_kappa``: Cohen's kappa on correctness for every pair of settings on the same images;
- ``per_class``: per-class top-1 change against dense;
- ``drift``: linear CKA and cosine similarity of the final features against dense;
- ``budget`` and ``budget_per_class``: tokens and FLOPs per image, their spread and relation to
  correctness;
- ``spatial``: keep maps against a centre prior;
- ``index.md``: what was analysed, on which images, and the checks made.

Each table as ``.md``, ``.csv`` and ``.tex``; each figure as ``.png`` and ``.pdf`` in ``plots/``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from . import analysis as an
from .errors import UserError
from .sweep import DENSE_METHOD, fmt_value

ANALYSIS_DIR = "analysis"
# Images re-run by default: over 1000 images a keep frequency has a standard error of at most 0.016 (a mean
# IoU or a CKA less), and re-running a sweep's whole evaluated set (5000 images by default) costs five times as long.
DEFAULT_RERUN_IMAGES = 1000
FIGURE_STEMS = ("patterns_iou_", "errors_kappa_", "per_class_change", "drift", "budget_tokens", "keep_maps")


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


def _level_text(level: float) -> str:
    return f"{100 * level:.0f}%"


def gather_settings(out: Path, methods: Optional[Sequence[str]] = None,
                    flops: Optional[Sequence[float]] = None) -> tuple[list[Setting], dict, list[str]]:
    """The settings of ``out`` with an accuracy record on the dense model's images, narrowed to
    ``methods`` (labels or method names) and ``flops`` levels; dense always included.

    Returns (settings, data settings, notes).
    """
    from .report.collect import collect
    from .store import Store

    res = collect(out)
    notes = [n for n in res["notes"] if n not in res.get("timing_notes", ())]  # the analysis uses no timing
    plan = res.get("plan") or {}
    sweep = plan.get("sweep") or {}
    targets = [float(t) for t in sweep.get("flops_targets") or []]
    tolerance = float(sweep.get("flops_tolerance") or 0.03)
    store = Store(out)
    rows = [r for r in res["rows"] if r.get("_correct") and r.get("accuracy_key") and not r.get("line_of")]
    dense_rows = [r for r in rows if r["method"] == DENSE_METHOD]
    if not dense_rows:
        raise UserError(f"{out} has no accuracy record of the dense model (method none): every analysis "
                        "compares against it; run the sweep with dense = true")
    dense_row = dense_rows[0]
    same = [r for r in rows if r.get("_acc_setting") == dense_row.get("_acc_setting")
            and len(r["_correct"]) == len(dense_row["_correct"])]
    if len(same) < len(rows):
        notes.append(f"{len(rows) - len(same)} accuracy records measured on other images than the dense "
                     "model's were left out")
    settings: list[Setting] = []
    for r in same:
        rec = store.get(r["accuracy_key"])
        if rec is None:
            continue
        m = rec.get("metrics", {})
        preds = m.get("predictions")
        # what determines a re-run: the FLOPs and accuracy records (not throughput: a re-timing changes nothing)
        keys = {k[:-4]: r[k] for k in ("flops_key", "accuracy_key") if r.get(k)}
        s = Setting(label=r["label"], method=r["method"], params=dict(r["_params"]), seed_param=r.get("_seed_param"),
                    seed_index=0, level=None, flops_rel=r.get("flops_rel"), gflops=r.get("gflops"),
                    top1=float(r["top1"]), correct=np.frombuffer(r["_correct"].encode(), dtype=np.uint8) == ord("1"),
                    predictions=np.asarray(preds, dtype=np.int64) if preds is not None else None, keys=keys,
                    spec=dict(rec.get("spec") or {}), learned=r.get("learned"))
        if not s.is_dense:
            s.level = an.flops_level(r.get("_targets") or [], s.flops_rel, targets, tolerance)
        settings.append(s)
    _number_seeds(settings)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(s.label for s in settings))}
    settings.sort(key=lambda s: (not s.is_dense, order[s.label], s.level or 0.0, s.seed_index))
    settings = _narrow(settings, methods, flops)
    data = _data_settings(store.get(dense_row["accuracy_key"]), sweep)
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
            from .errors import did_you_mean

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


# --------------------------------------------------------------------------- tables

@dataclass
class Table:
    name: str
    title: str
    columns: list[tuple[str, str]]          # (key, header)
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    md_rows: Optional[list[dict]] = None    # a shorter selection for md / tex (the CSV has all rows)
    formats: dict = field(default_factory=dict)   # column -> format of its floats in md / tex (default .3f)

    def cell(self, v: Any, key: str = "") -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            text = format(v, self.formats.get(key, ".3f"))
            return text[1:] if text.startswith("-") and float(text) == 0 else text   # no "-0.00"
        return str(v)

    def markdown(self) -> str:
        rows = self.rows if self.md_rows is None else self.md_rows
        lines = [f"# {self.title}", ""]
        lines.append("| " + " | ".join(h for _, h in self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for r in rows:
            lines.append("| " + " | ".join(self.cell(r.get(k), k).replace("|", "\\|") for k, _ in self.columns) + " |")
        lines.append("")
        lines += [n + "\n" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([k for k, _ in self.columns])
        for r in self.rows:
            vals = []
            for k, _ in self.columns:
                v = r.get(k)
                vals.append("" if v is None else (repr(v) if isinstance(v, float) else v))
            w.writerow(vals)
        return buf.getvalue()

    def latex(self) -> str:
        from .report.render import tex_escape

        rows = self.rows if self.md_rows is None else self.md_rows
        numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) and rows
                   for k, _ in self.columns]
        lines = [f"% {self.title}: generated by `tokenbench analyze` (needs \\usepackage{{booktabs}})",
                 "\\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}", "\\toprule",
                 " & ".join(tex_escape(h) for _, h in self.columns) + " \\\\", "\\midrule"]
        for r in rows:
            lines.append(" & ".join(tex_escape(self.cell(r.get(k), k)) for k, _ in self.columns) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        from .store import atomic_write_text

        paths = []
        for ext, fn in (("md", self.markdown), ("csv", self.csv), ("tex", self.latex)):
            p = out_dir / f"{self.name}.{ext}"
            atomic_write_text(p, fn())
            paths.append(p)
        return paths


# --------------------------------------------------------------------------- the analyses

def kappa_table(settings: list[Setting]) -> Table:
    """Every pair of settings on the same images: kappa and the images each gets wrong."""
    rows = []
    for a, b in itertools.combinations(settings, 2):
        ca, cb = a.correct, b.correct
        rows.append({"a": a.name, "b": b.name, "level_a": a.level_text, "level_b": b.level_text,
                     "kappa": an.cohen_kappa(ca, cb), "both_wrong": int((~ca & ~cb).sum()),
                     "only_a_wrong": int((~ca & cb).sum()), "only_b_wrong": int((ca & ~cb).sum()),
                     "n": int(len(ca)), "_matched": a.is_dense or b.is_dense or (a.level is not None and a.level == b.level)})
    t = Table("errors_kappa", "Error agreement: Cohen's kappa on per-image correctness",
              [("a", "A"), ("level_a", "FLOPs A"), ("b", "B"), ("level_b", "FLOPs B"), ("kappa", "kappa"),
               ("both_wrong", "both wrong"), ("only_a_wrong", "only A wrong"), ("only_b_wrong", "only B wrong"),
               ("n", "images")], rows)
    t.md_rows = [r for r in rows if r["_matched"]]
    t.notes = ["kappa: agreement of the two settings' correct/wrong labels beyond what their accuracies alone "
               "would give (1: wrong on exactly the same images; 0: no more overlap than chance). "
               "From the records' per-image correctness; nothing re-run.",
               "This table (md, tex): pairs at the same FLOPs level and pairs with dense; the CSV has every pair."]
    return t


def per_class_table(settings: list[Setting], labels: np.ndarray, class_names: Sequence[str]) -> tuple[Table, dict]:
    """Top-1 change against dense per class, seeds pooled (mean over seeds). Returns (table, matrix)."""
    k = len(class_names)
    dense = next(s for s in settings if s.is_dense)
    base = an.per_class_top1(dense.correct, labels, k)
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        if not s.is_dense:
            groups.setdefault(s.group, []).append(s)
    rows, matrix = [], {}
    dense_row = {"setting": "dense (top-1 %)", "level": "", "seeds": ""}
    dense_row.update({c: float(v) for c, v in zip(class_names, base)})
    rows.append(dense_row)
    for g, members in groups.items():
        accs = np.mean([an.per_class_top1(m.correct, labels, k) for m in members], axis=0)
        change = accs - base
        matrix[g] = change
        row = {"setting": g, "level": members[0].level_text, "seeds": len(members) if members[0].seed_param
               else ""}
        row.update({c: float(v) for c, v in zip(class_names, change)})
        rows.append(row)
    t = Table("per_class", "Per-class top-1 change against dense (points)",
              [("setting", "setting"), ("level", "FLOPs"), ("seeds", "seeds")] + [(c, c) for c in class_names], rows)
    t.formats = {c: ".2f" for c in class_names}
    t.notes = [f"First row: the dense model's top-1 per class ({int(len(labels))} images); then each setting's "
               "top-1 minus dense's, per class (seeded methods: the mean over seeds)."]
    return t, matrix


def pattern_table(traced: list[Setting], blocks: list[int]) -> tuple[Table, dict]:
    """IoU of surviving patches for every pair of methods at each FLOPs level and stage, beside
    its chance level; the heatmaps get the chance-corrected score (NaN where IoU says nothing)."""
    rows, mats = [], {}
    levels = sorted({s.level for s in traced if s.level is not None})
    for lv in levels:
        group = [s for s in traced if s.level == lv]
        names = [s.short.replace(" s0", "") for s in group]
        for blk in blocks:
            mat = np.eye(len(group))
            for (i, a), (j, b) in itertools.combinations(enumerate(group), 2):
                surv = an.pattern_agreement(a.trace[f"survive_{blk}"], b.trace[f"survive_{blk}"])
                own = an.pattern_agreement(a.trace[f"alone_{blk}"], b.trace[f"alone_{blk}"])
                mat[i, j] = mat[j, i] = surv["above_chance"]
                if not (surv["informative"] or own["informative"]):
                    continue  # every patch covered (or none): IoU is fixed by the set sizes
                rows.append({"level": _level_text(lv), "after_block": blk, "a": a.name, "b": b.name,
                             "iou": surv["iou"], "chance": surv["chance"], "above": surv["above_chance"],
                             "iou_alone": own["iou"], "chance_alone": own["chance"],
                             "above_alone": own["above_chance"],
                             "kept_a": float(a.trace[f"survive_{blk}"].mean()),
                             "kept_b": float(b.trace[f"survive_{blk}"].mean()),
                             "n": int(len(a.trace["pred"]))})
            for i in range(len(group)):  # a setting agreeing with no other beyond its set sizes: no row
                if len(group) > 1 and np.isnan(np.delete(mat[i], i)).all():
                    mat[i, i] = np.nan
            mats[(lv, blk)] = (names, mat)
    t = Table("patterns", "Reduction-pattern agreement at matched FLOPs: IoU of surviving patches and its chance level",
              [("level", "FLOPs"), ("after_block", "after block"), ("a", "A"), ("b", "B"), ("iou", "IoU"),
               ("chance", "chance"), ("above", "above chance"), ("iou_alone", "IoU (own tokens)"),
               ("chance_alone", "chance (own)"), ("above_alone", "above chance (own)"),
               ("kept_a", "surviving A"), ("kept_b", "surviving B"), ("n", "images")], rows)
    t.notes = ["IoU: per image, |A ∩ B| / |A ∪ B| of the original patches that survive up to the end of the block "
               "(a merged token counts for every patch it covers; EViT's fused token, the pool of what was "
               "dropped, for none), averaged over images. chance: the IoU two independent random choices of the "
               "same sizes reach on average (hypergeometric expectation, per image, averaged). above chance: "
               "(IoU - chance) / (1 - chance): 0 for random choices, 1 for identical sets. IoU (own tokens): the "
               "same for patches that are still their own token (pruning: the kept ones; merging: the ones not "
               "yet merged). –: the IoU is fixed by the set sizes (a merging method covers every patch), so it "
               "says nothing; a pair with nothing to compare has no row. surviving: the fraction of patches that "
               "survive. A seeded method: its first seed."]
    return t, mats


def drift_table(traced: list[Setting]) -> Table:
    dense = next(s for s in traced if s.is_dense)
    rows = []
    for s in traced:
        if s.is_dense:
            continue
        rows.append({"setting": s.name, "method": s.label, "level": s.level_text,
                     "flops_rel": s.flops_rel, "cka": an.linear_cka(s.trace["features"], dense.trace["features"]),
                     "cosine": an.mean_cosine(s.trace["features"], dense.trace["features"]), "top1": s.top1,
                     "n": int(len(s.trace["pred"]))})
    t = Table("drift", "Representation drift: final features against the dense model's",
              [("setting", "setting"), ("level", "FLOPs"), ("flops_rel", "FLOPs ratio"), ("cka", "linear CKA"),
               ("cosine", "cosine"), ("top1", "top-1 %"), ("n", "images")], rows)
    t.formats = {"cka": ".4f", "cosine": ".4f", "top1": ".2f"}
    t.notes = ["Features: the class token (or pooled) features before the classifier (timm's forward_features, "
               "then forward_head(pre_logits=True)), of the same images. Linear CKA over the images; cosine: "
               "per image, averaged. A seeded method: its first seed. top-1: the record's, on all its images."]
    return t


def budget_tables(traced: list[Setting], labels: np.ndarray, class_names: Sequence[str], arch
                  ) -> tuple[Table, Table, dict]:
    """Tokens and FLOPs per image per setting; per class; relation to correctness.

    ``arch``: a model of the architecture (its block widths give the analytic cost per token).
    """
    from .analysis_trace import per_image_gflops

    rows, class_rows, dists = [], [], {}
    k = len(class_names)
    for s in traced:
        tr = s.trace
        n = len(tr["pred"])
        tokens = tr["tokens"].mean(1)
        gflops = per_image_gflops(arch, tr["tokens"], tr["tokens_mlp"], s.gflops or 0.0) if s.gflops \
            else np.full(n, np.nan)
        correct = tr["pred"] == labels[:n]
        b = an.budget_summary(tokens, gflops, labels[:n], correct, k)
        dists[s.name] = (tokens, gflops, s.level)
        rows.append({"setting": s.name, "level": s.level_text, "tokens_mean": b["tokens_mean"],
                     "tokens_std": b["tokens_std"], "tokens_min": b["tokens_min"], "tokens_max": b["tokens_max"],
                     "gflops_mean": b["gflops_mean"], "gflops_std": b["gflops_std"],
                     "count": "constant" if b["constant"] else "varies",
                     "tokens_correct": b["tokens_correct"], "tokens_wrong": b["tokens_wrong"],
                     "corr": b["corr_tokens_correct"], "n": n})
        for what, per in (("tokens", b["tokens_per_class"]), ("MFLOPs", b["gflops_per_class"])):
            cr = {"setting": s.name, "level": s.level_text, "quantity": what}
            cr.update({c: float(v) * (1000 if what == "MFLOPs" else 1) for c, v in zip(class_names, per)})
            class_rows.append(cr)
    t = Table("budget", "Budget spending: tokens and FLOPs per image",
              [("setting", "setting"), ("level", "FLOPs"), ("count", "token count"), ("tokens_mean", "tokens"),
               ("tokens_std", "std"), ("tokens_min", "min"), ("tokens_max", "max"), ("gflops_mean", "GFLOPs"),
               ("gflops_std", "GFLOPs std"), ("tokens_correct", "tokens, correct"),
               ("tokens_wrong", "tokens, wrong"), ("corr", "corr. with correct"), ("n", "images")], rows)
    t.formats = {"tokens_mean": ".2f", "tokens_std": ".2f", "tokens_min": ".2f", "tokens_max": ".2f",
                 "gflops_mean": ".4f", "gflops_std": ".4f", "tokens_correct": ".2f", "tokens_wrong": ".2f"}
    t.notes = ["tokens: the mean sequence length entering a block (prefix tokens included), per image, from the "
               "surgery's per-block counts. GFLOPs per image: the record's fvcore count, shifted by the analytic "
               "cost of the image's counts minus the mean counts (so equal to the record wherever counts are "
               "constant). corr.: point-biserial correlation of tokens with correctness (undefined, –, when the "
               "count is constant). 'constant': every image gets the same token count at every block; "
               "a method whose count varies per image (such as ATS) shows its spread here."]
    tc = Table("budget_per_class", "Budget spending per class: mean tokens and FLOPs per image",
               [("setting", "setting"), ("level", "FLOPs"), ("quantity", "per image")] + [(c, c) for c in class_names],
               class_rows)
    tc.formats = {c: ".2f" for c in class_names}
    tc.notes = ["Mean over each class's images of the mean sequence length entering a block (tokens) and of the "
                "FLOPs per image (MFLOPs, as in the budget table)."]
    return t, tc, dists


def spatial_table(traced: list[Setting], grid: tuple[int, int], blocks: list[int]) -> tuple[Table, dict]:
    last = blocks[-1]
    prior = an.centre_prior(grid)
    rows, maps = [], {}
    for s in traced:
        if s.is_dense:
            continue
        n = len(s.trace["pred"])
        own = an.keep_map(s.trace[f"alone_{last}"], grid)
        surv = an.keep_map(s.trace[f"survive_{last}"], grid)
        z = an.flatness_z(own, n)
        maps[s.name] = (s.label, s.level, own)
        rows.append({"setting": s.name, "level": s.level_text, "kept": float(own.mean()),
                     "centre_corr": an.pearson(own, prior), "centre_corr_surviving": an.pearson(surv, prior),
                     "surviving": float(surv.mean()), "flat_z": z, "flat": bool(z < 4.0), "n": n})
    t = Table("spatial", "Where tokens go: keep maps against a centre prior",
              [("setting", "setting"), ("level", "FLOPs"), ("kept", "own-token fraction"),
               ("centre_corr", "corr. with centre"), ("surviving", "surviving fraction"),
               ("centre_corr_surviving", "corr. with centre (surviving)"), ("flat_z", "max |z| vs flat"),
               ("flat", "flat?"), ("n", "images")], rows)
    t.formats = {"flat_z": ".1f"}
    t.notes = [f"Keep map: per patch position, the fraction of images in which that patch is still its own token "
               f"after the last block (pruning: kept; merging: not merged). surviving: the same with merged "
               f"tokens counting for the patches they cover. Centre prior: a Gaussian on the {grid[0]}x{grid[1]} "
               "patch grid, sigma a quarter of its side; corr.: Pearson over positions (– for a constant map). "
               "max |z| vs flat: the largest deviation of a position from the map's mean in binomial standard "
               "errors; flat? when below 4 (sampling error alone). A seeded method: its first seed."]
    return t, maps


# --------------------------------------------------------------------------- the command

def analyze(out: str | Path, methods: Optional[Sequence[str]] = None, flops: Optional[Sequence[float]] = None,
            limit: Optional[int] = DEFAULT_RERUN_IMAGES, plots: bool = True, progress: Optional[Any] = None,
            dest: Optional[str | Path] = None) -> dict:
    """Write every analysis of the sweep in ``out`` under ``out/analysis`` (or ``dest``); returns a summary.

    A committed reference sweep (under ``results/``) is analysed into ``runs/analysis/<name>``
    unless ``dest`` says otherwise (:func:`tokenbench.outputs.analysis_dirs`).  The figures
    already in the destination's ``plots/`` are replaced, so that it holds this run's alone; the
    cache of re-runs lives beside the default destination, never in a reference folder.

    ``limit``: models are re-run on the first ``limit`` evaluated images (0 or None: all of them);
    the error tables always use every recorded image.  ``progress``: a rich Progress to report on
    (None: silent).
    """
    from . import analysis_plots as ap
    from .analysis_trace import (cache_key, comparison_blocks, dataset_labels, evaluated_dataset, load_cached,
                                 save_cached, trace_setting)
    from .api import load
    from .outputs import analysis_dirs

    t0 = time.time()
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"results directory {out} does not exist")
    if limit is not None and limit != 0 and limit < 2:
        raise UserError(f"--limit must be at least 2 (CKA needs two images), or 0 for every image; got {limit}")
    settings, data, notes = gather_settings(out, methods, flops)
    if not data.get("name"):
        raise UserError(f"the accuracy records in {out} do not say which data they measured")
    adir, cache_dir = analysis_dirs(out, dest)
    try:
        adir.mkdir(parents=True, exist_ok=True)
        probe = adir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {adir}: {e.strerror or e}") from None
    files: list[Path] = []

    # Error agreement: the records alone.
    files += kappa_table(settings).write(adir)

    # The images and their labels, through the dense model's preprocessing.
    dense = next(s for s in settings if s.is_dense)
    nets: dict[str, Any] = {}

    def net_for(s: Setting):
        key = s.keys.get("accuracy") or s.name
        if key not in nets:
            sp = s.spec
            nets[key], _ = load(sp.get("model", "default"), sp.get("method", s.method), sp.get("params", s.params),
                                pretrained=bool(sp.get("pretrained")), checkpoint=sp.get("checkpoint"),
                                img_size=sp.get("img_size"))
        return nets[key]

    dnet = net_for(dense)
    full_ds, dspec = evaluated_dataset(dnet, data)
    if data.get("indices_sha") and dspec.indices_sha and data["indices_sha"] != dspec.indices_sha:
        raise UserError(f"the data subset rebuilt here ({dspec.indices_sha}) is not the one the records measured "
                        f"({data['indices_sha']}): different dataset files?")
    if len(full_ds) != len(dense.correct):
        raise UserError(f"the records measured {len(dense.correct)} images, the data here gives {len(full_ds)}")
    labels = dataset_labels(full_ds)
    class_names = _class_names(full_ds, data["name"], int(labels.max()) + 1)
    per_class, class_mat = per_class_table(settings, labels, class_names)
    files += per_class.write(adir)

    # Re-runs (cached): the first seed of every setting.
    n_img = min(limit or len(full_ds), len(full_ds))
    ds = evaluated_dataset(dnet, data, n_img)[0]
    blocks = comparison_blocks(_depth(dnet))
    data_id = {k: data.get(k) for k in ("name", "split", "limit", "seed", "indices_sha")}
    traced = [s for s in settings if s.traced]
    todo = []
    for s in traced:
        key = cache_key(s.keys, data_id, n_img, data["batch_size"], blocks)
        got = load_cached(cache_dir, key)
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
        net = net_for(s)
        s.trace = trace_setting(net, ds, data["batch_size"], blocks,
                                on_batch=(lambda k: progress.advance(task, k)) if task is not None else None)
        save_cached(cache_dir, key, s.trace)
        if not s.is_dense:
            nets.pop(s.keys.get("accuracy") or s.name, None)  # one model in memory at a time
    checks = _check_predictions(traced, n_img, limited=n_img < len(full_ds))

    grid = _grid(dnet)
    pat, pat_mats = pattern_table(traced, blocks)
    files += pat.write(adir)
    drift = drift_table(traced)
    files += drift.write(adir)
    budget, budget_cls, dists = budget_tables(traced, labels, class_names, dnet)
    files += budget.write(adir) + budget_cls.write(adir)
    spatial, maps = spatial_table(traced, grid, blocks)
    files += spatial.write(adir)

    if plots:
        pdir = adir / "plots"
        for old in pdir.glob("*"):   # a narrower run leaves no figure of a wider one behind
            if old.suffix in (".png", ".pdf") and old.stem.startswith(FIGURE_STEMS) and old.is_file():
                old.unlink()
        drawings = [lambda: ap.pattern_heatmaps(pat_mats, blocks, pdir), lambda: ap.kappa_heatmaps(settings, pdir),
                    lambda: ap.per_class_heatmap(class_mat, class_names, pdir),
                    lambda: ap.drift_plot(drift.rows, pdir), lambda: ap.budget_plot(dists, pdir),
                    lambda: ap.keep_map_grid(maps, an.centre_prior(grid), pdir)]
        fig_task = progress.add_task("drawing figures", total=len(drawings)) if progress is not None else None
        for draw in drawings:
            files += draw()
            if fig_task is not None:
                progress.advance(fig_task)
    elapsed = time.time() - t0
    files.append(_write_index(adir, out, settings, data, n_img, len(full_ds), blocks, checks, notes))
    warnings_ = [c for c in checks if "differently" in c] + notes
    return {"out": str(adir), "settings": len(settings), "traced": len(traced), "re_run": len(todo),
            "n_images": n_img, "files": [str(f) for f in files], "notes": warnings_, "seconds": round(elapsed, 1)}


def _grid(net) -> tuple[int, int]:
    from .visual.trace import token_geometry

    return token_geometry(net).grid


def _depth(net) -> int:
    from .visual.trace import token_geometry

    return token_geometry(net).depth


def _class_names(ds, data: str, k: int) -> list[str]:
    from torch.utils.data import Subset

    base = ds
    while isinstance(base, Subset):
        base = base.dataset
    names = getattr(base, "classes", None)
    if data == "fashion-mnist":
        from .data import FMNIST_CLASSES

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
                 blocks: list[int], checks: list[str], notes: list[str]) -> Path:
    from .store import atomic_write_text

    traced = [s for s in settings if s.traced]
    lines = [f"# tokenbench analysis: {out.name}", "",
             f"Written by `tokenbench analyze {out}`. {len(settings)} settings from the records "
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
    lines += ["Model re-runs are cached in `cache/` (not results; ignored by git), keyed by the records' keys, "
              "the data subset, the image count and the batch size: a second run re-runs nothing, and re-keyed "
              "records are simply re-run."]
    p = adir / "index.md"
    atomic_write_text(p, "\n".join(lines) + "\n")
    return p
