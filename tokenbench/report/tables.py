"""The report's tables from its rows: results.md, results.csv, results.tex, results_paper.tex, the terminal summary."""

from __future__ import annotations

from pathlib import Path

from .render import (NONE, csv_table, fmt_value, interval_text, markdown_table, num, p_value_text, params_json, sig,
                     signed, speedup_text, tex_escape)
from .stats import UNPAIRED_TOLERANCE, params_text
from .rows import RECORD_KINDS, Row, method_declaration, tp_mode_text
from ..sweep import DEFAULT_TOLERANCE

FLAG_HELP = {
    "flops-miss": "FLOPs land more than the tolerance (1 point of the dense model's FLOPs by default) from the target",
    "noisy": "throughput or speedup interquartile range above 10% of the median, after the retries",
    "busy": "other processes took CPU time while this was timed, after the retries",
    "schedule-mismatch": "the method's declared token schedule (expected_tokens) is not what its forward keeps: "
                         "the matched-FLOPs search, which ranks values by it, misses its target",
    "stale": "measured by other code or under another protocol than this checkout's (rerun `tokenbench run`)",
    "warning": "the records carry warnings (listed below the table)",
    "incomplete": "some planned measurements are missing (interrupted sweep: rerun to complete)",
    "untimed": "not timed on this CPU: the sweep times a few settings by default (time_by_default) and "
               "`tokenbench run --all-timings` the others; no speed is shown (none from another CPU)",
    "unpaired": f"img/s over the dense model's img/s (each timed on its own) is more than {UNPAIRED_TOLERANCE:.0%} "
                "outside the paired speedup's quartiles: the machine's speed drifted between them; compare the "
                "Speedup column",
}
CSV_COLUMNS = [
    "row_type", "model", "label", "method", "family", "params", "seed", "n_seeds", "target", "gflops", "flops_rel",
    "img_per_s", "img_per_s_q1", "img_per_s_q3", "img_per_s_std", "speedup", "speedup_q1", "speedup_q3",
    "latency_ms_p50", "top1",
    "top1_std", "top1_lo", "top1_hi", "top5", "top5_std", "n", "params_m", "device", "device_name", "threads",
    "batch_size", "precision", "learned", "checkpoint", "mcnemar_p", "only_dense", "only_run", "flags",
    "warnings", "stale", "flops_key", "throughput_key", "speedup_key", "accuracy_key",
    "task", "miou", "miou_std", "miou_lo", "miou_hi", "pixel_accuracy", "gflops_backbone", "gflops_decoder",
    "iou_diff", "iou_diff_lo", "iou_diff_hi", "iou_p", "segmentation_key",
]
SUMMARY_COLUMNS = ("Method", "Setting", "FLOPs", "Speedup", "Top-1 % [95% CI]", "Flags")
# Flags that make a throughput (and so a speedup) unreliable: drawn hollow, marked in tables.
TIMING_FLAGS = ("noisy", "busy", "unreliable")


def timing_flagged(r: Row) -> bool:
    return bool(set(TIMING_FLAGS) & r.flags)


def display_rows(res: dict) -> list[Row]:
    """The rows a table shows (a seeded setting's mean, not its seeds)."""
    return res["display"]


def models_of(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.model for r in rows))


# --------------------------------------------------------------------------- cells

def _score_text(r: Row, value, std, lo, hi, pm: str) -> str:
    """A score (± std over seeds on a row of seed means) and its 95% interval."""
    out = num(value, ".2f")
    if r.row_type == "mean" and std is not None:
        out += f" {pm} {std:.2f}"
    return out + interval_text(lo, hi)


def top1_text(r: Row, pm: str = "±") -> str:
    """Top-1 (± std over seeds) and its 95% interval."""
    return _score_text(r, r.top1, r.top1_std, r.top1_lo, r.top1_hi, pm)


def flops_cell(r: Row) -> str:
    """FLOPs as % of dense; GFLOPs (``G``) where the dense model's count is missing (a damaged record)."""
    if r.flops_rel is not None:
        return f"{100 * r.flops_rel:.1f}%"
    if r.gflops is not None:
        return f"{sig(r.gflops)}G"
    return NONE


def flags_text(r: Row) -> str:
    return ",".join(sorted(r.flags))


