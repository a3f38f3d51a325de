"""Statistics over report rows: against the dense model, over seeds, and paired tests between settings."""

from __future__ import annotations

import json
import math
import statistics
from typing import Optional

from ..errors import UserError
from .render import params_text as _params_text
from .rows import Row, setting_key


def params_text(r: Row) -> str:
    """A row's parameters, and its number of seeds when it is a mean over seeds."""
    return _params_text(r.params, len(r.seeds) if r.row_type == "mean" else None)


def _misses_target(r: Row) -> bool:
    return min(abs(r.flops_rel - t) for t in r.targets) > r.tolerance + 1e-12


def compare_with_dense(rows: list[Row]) -> None:
    """FLOPs relative to dense, speedup, McNemar against dense, the FLOPs-miss flag (in place)."""
    from ..measure.stats import mcnemar

    # the dense model itself: not a dense model of another size, nor one fine-tuned from a checkpoint
    # (a control entry, compared against it like any run) unless that is the only dense run there is
    dense_rows = [r for r in rows if r.is_dense and not r.line_of]
    dense_rows = [r for r in dense_rows if not r.checkpoint] + [r for r in dense_rows if r.checkpoint]
    for r in rows:
        d = next((x for x in dense_rows if x.model == (r.line_of or r.model)), None)
        if d is None:
            continue
        if r.gflops is not None and d.gflops:
            r.flops_rel = r.gflops / d.gflops
            if r.targets and _misses_target(r):
                r.flags.add("flops-miss")
        if r is d and r.img_per_s:
            r.speedup = 1.0  # speedups are the paired (interleaved) timings of the speedup records
        if r is not d and _unpaired_disagrees(r, d):
            r.flags.add("unpaired")
        if r is not d and r.correct and d.correct and r.acc_setting == d.acc_setting \
                and len(r.correct) == len(d.correct):
            res = mcnemar([c == "1" for c in d.correct], [c == "1" for c in r.correct])
            r.mcnemar_p, r.only_dense, r.only_run = res["p_value"], res["only_a"], res["only_b"]
        if r is not d and r.per_image_iou and d.per_image_iou and r.acc_setting == d.acc_setting \
                and len(r.per_image_iou) == len(d.per_image_iou):
            _paired_iou(r, d)


def _paired_iou(r: Row, d: Row) -> None:
    """The paired test of a dense run against the dense model on the same images' IoU (in place)."""
    from ..measure.dense import paired_iou_test

    res = paired_iou_test(r.per_image_iou, d.per_image_iou)
    r.iou_diff, r.iou_p = 100.0 * res["mean_diff"], res["p_value"]
    r.iou_diff_lo, r.iou_diff_hi = (100.0 * v for v in res["diff_ci95"])


# How far the ratio of two separately timed img/s may fall outside the paired speedup's quartiles
# before the row says so: beyond it, the machine's speed drifted between the two timings.
UNPAIRED_TOLERANCE = 0.10


def _unpaired_disagrees(r: Row, d: Row) -> bool:
    """Whether ``r``'s img/s over the dense row's (each timed on its own) contradicts the paired
    speedup: outside its quartiles widened by :data:`UNPAIRED_TOLERANCE`."""
    if not (r.img_per_s and d.img_per_s and r.speedup and r.speedup_q1 and r.speedup_q3):
        return False
    ratio = r.img_per_s / d.img_per_s
    return not r.speedup_q1 / (1 + UNPAIRED_TOLERANCE) <= ratio <= r.speedup_q3 * (1 + UNPAIRED_TOLERANCE)


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.stdev(xs) if len(xs) > 1 else None


MEAN_COLUMNS = ("gflops", "flops_rel", "img_per_s", "img_per_s_q1", "img_per_s_q3", "speedup", "speedup_q1",
                "speedup_q3", "latency_ms_p50", "top1", "top1_lo", "top1_hi", "top5", "params_m", "miou",
                "miou_lo", "miou_hi", "pixel_accuracy", "gflops_backbone", "gflops_decoder", "iou_diff",
                "iou_diff_lo", "iou_diff_hi")