def miou_text(r: Row, pm: str = "±") -> str:
    """mIoU (± std over seeds) and its 95% bootstrap interval."""
    return _score_text(r, r.miou, r.miou_std, r.miou_lo, r.miou_hi, pm)


def iou_test_text(r: Row) -> str:
    """The paired test against dense on per-image IoU: mean difference in points, its interval, p."""
    if r.iou_diff is None:
        return NONE
    return (f"{signed(r.iou_diff, '.2f')} [{signed(r.iou_diff_lo, '.2f')}, {signed(r.iou_diff_hi, '.2f')}], "
            f"p {p_value_text(r.iou_p)}")


def _dense_cells(r: Row, cells: dict[str, str]) -> dict[str, str]:
    """A dense run's cells: mIoU, pixel accuracy, backbone GFLOPs and the paired IoU test in place of
    top-1, top-5 and McNemar."""
    out = {}
    for k, v in cells.items():
        if k == "GFLOPs":
            out[k], out["GFLOPs backbone"] = v, sig(r.gflops_backbone)
        elif k == "Top-1 % [95% CI]":
            out["mIoU % [95% CI]"] = miou_text(r)
        elif k == "Top-5 %":
            out["Pixel acc. %"] = num(r.pixel_accuracy, ".2f")
        elif k == "McNemar p (b/c)":
            out["IoU vs dense (pts) [95% CI], Wilcoxon p"] = iou_test_text(r)
        else:
            out[k] = v
    return out


def display_cells(r: Row, tex: bool = False) -> dict[str, str]:
    if r.is_seg:
        return _dense_cells(r, _class_cells(r, tex))
    return _class_cells(r, tex)


def _class_cells(r: Row, tex: bool) -> dict[str, str]:
    pm = r"$\pm$" if tex else "±"
    top5 = num(r.top5, ".2f")
    if r.row_type == "mean" and r.top5_std is not None:
        top5 += f" {pm} {r.top5_std:.2f}"
    tp = NONE
    if r.img_per_s is not None:
        tp = f"{r.img_per_s:.0f} [{r.img_per_s_q1:.0f}, {r.img_per_s_q3:.0f}]"
    mc = NONE
    if r.mcnemar_p is not None:
        mc = f"{p_value_text(r.mcnemar_p)} ({num(r.only_dense, '.0f')}/{num(r.only_run, '.0f')})"
    dev = NONE
    if r.device:
        dev = r.device + (f" x{r.threads}" if r.threads else "")
    x = r"$\times$" if tex else "x"
    return {
        "Method": r.label,
        "Params": params_text(r),
        "Target": r.target or NONE,
        "Family": r.family or NONE,
        "GFLOPs": sig(r.gflops),
        "FLOPs": flops_cell(r),
        "img/s [q1, q3]": tp,
        "Speedup [q1, q3]": speedup_text(r.speedup, r.speedup_q1, r.speedup_q3, r.is_dense, x),
        "Top-1 % [95% CI]": top1_text(r, pm),
        "Top-5 %": top5,
        "Params (M)": num(r.params_m, ".2f"),
        "Device": dev,
        "Learned": r.learned or NONE,
        "McNemar p (b/c)": mc,
        "Flags": flags_text(r),
    }


# --------------------------------------------------------------------------- results.md

def markdown(res: dict) -> str:
    disp = display_rows(res)
    multi = len(models_of(disp)) > 1
    cells = [display_cells(r) for r in disp]
    cols = (["Model"] if multi else []) + list(cells[0].keys())
    lines = []
    plan = res.get("plan")
    title = (plan or {}).get("sweep", {}).get("name") or Path(res["out"]).name
    lines.append(f"# tokenbench results: {title}\n")
    desc = (plan or {}).get("sweep", {}).get("description")
    if desc:
        lines.append(desc + "\n")
    lines.append(setting_line(res) + "\n")
    lines += markdown_table(cols, (([r.model] if multi else []) + [c.get(k, NONE) for k in cells[0]]
                                   for r, c in zip(disp, cells)))
    lines.append("")
    lines += _legend(res)
    return "\n".join(lines) + "\n"


def setting_line(res: dict) -> str:
    """Where accuracy and throughput were measured, in one sentence."""
    disp = display_rows(res)
    parts = []
    n = next((r.n for r in disp if r.n), None)
    acc = next((r.acc_setting for r in disp if r.acc_setting), None)
    if acc:
        data, split, limit, seed = acc[:4]
        what = "mIoU" if any(r.is_seg for r in disp) else "accuracy"
        parts.append(f"{what} on {data} {split}, {n} images" + (f" (seeded subset, seed {seed})" if limit else ""))
    tp = next((r for r in disp if r.img_per_s is not None), None)
    if tp:
        parts.append(f"throughput on {tp.device_name or tp.device}, {tp.threads} threads, "
                     f"batch {tp.batch_size}, {tp.precision}{tp_mode_text(tp.tp_setting)}")
    return "Settings: " + ("; ".join(parts) if parts else "FLOPs only") + "."


DENSE_LEGEND = (
    "Dense task: GFLOPs count the backbone and the decoder together (GFLOPs backbone: the encoder alone; FLOPs "
    "and the matched-FLOPs targets are fractions of the whole dense model's). mIoU: one confusion matrix over "
    "the set, with its 95% bootstrap interval over images; pixel accuracy over every scored pixel. IoU vs dense: "
    "the mean difference of per-image IoU from the dense model's on the same images (points), its 95% bootstrap "
    "interval, and the Wilcoxon signed-rank p.")


def _legend(res: dict) -> list[str]:
    disp = display_rows(res)
    tol = disp[0].tolerance if disp else DEFAULT_TOLERANCE
    seg = any(r.is_seg for r in disp)
    scored = DENSE_LEGEND if seg else (
        "Top-1: with its 95% Wilson interval. McNemar p (b/c): exact test against the dense model on the same "
        "images; b = images only the dense model gets right, c = images only this run gets right.")
    lines = [
        "GFLOPs: fvcore, one multiply-add = one FLOP, per image. FLOPs: relative to the dense model. "
        "Speedup: the run's speed over the dense model's, both timed interleaved in rounds in one process on "
        "the same input (median ratio over rounds, with its quartiles). " + scored + " "
        "Rows with several seeds: mean ± std over the seeds (interval: mean of the per-seed intervals; "
        + ("the paired test: the largest per-seed p" if seg else "McNemar: the largest per-seed p, with that seed's counts")
        + "; img/s and speedup: the first seed's, the only one timed; per-seed rows in results.csv).",
        "",
    ]
    used = sorted({f for r in disp for f in r.flags})
    if used:
        lines.append("Flags: " + "; ".join(f"**{f}**: " + FLAG_HELP.get(f, f).replace(
            "1 point of", f"{100 * tol:g} point{'' if tol == 0.01 else 's'} of") for f in used) + ".")
        lines.append("")
    warn = []
    for r in disp:
        for w in r.warnings:
            if "busy" in w or "spread" in w:
                continue  # shown as flags; the full texts are in results.csv
            warn.append(f"- {r.label} ({params_text(r)}): {w}")
    if warn:
        lines.append("Warnings:")
        lines += list(dict.fromkeys(warn))
        lines.append("")
    if res["notes"]:
        lines.append("Notes:")
        lines += [f"- {n}" for n in res["notes"]]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- results.tex, results_paper.tex

def _constant_columns(cells: list[dict], names: tuple[str, ...]) -> dict[str, str]:
    """Of ``names``, the columns with one value in every row (said once, in the caption)."""
    return {k: cells[0][k] for k in names if cells and len({c[k] for c in cells}) == 1}