def _mean_row(g: list[Row]) -> Row:
    first = g[0]
    m = first.replace(row_type="mean", seed=None, n_seeds=len(g), params=first.setting_params,
                      seeds=[r.seed for r in g], flags=set().union(*(r.flags for r in g)),
                      stale="; ".join(dict.fromkeys(r.stale for r in g if r.stale)) or None,
                      warnings=sorted({w for r in g for w in r.warnings}), members=g, keys=dict(first.keys))
    for col in MEAN_COLUMNS:
        setattr(m, col, _mean(getattr(r, col) for r in g))
    m.top1_std = _std([r.top1 for r in g if r.top1 is not None])
    m.top5_std = _std([r.top5 for r in g if r.top5 is not None])
    m.img_per_s_std = _std([r.img_per_s for r in g if r.img_per_s is not None])
    m.miou_std = _std([r.miou for r in g if r.miou is not None])
    iou_ps = [r.iou_p for r in g if r.iou_p is not None]
    m.iou_p = max(iou_ps) if iou_ps else None
    tested = [r for r in g if r.mcnemar_p is not None]
    worst = max(tested, key=lambda r: r.mcnemar_p) if tested else None  # the most conservative of the seeds
    m.mcnemar_p = worst.mcnemar_p if worst else None
    # the counts beside the p are that seed's, so that the two agree (mean counts would give another p)
    m.only_dense, m.only_run = (worst.only_dense, worst.only_run) if worst else (None, None)
    if m.flops_rel is not None and m.targets and "flops-miss" not in m.flags and _misses_target(m):
        m.flags.add("flops-miss")
    return m


def aggregate_seeds(rows: list[Row]) -> list[Row]:
    """Display rows: each group of seeds becomes one mean row (per-seed rows stay for the CSV)."""
    out: list[Row] = []
    groups: dict[str, list[Row]] = {}
    order: list[tuple[str, object]] = []
    for r in rows:
        if not r.seed_param:
            order.append(("row", r))
            continue
        gk = setting_key(r)
        if gk not in groups:
            groups[gk] = []
            order.append(("group", gk))
        groups[gk].append(r)
    for kind, item in order:
        if kind == "row":
            out.append(item)
        elif len(groups[item]) == 1:
            out.append(groups[item][0].replace(row_type="run"))
        else:
            out.append(_mean_row(groups[item]))
    return out


def closing_notes(rows: list[Row]) -> list[str]:
    """What a reader must know before trusting the table: stale rows, a missing dense FLOPs count
    (then :func:`timing_notes`, kept apart for readers that use no timing)."""
    out = []
    stale = [r for r in rows if "stale" in r.flags]
    if stale:
        why = sorted({w for r in stale for w in (r.stale or "").split("; ") if w})
        out.append(f"{len(stale)} of {len(rows)} runs are stale (marked `stale`): {'; '.join(why[:3])}"
                   f"{' ...' if len(why) > 3 else ''}; rerun `tokenbench run` to measure them with this code")
    no_dense = sorted({r.model for r in rows if r.gflops is not None and r.flops_rel is None})
    if no_dense:
        out.append(f"no FLOPs count of the dense model of {', '.join(no_dense)} here: the FLOPs column gives GFLOPs "
                   "(G) there, not % of dense; measure the dense model into this folder (a sweep with dense = true, "
                   "`tokenbench flops MODEL --results DIR`, or for a dense task `tokenbench eval MODEL --data DATA "
                   "--results DIR`)")
    return out + timing_notes(rows)


def timing_notes(rows: list[Row]) -> list[str]:
    """Unreliable timings: flagged busy or noisy, img/s that disagree with the paired speedup."""
    out = []
    timed = [r for r in rows if r.keys.get("throughput") or r.keys.get("speedup")]
    flagged = [r for r in timed if r.flags & {"busy", "noisy"}]
    if flagged:
        out.append(f"{len(flagged)} of {len(timed)} throughput runs flagged busy or noisy: their speedups are "
                   "unreliable (`tokenbench run ... --retime-flagged` times them again)")
    untimed = [r for r in rows if "untimed" in r.flags]
    if untimed:
        out.append(f"{len(untimed)} settings were not timed on this CPU (marked `untimed`; {len(timed)} were): no "
                   "speed is shown for them, none taken from another CPU, and the speed plot leaves them out; "
                   "`tokenbench run ... --all-timings` times them")
    unpaired = [r for r in rows if "unpaired" in r.flags]
    if unpaired:
        out.append(f"{len(unpaired)} of {len(timed)} runs' img/s over the dense model's disagree with their paired "
                   "speedup (marked `unpaired`): the img/s were timed apart while the machine's speed drifted; "
                   "the Speedup column, timed interleaved, is the one to compare")
    return out


# --------------------------------------------------------------------------- paired comparisons

def parse_selector(text: str) -> tuple[str, dict]:
    """``METHOD`` or ``METHOD:KEY=VALUE,KEY=VALUE`` (values read as in ``--set``)."""
    from ..registry import parse_set

    method, _, rest = text.partition(":")
    method = method.strip()
    if not method:
        raise UserError(f"selector {text!r} names no method (write METHOD or METHOD:KEY=VALUE,...)")
    items, depth, cur = [], 0, ""
    for ch in rest:  # commas inside [...] belong to a list value
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items = [x for x in items + [cur] if x.strip()]
    bad = [x for x in items if "=" not in x]
    if bad:
        raise UserError(f"selector {text!r}: {bad[0]!r} is not KEY=VALUE (write METHOD or METHOD:KEY=VALUE,...)")
    return method, parse_set(items)


# selection reads rows by name, so that it takes a Row or a row written as a dict alike

def params_match(have: dict, want: dict) -> bool:
    """Every parameter a selector gives equals the setting's (numbers within float rounding)."""
    for k, v in want.items():
        got = have.get(k)
        if isinstance(v, (int, float)) and isinstance(got, (int, float)) and not isinstance(v, bool):
            if not math.isclose(float(got), float(v), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif got != v:
            return False
    return True


def _matches(row: Row, method: str, params: dict, by_label: bool = False) -> bool:
    if (row.label if by_label else row.method) != method:
        return False
    return params_match(row.params, params)


def one_model(rows: list[Row], model: Optional[str], where) -> list[Row]:
    """The rows of one model: ``model``, or the only one ``rows`` hold (a dense model of another
    size, drawn as a line beside a model, stays with it).  Several models and none named: one line."""
    check_model_choice(sorted({r.model for r in rows if not r.line_of}), model, where)
    return rows if model is None else [r for r in rows if r.model == model or r.line_of == model]


def check_model_choice(models: list[str], model: Optional[str], where) -> None:
    """Refuse, in one line, a comparison over several ``models`` with none named, or a named one absent."""
    if model is None and len(models) > 1:
        raise UserError(f"{where} holds {len(models)} models ({', '.join(models)}): a comparison reads one; "
                        "name it with --model")
    if model is not None and model not in models:
        raise UserError(f"no model {model!r} in {where}; models here: {', '.join(models) or 'none'}")


def select_rows(rows: list[Row], text: str) -> list[Row]:
    """The rows ``text`` picks: one setting (its seeds, if the method is seeded)."""
    method, params = parse_selector(text)
    # a sweep entry's label (e.g. [methods.topk-finetuned]) names it; otherwise the method does
    by_label = any(r.label == method and r.method != method for r in rows)
    got = [r for r in rows if _matches(r, method, params, by_label)]
    if not got:
        same = sorted({params_text(r) for r in rows if r.method == method})
        known = sorted({r.method for r in rows})
        hint = (f"; its settings here: {'; '.join(same)}" if same else f"; methods here: {', '.join(known)}")
        raise UserError(f"no accuracy record matches {text!r}{hint}")

    def settings_of(rs):
        return {json.dumps([r.label, r.checkpoint, r.setting_params], sort_keys=True) for r in rs}

    settings = settings_of(got)
    own = [r for r in got if r.label == method]
    if len(settings) > 1 and own and len(settings_of(own)) == 1:
        return own  # `topk` is the [methods.topk] entry, not also [methods.topk-finetuned]
    if len(settings) > 1:
        shown = sorted({f"{r.label or r.method}: {params_text(r)}" for r in got})
        raise UserError(f"{text!r} matches {len(settings)} settings ({'; '.join(shown)}); "
                        "add KEY=VALUE, or name the sweep entry's label, to pick one")
    return got