def latex(res: dict) -> str:
    """The full table (every column of results.md) for a paper's appendix: columns with one value in
    every row (device, model size) move to the caption line, "Params" is called "Setting"."""
    disp = display_rows(res)
    multi = len(models_of(disp)) > 1
    cells = [display_cells(r) for r in disp]
    same = _constant_columns(cells, ("Device", "Params (M)", "Target"))
    rename = {"Params": "Setting"}
    keys = [k for k in cells[0] if k not in same]
    cols = (["Model"] if multi else []) + [rename.get(k, k) for k in keys]
    n_left = (1 if multi else 0) + sum(k in ("Method", "Family", "Params", "Target") for k in keys)
    caption = "; ".join(f"{k}: {v}" for k, v in same.items() if v not in ("–", ""))
    lines = [
        "% tokenbench results table (needs \\usepackage{booktabs}); generated by `tokenbench report`",
        "% the compact table for a paper column is results_paper.tex",
    ]
    if caption:
        lines.append(f"% same in every row: {caption}")
    lines += [
        "\\begin{tabular}{" + "l" * n_left + "r" * (len(cols) - n_left) + "}",
        "\\toprule",
        " & ".join(tex_escape(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    for r, c in zip(disp, cells):
        vals = ([r.model] if multi else []) + [c.get(k, NONE) for k in keys]
        lines.append(" & ".join(tex_escape(v) for v in vals) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def paper_method(r: Row) -> str:
    label = r.label
    if r.learned in ("fine-tuned", "trained", "untrained") and r.learned.split("-")[0] not in label:
        label += f" ({r.learned})"
    return label


def paper_setting(r: Row) -> str:
    """The parameters that set this row apart: the method's budget knob and any non-default value."""
    if r.is_dense:
        return "--"
    cls = method_declaration(r.method)
    defaults, knob = (cls.defaults(), cls.knob) if cls is not None else ({}, None)
    shown = {k: v for k, v in r.params.items()
             if k != r.seed_param and (k == knob or k not in defaults or defaults[k] != v)}
    text = ", ".join(f"{k}={fmt_value(v)}" for k, v in shown.items())
    if r.row_type == "mean":
        text += (", " if text else "") + f"{len(r.seeds)} seeds"
    return text or "defaults"


def _paper_top1(r: Row) -> str:
    """Top-1 (mIoU on a dense task) ± the half-width of its 95% interval (seeded rows: of the mean
    per-seed interval)."""
    if r.score is None:
        return "--"
    if r.score_lo is None:
        return f"{r.score:.2f}"
    return f"{r.score:.2f} $\\pm$ {(r.score_hi - r.score_lo) / 2:.1f}"


def latex_paper(res: dict) -> str:
    """A compact table that fits one paper column: method, setting, GFLOPs, speedup, top-1 ± CI.

    Speedups from flagged timings (noisy, busy, unreliable) carry a dagger, explained in the
    caption comment; everything else is in results.tex / results.csv.
    """
    disp = display_rows(res)
    multi = len(models_of(disp)) > 1
    score = "mIoU (\\%)" if any(r.is_seg for r in disp) else "Top-1 (\\%)"
    cols = (["Model"] if multi else []) + ["Method", "Setting", "GFLOPs", "Speedup", score]
    dagger = any(timing_flagged(r) and r.speedup is not None for r in disp)
    lines = [
        "% tokenbench: compact results table for one paper column (needs \\usepackage{booktabs});",
        "% generated by `tokenbench report`.  Suggested caption: " + _paper_caption(res, dagger),
        "\\begin{tabular}{" + "l" * (2 + multi) + "rrr}",
        "\\toprule",
        " & ".join(cols) + " \\\\",
        "\\midrule",
    ]
    for r in disp:
        sp = "--"
        if r.speedup is not None:
            sp = f"{r.speedup:.2f}$\\times$" + ("$^\\dagger$" if timing_flagged(r) else "")
        vals = ([tex_escape(r.model)] if multi else []) + [
            tex_escape(paper_method(r)), tex_escape(paper_setting(r)), sig(r.gflops), sp, _paper_top1(r)]
        lines.append(" & ".join(vals) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _paper_caption(res: dict, dagger: bool) -> str:
    parts = [setting_line(res).replace("Settings: ", "").rstrip(".") + "."]
    if any(r.is_seg for r in display_rows(res)):
        parts.append("GFLOPs per image of backbone and decoder (fvcore, one multiply-add = one FLOP); speedup: "
                     "throughput over the dense model's; mIoU with the half-width of its 95% bootstrap interval.")
    else:
        parts.append("GFLOPs per image (fvcore, one multiply-add = one FLOP); speedup: throughput over the dense "
                     "model's; top-1 with the half-width of its 95% Wilson interval.")
    if any(r.row_type == "mean" for r in display_rows(res)):
        parts.append("Rows with several seeds: mean over the seeds.")
    if dagger:
        parts.append("$^\\dagger$ timing flagged (noisy or busy machine): speedup unreliable.")
    return " ".join(parts)


# --------------------------------------------------------------------------- results.csv

def csv_text(res: dict) -> str:
    """Every row: a seeded setting's seed rows, then its mean row."""
    seen, all_rows = set(), []
    for r in display_rows(res):
        for m in (r.members or []) if r.row_type == "mean" else []:
            all_rows.append(m)
        all_rows.append(r)
    unique = [r for r in all_rows if not (id(r) in seen or seen.add(id(r)))]

    return csv_table(CSV_COLUMNS, unique, csv_value)


def csv_value(r: Row, column: str):
    """A CSV column's value: a field, the parameters as JSON, a record kind's key, the flags and
    warnings joined."""
    if column == "params":
        return params_json(r.params)
    if column.endswith("_key") and column[:-4] in RECORD_KINDS:
        return r.keys.get(column[:-4])
    if column == "flags":
        return flags_text(r)
    if column == "warnings":
        return " | ".join(r.warnings)
    return getattr(r, column)


# --------------------------------------------------------------------------- the terminal

def summary_table(res: dict):
    """A compact rich table of the display rows for the terminal (the full table is results.md).

    At most six columns, which fit 80: numbers are never cut; the setting (the budget knob and
    the parameters set away from their defaults, seeds, learned parts), the flags (whole words)
    and a seed-averaged top-1's interval wrap onto further lines.  Rows of several models are
    one table per model (a model column would not fit), except a dense row whose method cell
    already names its model (a sweep's smaller dense model) beside the first model's rows."""
    from rich.console import Group

    disp = display_rows(res)
    first = disp[0].model if disp else None
    named = lambda r: r.model == first or (r.is_dense and display_cells(r)["Method"] == r.model)
    title = f"tokenbench: {Path(res['out'])}"
    if all(named(r) for r in disp):
        return _summary_block(disp, title)
    return Group(*(_summary_block([r for r in disp if r.model == m], f"{title}: {m}") for m in models_of(disp)))


def _summary_block(disp: list[Row], title: str):
    """One rich table of ``disp`` (see :func:`summary_table`)."""
    from rich import box
    from rich.table import Table

    rows = []
    for r in disp:
        c = display_cells(r)
        setting = "" if r.is_dense else paper_setting(r)
        if r.learned not in (None, "none"):
            setting += ("; " if setting else "") + r.learned
        top1 = num(r.score, ".2f")
        std = r.miou_std if r.is_seg else r.top1_std
        if r.row_type == "mean" and std is not None:
            top1 += f"±{std:.2f}"
        if r.score_lo is not None:
            top1 += f" [{r.score_lo:.1f}–{r.score_hi:.1f}]"  # no space inside: it wraps before the interval
        rows.append([c["Method"], setting or NONE, c["FLOPs"], c["Speedup [q1, q3]"].split(" [")[0], top1,
                     ", ".join(sorted(r.flags))])
    cols = list(SUMMARY_COLUMNS)
    if any(r.is_seg for r in disp):
        cols = [("mIoU % [95% CI]" if c == "Top-1 % [95% CI]" else c) for c in cols]
    # columns nothing was measured for (a FLOPs-only sweep's speedup and top-1) are left out
    shown = [j for j, c in enumerate(cols)
             if c in ("Method", "Setting") or any(row[j] not in (NONE, "") for row in rows)]
    # two spaces between columns, none at the edges (rich's collapsed padding and edges measure one
    # column short on an 80-column terminal, cutting the last flag)
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    # a flag is never cut: the column is as wide as the longest flag word
    flag_width = max([len(w) + 1 for row in rows for w in row[-1].split()] + [5]) + 1  # with "," and the padding
    method_width = max(len(row[0]) for row in rows) if rows else 0
    for j in shown:
        c = cols[j]
        # a sweep label longer than the column wraps (``dynamicvit-`` / ``convnext``); numbers never
        t.add_column(c, no_wrap=c in ("FLOPs", "Speedup") or (c == "Method" and method_width <= 14), justify="right" if c in ("FLOPs", "Speedup")
                     else "left", overflow="fold",
                     min_width={"Setting": 16, "Top-1 % [95% CI]": 17, "mIoU % [95% CI]": 17,
                                "Flags": flag_width}.get(c),
                     max_width=flag_width if c == "Flags" else None)  # one flag a line where two do not fit
    for row in rows:
        t.add_row(*(row[j] for j in shown))
    return t
