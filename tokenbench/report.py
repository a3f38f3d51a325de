"""Tables and plots from stored records; never measures.

``write_report(out)`` reads the records under ``<out>/records/`` (damaged ones are set
aside by the store, with a warning) and the sweep's plan ``<out>/sweep.json`` when there
is one (which runs, labels, FLOPs targets), and writes:

- ``results.md``, ``results.csv``, ``results.tex`` (and ``results_paper.tex``, a compact
  table for one paper column: method, setting, GFLOPs, speedup, top-1 ± CI): one row per run, with method,
  parameters, GFLOPs and FLOPs relative to the dense model, throughput (median and
  quartiles) and speedup over dense on the same device and settings, top-1 with its 95%
  (Wilson) interval, top-5, parameters, device, status of learned parts, McNemar's exact
  test against dense on the same images (p and discordant counts) and flags.  A
  non-deterministic method measured with several seeds gets one row with mean ± std
  over the seeds; the CSV keeps the per-seed rows too (``row_type`` seed / mean / run);
- ``plots/accuracy_vs_gflops.{png,pdf}`` and ``plots/accuracy_vs_throughput.{png,pdf}``
  (one pair per model when a sweep has several): one line per method, dense marked, the
  Pareto frontier over all methods, 95% intervals as bars; 3.4 in wide, 8 pt fonts,
  seaborn's colour-blind palette.

Without a plan (records written by ``tokenbench eval --results DIR``, say) every record
in the directory is reported: runs are grouped by model, method and parameters, and the
most common throughput and accuracy settings are used.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .identity import stale_reasons
from .sweep import DEFAULT_TOLERANCE, DENSE_METHOD, fmt_value, read_plan

FLAG_HELP = {
    "flops-miss": "FLOPs land more than the tolerance (3 points of the dense model's FLOPs by default) from the target",
    "noisy": "throughput or speedup interquartile range above 10% of the median, after the retries",
    "busy": "other processes took CPU time while this was timed, after the retries",
    "stale": "measured by other code or under another protocol than this checkout's (rerun `tokenbench run`)",
    "warning": "the records carry warnings (listed below the table)",
    "incomplete": "some planned measurements are missing (interrupted sweep: rerun to complete)",
}
TABLE_FILES = ("results.md", "results.csv", "results.tex", "results_paper.tex")
CSV_COLUMNS = [
    "row_type", "model", "label", "method", "params", "seed", "n_seeds", "target", "gflops", "flops_rel",
    "img_per_s", "img_per_s_q1", "img_per_s_q3", "img_per_s_std", "speedup", "speedup_q1", "speedup_q3",
    "latency_ms_p50", "top1",
    "top1_std", "top1_lo", "top1_hi", "top5", "top5_std", "n", "params_m", "device", "device_name", "threads",
    "batch_size", "precision", "learned", "checkpoint", "mcnemar_p", "only_dense", "only_run", "flags",
    "warnings", "stale", "flops_key", "throughput_key", "speedup_key", "accuracy_key",
]


# --------------------------------------------------------------------------- rows from records

def _identity(spec: dict) -> str:
    from .store import canonical

    return canonical({k: spec.get(k) for k in ("model", "method", "params", "pretrained", "checkpoint",
                                               "img_size")})


def _tp_setting(rec: dict) -> tuple:
    kf = rec.get("key_fields", {})
    return tuple(kf.get(k) for k in ("device", "device_name", "precision", "threads", "batch_size"))


def _acc_setting(rec: dict) -> tuple:
    kf = rec.get("key_fields", {})
    return tuple(kf.get(k) for k in ("data", "split", "limit", "data_seed", "device", "precision"))


def _latest(recs: list[dict]) -> Optional[dict]:
    """The record to report among several of one setting: a current one before a stale one, then the newest."""
    return max(recs, key=lambda r: (not stale_reasons(r), r.get("meta", {}).get("time", ""))) if recs else None


def _method_info(name: str) -> tuple[bool, Optional[str]]:
    """(deterministic, seed parameter) from the method's declaration (unknown methods: deterministic)."""
    try:
        from .registry import get_method

        cls = get_method(name)
    except UserError:
        return True, None
    has_seed = any(p.name == "seed" for p in cls.params)
    return cls.deterministic, ("seed" if (not cls.deterministic and has_seed) else None)


def _entries_from_plan(plan: dict, by_key: dict) -> list[dict]:
    out = []
    for r in plan["runs"]:
        keys = r.get("keys") or {}
        out.append({
            "label": r.get("label") or r["method"], "spec": r["spec"], "targets": r.get("targets") or [],
            "search": r.get("search"), "seed_param": r.get("seed_param"), "seed_index": r.get("seed_index", 0),
            "planned": sorted(keys), "recs": {k: by_key.get(v) for k, v in keys.items()},
        })
    return out


def _entries_from_records(recs: list[dict], notes: list[str]) -> list[dict]:
    tp = [r for r in recs if r["kind"] == "throughput"]
    acc = [r for r in recs if r["kind"] == "accuracy"]
    tp_set = Counter(map(_tp_setting, tp)).most_common(1)[0][0] if tp else None
    acc_set = Counter(map(_acc_setting, acc)).most_common(1)[0][0] if acc else None
    if len({_tp_setting(r) for r in tp}) > 1:
        notes.append(f"throughput records of several settings: reporting device/batch {tp_set}")
    if len({_acc_setting(r) for r in acc}) > 1:
        notes.append(f"accuracy records of several data subsets: reporting {acc_set}")
    groups: dict[str, dict] = {}
    for r in recs:
        if r["kind"] == "throughput" and _tp_setting(r) != tp_set:
            continue
        if r["kind"] == "accuracy" and _acc_setting(r) != acc_set:
            continue
        ident = _identity(r["spec"])
        g = groups.setdefault(ident, {"spec": r["spec"], "by_kind": {}})
        g["by_kind"].setdefault(r["kind"], []).append(r)
    out = []
    for g in groups.values():
        spec = g["spec"]
        _, seed_p = _method_info(spec["method"])
        out.append({"label": spec["method"], "spec": spec, "targets": [], "search": None, "seed_param": seed_p,
                    "seed_index": 0, "planned": sorted(g["by_kind"]),
                    "recs": {k: _latest(v) for k, v in g["by_kind"].items()}})

    def order(e):
        s = e["spec"]
        g = (e["recs"].get("flops") or {}).get("metrics", {}).get("gflops", 0.0)
        return (s["model"], s["method"] != DENSE_METHOD, s["method"], -g, json.dumps(s["params"], sort_keys=True))

    return sorted(out, key=order)


def _learned(spec: dict) -> str:
    status = spec.get("learned_parts") or "none"
    if status == "trained" and spec.get("checkpoint"):
        return "fine-tuned"
    if status == "none" and spec.get("checkpoint") and spec.get("method") not in (None, DENSE_METHOD):
        return "fine-tuned"  # a training-free method on weights trained with it (tokenbench train)
    return status


def _row(e: dict, tolerance: float) -> dict:
    spec = e["spec"]
    recs = e["recs"]
    f, t, a, sp = recs.get("flops"), recs.get("throughput"), recs.get("accuracy"), recs.get("speedup")
    seed_p = e.get("seed_param")
    params = dict(spec.get("params") or {})
    row: dict[str, Any] = {
        "row_type": "seed" if seed_p else "run", "model": spec["model"],
        "label": "dense" if spec["method"] == DENSE_METHOD else e["label"], "method": spec["method"],
        "params": json.dumps(params, sort_keys=True), "seed": params.get(seed_p) if seed_p else None,
        "n_seeds": None, "target": "/".join(f"{x:g}" for x in e["targets"]) or None,
        "_targets": list(e["targets"]), "_params": params, "_seed_param": seed_p,
        "checkpoint": spec.get("checkpoint"), "learned": None, "warnings": [], "_flags": set(),
        "stale": None,
    }
    stale = []
    for kind, rec in recs.items():
        if rec is not None:
            stale += [f"{kind}: {why}" for why in stale_reasons(rec)]
            row[f"{kind}_key"] = rec["key"]
            row["learned"] = row["learned"] or _learned(rec.get("spec", {}))
            row["warnings"] += list(rec.get("metrics", {}).get("warnings") or [])
    if any(recs.get(k) is None for k in e["planned"]):
        row["_flags"].add("incomplete")
    if f is not None:
        m = f["metrics"]
        row["gflops"] = m.get("gflops")
        row["params_m"] = m.get("params_m")
    if t is not None:
        m = t["metrics"]
        kf = t.get("key_fields", {})
        row.update({"img_per_s": m.get("img_per_s"), "img_per_s_q1": m.get("img_per_s_q1"),
                    "img_per_s_q3": m.get("img_per_s_q3"), "latency_ms_p50": m.get("latency_ms_p50"),
                    "device": kf.get("device"), "device_name": kf.get("device_name"), "threads": kf.get("threads"),
                    "batch_size": kf.get("batch_size"), "precision": kf.get("precision"),
                    "_tp_setting": _tp_setting(t)})
        if m.get("spread_flag"):
            row["_flags"].add("noisy")
        if t.get("env", {}).get("busy"):
            row["_flags"].add("busy")
    if sp is not None:
        m = sp["metrics"]
        row.update({"speedup": m.get("speedup"), "speedup_q1": m.get("speedup_q1"),
                    "speedup_q3": m.get("speedup_q3")})
        if m.get("spread_flag"):
            row["_flags"].add("noisy")
        if sp.get("env", {}).get("busy"):
            row["_flags"].add("busy")
    if stale:
        row["_flags"].add("stale")
        row["stale"] = "; ".join(dict.fromkeys(stale))
    if a is not None:
        m = a["metrics"]
        lo, hi = (m.get("top1_ci95") or [None, None])[:2]
        row.update({"top1": m.get("top1"), "top1_lo": lo, "top1_hi": hi, "top5": m.get("top5"), "n": m.get("n"),
                    "_correct": m.get("correct"), "_acc_setting": _acc_setting(a)})
        row.setdefault("device", a.get("key_fields", {}).get("device"))
        row.setdefault("precision", a.get("key_fields", {}).get("precision"))
    for w in row["warnings"]:
        if "busy" in w:
            row["_flags"].add("busy")
        elif "spread" in w:
            row["_flags"].add("noisy")
        else:
            row["_flags"].add("warning")
    row["_tolerance"] = tolerance
    return row


def _dense_for(row: dict, dense_rows: list[dict]) -> Optional[dict]:
    cands = [d for d in dense_rows if d["model"] == row["model"]]
    return cands[0] if cands else None


def _compare(rows: list[dict]) -> None:
    """FLOPs relative to dense, speedup, McNemar against dense, the FLOPs-miss flag (in place)."""
    from .measure import mcnemar

    dense_rows = [r for r in rows if r["method"] == DENSE_METHOD]
    for r in rows:
        d = _dense_for(r, dense_rows)
        if d is None:
            continue
        if r.get("gflops") is not None and d.get("gflops"):
            r["flops_rel"] = r["gflops"] / d["gflops"]
            if r["_targets"]:
                err = min(abs(r["flops_rel"] - t) for t in r["_targets"])
                if err > r["_tolerance"] + 1e-12:
                    r["_flags"].add("flops-miss")
        if r is d and r.get("img_per_s"):
            r["speedup"] = 1.0  # speedups are the paired (interleaved) timings of the speedup records
        if r is not d and r.get("_correct") and d.get("_correct") and r.get("_acc_setting") == d.get("_acc_setting") \
                and len(r["_correct"]) == len(d["_correct"]):
            res = mcnemar([c == "1" for c in d["_correct"]], [c == "1" for c in r["_correct"]])
            r.update({"mcnemar_p": res["p_value"], "only_dense": res["only_a"], "only_run": res["only_b"]})


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.stdev(xs) if len(xs) > 1 else None


def _aggregate(rows: list[dict]) -> list[dict]:
    """Display rows: each group of seeds becomes one mean row (per-seed rows stay for the CSV)."""
    out: list[dict] = []
    groups: dict[str, list[dict]] = {}
    order: list[tuple[str, Any]] = []
    for r in rows:
        sp = r["_seed_param"]
        if not sp:
            order.append(("row", r))
            continue
        rest = {k: v for k, v in r["_params"].items() if k != sp}
        gk = json.dumps([r["model"], r["label"], rest, r["_targets"], r.get("checkpoint")], sort_keys=True)
        if gk not in groups:
            groups[gk] = []
            order.append(("group", gk))
        groups[gk].append(r)
    for kind, item in order:
        if kind == "row":
            out.append(item)
            continue
        g = groups[item]
        if len(g) == 1:
            r = dict(g[0])
            r["row_type"] = "run"
            out.append(r)
            continue
        first = g[0]
        sp = first["_seed_param"]
        m = dict(first)
        m.update({"row_type": "mean", "seed": None, "n_seeds": len(g),
                  "params": json.dumps({k: v for k, v in first["_params"].items() if k != sp}, sort_keys=True),
                  "_params": {k: v for k, v in first["_params"].items() if k != sp},
                  "_seeds": [r["seed"] for r in g], "_flags": set().union(*(r["_flags"] for r in g)),
                  "stale": "; ".join(dict.fromkeys(r["stale"] for r in g if r.get("stale"))) or None,
                  "warnings": sorted({w for r in g for w in r["warnings"]})})
        for col in ("gflops", "flops_rel", "img_per_s", "img_per_s_q1", "img_per_s_q3", "speedup", "speedup_q1",
                    "speedup_q3", "latency_ms_p50",
                    "top1", "top1_lo", "top1_hi", "top5", "params_m", "only_dense", "only_run"):
            m[col] = _mean(r.get(col) for r in g)
        m["top1_std"] = _std([r.get("top1") for r in g if r.get("top1") is not None])
        m["top5_std"] = _std([r.get("top5") for r in g if r.get("top5") is not None])
        m["img_per_s_std"] = _std([r.get("img_per_s") for r in g if r.get("img_per_s") is not None])
        ps = [r.get("mcnemar_p") for r in g if r.get("mcnemar_p") is not None]
        m["mcnemar_p"] = max(ps) if ps else None  # the most conservative of the seeds
        if m.get("flops_rel") is not None and m["_targets"] and "flops-miss" not in m["_flags"]:
            if min(abs(m["flops_rel"] - t) for t in m["_targets"]) > m["_tolerance"] + 1e-12:
                m["_flags"].add("flops-miss")
        m["_members"] = g
        out.append(m)
    return out


def collect(out: str | os.PathLike) -> dict:
    """Rows (all, for the CSV) and display rows (seeds aggregated) from the records in ``out``."""
    from .store import Store

    out = Path(out)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store(out)
        recs = store.records()
        plan = read_plan(out)
    for w in caught:
        notes.append(str(w.message))
    if not recs:
        raise UserError(f"no records in {out / 'records'} (run a sweep there first: tokenbench run --out {out})")
    by_key = {r["key"]: r for r in recs}
    tolerance = DEFAULT_TOLERANCE
    if plan:
        tolerance = float(plan.get("sweep", {}).get("flops_tolerance") or DEFAULT_TOLERANCE)
        entries = _entries_from_plan(plan, by_key)
    else:
        entries = _entries_from_records(recs, notes)
    rows = [_row(e, tolerance) for e in entries]
    _compare(rows)
    display = _aggregate(rows)
    for r in rows + display:
        r["flags"] = ",".join(sorted(r["_flags"]))
    notes += closing_notes(rows)
    return {"rows": rows, "display": display, "notes": notes, "plan": plan, "out": out}


def closing_notes(rows: list[dict]) -> list[str]:
    """What a reader must know before trusting the table: stale rows and unreliable timings."""
    out = []
    stale = [r for r in rows if "stale" in r["_flags"]]
    if stale:
        why = sorted({w for r in stale for w in (r.get("stale") or "").split("; ") if w})
        out.append(f"{len(stale)} of {len(rows)} runs are stale (marked `stale`): {'; '.join(why[:3])}"
                   f"{' ...' if len(why) > 3 else ''}; rerun `tokenbench run` to measure them with this code")
    timed = [r for r in rows if r.get("throughput_key") or r.get("speedup_key")]
    flagged = [r for r in timed if r["_flags"] & {"busy", "noisy"}]
    if flagged:
        out.append(f"{len(flagged)} of {len(timed)} throughput runs flagged busy or noisy: their speedups are "
                   "unreliable (`tokenbench run ... --retime-flagged` times them again)")
    return out


# --------------------------------------------------------------------------- formatting

def _sig(x: Optional[float], n: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    digits = max(0, n - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def _f(x: Optional[float], fmt: str, none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def params_text(r: dict) -> str:
    s = ", ".join(f"{k}={fmt_value(v)}" for k, v in r["_params"].items())
    if r["row_type"] == "mean":
        seeds = r["_seeds"]
        s += (", " if s else "") + f"{len(seeds)} seeds"
    return s or "–"


def display_cells(r: dict, tex: bool = False) -> dict[str, str]:
    pm = r"$\pm$" if tex else "±"
    top1 = _f(r.get("top1"), ".2f")
    if r["row_type"] == "mean" and r.get("top1_std") is not None:
        top1 += f" {pm} {r['top1_std']:.2f}"
    if r.get("top1_lo") is not None:
        top1 += f" [{r['top1_lo']:.1f}, {r['top1_hi']:.1f}]"
    top5 = _f(r.get("top5"), ".2f")
    if r["row_type"] == "mean" and r.get("top5_std") is not None:
        top5 += f" {pm} {r['top5_std']:.2f}"
    tp = "–"
    if r.get("img_per_s") is not None:
        tp = f"{r['img_per_s']:.0f} [{r['img_per_s_q1']:.0f}, {r['img_per_s_q3']:.0f}]"
    mc = "–"
    if r.get("mcnemar_p") is not None:
        p = r["mcnemar_p"]
        ptxt = f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"
        mc = f"{ptxt} ({_f(r.get('only_dense'), '.0f')}/{_f(r.get('only_run'), '.0f')})"
    dev = "–"
    if r.get("device"):
        dev = r["device"] + (f" x{r['threads']}" if r.get("threads") else "")
    x = r"$\times$" if tex else "x"
    return {
        "Method": r["label"],
        "Params": params_text(r),
        "Target": r.get("target") or "–",
        "GFLOPs": _sig(r.get("gflops")),
        "FLOPs": _f(None if r.get("flops_rel") is None else 100 * r["flops_rel"], ".1f") + ("%" if r.get(
            "flops_rel") is not None else ""),
        "img/s [q1, q3]": tp,
        "Speedup [q1, q3]": _speedup_text(r, x),
        "Top-1 % [95% CI]": top1,
        "Top-5 %": top5,
        "Params (M)": _f(r.get("params_m"), ".2f"),
        "Device": dev,
        "Learned": r.get("learned") or "–",
        "McNemar p (b/c)": mc,
        "Flags": r.get("flags") or "",
    }


def _speedup_text(r: dict, x: str = "x") -> str:
    """The paired speedup with its quartiles over rounds (the dense row is 1 by definition)."""
    sp = r.get("speedup")
    if sp is None:
        return "–"
    out = f"{sp:.2f}{x}"
    if r.get("speedup_q1") is not None and r["method"] != DENSE_METHOD:
        out += f" [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
    return out


def _models(rows):
    return list(dict.fromkeys(r["model"] for r in rows))


def markdown(res: dict) -> str:
    disp = res["display"]
    multi = len(_models(disp)) > 1
    cells = [display_cells(r) for r in disp]
    cols = (["Model"] if multi else []) + list(cells[0].keys())
    lines = []
    plan = res.get("plan")
    title = (plan or {}).get("sweep", {}).get("name") or Path(res["out"]).name
    lines.append(f"# tokenbench results: {title}\n")
    desc = (plan or {}).get("sweep", {}).get("description")
    if desc:
        lines.append(desc + "\n")
    lines.append(_setting_line(res) + "\n")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r, c in zip(disp, cells):
        vals = ([r["model"]] if multi else []) + [c[k] for k in cells[0]]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in vals) + " |")
    lines.append("")
    lines += _legend(res)
    return "\n".join(lines) + "\n"


def _setting_line(res: dict) -> str:
    disp = res["display"]
    parts = []
    n = next((r.get("n") for r in disp if r.get("n")), None)
    acc = next((r.get("_acc_setting") for r in disp if r.get("_acc_setting")), None)
    if acc:
        data, split, limit, seed = acc[:4]
        parts.append(f"accuracy on {data} {split}, {n} images" + (f" (seeded stratified subset, seed {seed})"
                                                                   if limit else ""))
    tp = next((r for r in disp if r.get("img_per_s") is not None), None)
    if tp:
        parts.append(f"throughput on {tp.get('device_name') or tp.get('device')}, {tp.get('threads')} threads, "
                     f"batch {tp.get('batch_size')}, {tp.get('precision')}")
    return "Settings: " + ("; ".join(parts) if parts else "FLOPs only") + "."


def _legend(res: dict) -> list[str]:
    disp = res["display"]
    tol = disp[0].get("_tolerance", DEFAULT_TOLERANCE) if disp else DEFAULT_TOLERANCE
    lines = [
        "GFLOPs: fvcore, one multiply-add = one FLOP, per image. FLOPs: relative to the dense model. "
        "Speedup: the run's speed over the dense model's, both timed interleaved in rounds in one process on "
        "the same input (median ratio over rounds, with its quartiles). "
        "Top-1: with its 95% Wilson interval. McNemar p (b/c): exact test against the dense model on the same "
        "images; b = images only the dense model gets right, c = images only this run gets right. "
        "Rows with several seeds: mean ± std over the seeds (interval: mean of the per-seed intervals; "
        "McNemar: the largest per-seed p; per-seed rows in results.csv).",
        "",
    ]
    used = sorted({f for r in disp for f in r["_flags"]})
    if used:
        lines.append("Flags: " + "; ".join(f"**{f}**: " + FLAG_HELP.get(f, f).replace(
            "3 points", f"{100 * tol:g} points") for f in used) + ".")
        lines.append("")
    warn = []
    for r in disp:
        for w in r["warnings"]:
            if "busy" in w or "spread" in w:
                continue  # shown as flags; the full texts are in results.csv
            warn.append(f"- {r['label']} ({params_text(r)}): {w}")
    if warn:
        lines.append("Warnings:")
        lines += list(dict.fromkeys(warn))
        lines.append("")
    if res["notes"]:
        lines.append("Notes:")
        lines += [f"- {n}" for n in res["notes"]]
        lines.append("")
    return lines


def _tex_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "&%#_{}$":
            out.append("\\" + ch)
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch == "–":
            out.append("--")
        elif ch == "±":
            out.append(r"$\pm$")
        else:
            out.append(ch)
    return "".join(out)


# Flags that make a throughput (and so a speedup) unreliable: drawn hollow, marked in tables.
TIMING_FLAGS = ("noisy", "busy", "unreliable")


def _timing_flagged(r: dict) -> bool:
    return bool(set(TIMING_FLAGS) & set(r.get("_flags") or ()))


def _constant_columns(cells: list[dict], names: tuple[str, ...]) -> dict[str, str]:
    """Of ``names``, the columns with one value in every row (said once, in the caption)."""
    return {k: cells[0][k] for k in names if cells and len({c[k] for c in cells}) == 1}


def latex(res: dict) -> str:
    """The full table (every column of results.md) for a paper's appendix: columns with one value in
    every row (device, model size) move to the caption line, "Params" is called "Setting"."""
    disp = res["display"]
    multi = len(_models(disp)) > 1
    cells = [display_cells(r) for r in disp]
    same = _constant_columns(cells, ("Device", "Params (M)", "Target"))
    rename = {"Params": "Setting"}
    keys = [k for k in cells[0] if k not in same]
    cols = (["Model"] if multi else []) + [rename.get(k, k) for k in keys]
    n_left = (1 if multi else 0) + sum(k in ("Method", "Params", "Target") for k in keys)
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
        " & ".join(_tex_escape(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    for r, c in zip(disp, cells):
        vals = ([r["model"]] if multi else []) + [c[k] for k in keys]
        lines.append(" & ".join(_tex_escape(v) for v in vals) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _paper_method(r: dict) -> str:
    learned = r.get("learned")
    label = r["label"]
    if learned in ("fine-tuned", "trained", "untrained") and learned.split("-")[0] not in label:
        label += f" ({learned})"
    return label


def _paper_setting(r: dict) -> str:
    """The parameters that set this row apart: the method's budget knob and any non-default value."""
    if r["method"] == DENSE_METHOD:
        return "--"
    try:
        from .registry import get_method

        cls = get_method(r["method"])
        defaults, knob = cls.defaults(), cls.search_param
    except UserError:
        defaults, knob = {}, None
    shown = {k: v for k, v in r["_params"].items()
             if k != r.get("_seed_param") and (k == knob or k not in defaults or defaults[k] != v)}
    text = ", ".join(f"{k}={fmt_value(v)}" for k, v in shown.items())
    if r["row_type"] == "mean":
        text += (", " if text else "") + f"{len(r['_seeds'])} seeds"
    return text or "defaults"


def _paper_top1(r: dict) -> str:
    """Top-1 ± the half-width of its 95% Wilson interval (seeded rows: of the mean per-seed interval)."""
    if r.get("top1") is None:
        return "--"
    if r.get("top1_lo") is None:
        return f"{r['top1']:.2f}"
    return f"{r['top1']:.2f} $\\pm$ {(r['top1_hi'] - r['top1_lo']) / 2:.1f}"


def latex_paper(res: dict) -> str:
    """A compact table that fits one paper column: method, setting, GFLOPs, speedup, top-1 ± CI.

    Speedups from flagged timings (noisy, busy, unreliable) carry a dagger, explained in the
    caption comment; everything else is in results.tex / results.csv.
    """
    disp = res["display"]
    multi = len(_models(disp)) > 1
    cols = (["Model"] if multi else []) + ["Method", "Setting", "GFLOPs", "Speedup", "Top-1 (\\%)"]
    dagger = any(_timing_flagged(r) and r.get("speedup") is not None for r in disp)
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
        if r.get("speedup") is not None:
            sp = f"{r['speedup']:.2f}$\\times$" + ("$^\\dagger$" if _timing_flagged(r) else "")
        vals = ([_tex_escape(r["model"])] if multi else []) + [
            _tex_escape(_paper_method(r)), _tex_escape(_paper_setting(r)), _sig(r.get("gflops")), sp, _paper_top1(r)]
        lines.append(" & ".join(vals) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _paper_caption(res: dict, dagger: bool) -> str:
    parts = [_setting_line(res).replace("Settings: ", "").rstrip(".") + "."]
    parts.append("GFLOPs per image (fvcore, one multiply-add = one FLOP); speedup: throughput over the dense "
                 "model's; top-1 with the half-width of its 95% Wilson interval.")
    if any(r["row_type"] == "mean" for r in res["display"]):
        parts.append("Rows with several seeds: mean over the seeds.")
    if dagger:
        parts.append("$^\\dagger$ timing flagged (noisy or busy machine): speedup unreliable.")
    return " ".join(parts)


def csv_text(res: dict) -> str:
    import csv
    import io

    seen, all_rows = set(), []
    for r in res["display"]:
        if r["row_type"] == "mean":
            for m in r["_members"]:
                all_rows.append(m)
            all_rows.append(r)
        else:
            all_rows.append(r)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in all_rows:
        if id(r) in seen:
            continue
        seen.add(id(r))
        row = {}
        for k in CSV_COLUMNS:
            v = r.get(k)
            if k == "warnings":
                v = " | ".join(v or [])
            elif isinstance(v, float):
                v = repr(v)
            row[k] = "" if v is None else v
        w.writerow(row)
    return buf.getvalue()


# --------------------------------------------------------------------------- plots

PLOT_RC = {"font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
           "legend.fontsize": 7, "lines.linewidth": 1.0, "lines.markersize": 4, "axes.linewidth": 0.6,
           "grid.linewidth": 0.4, "pdf.fonttype": 42, "ps.fonttype": 42}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
FIG_SIZE = (3.4, 2.5)


def pareto(points: list[tuple[float, float]], lower_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (higher accuracy; lower or higher x), sorted by x."""
    pts = sorted(points, key=lambda p: (p[0], -p[1]) if lower_x_better else (-p[0], -p[1]))
    front, best = [], -math.inf
    for x, y in pts:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def _savefig(fig, base: Path) -> list[Path]:
    out = []
    base.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        p = base.with_suffix(f".{ext}")
        tmp = p.with_name(f".{p.name}.tmp.{ext}")
        # no creation date: regenerating the same report gives the same files
        meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(tmp, dpi=300, bbox_inches="tight", pad_inches=0.02, format=ext, metadata=meta)
        os.replace(tmp, p)
        out.append(p)
    return out


ERRORBAR_NOTE = "error bars: 95% Wilson interval of top-1"


def plot_layers(rows: list[dict], xcol: str) -> dict:
    """What a plot draws, decided apart from the drawing (and tested so).

    - ``curves``: per label, the runs that form the method's curve: its runs at FLOPs targets,
      or, for a label without any target (a method trained at a few settings), all its runs;
      sorted by GFLOPs;
    - ``points``: runs drawn as separate, labelled markers: the off-grid runs of a label that
      has a curve (no FLOPs target), and labels with one run (a control, such as a fine-tuned
      top-k);
    - ``dense``: the dense model's rows;
    - ``frontier``: the Pareto frontier over every run (higher accuracy; lower GFLOPs or higher
      throughput);
    - ``hollow``: ids of rows whose timing is flagged (drawn hollow on the throughput axis).
    """
    pts = [r for r in rows if r.get(xcol) is not None and r.get("top1") is not None]
    dense = [r for r in pts if r["method"] == DENSE_METHOD]
    curves: dict[str, list[dict]] = {}
    points: list[dict] = []
    for lab in dict.fromkeys(r["label"] for r in pts if r["method"] != DENSE_METHOD):
        mine = [r for r in pts if r["label"] == lab and r["method"] != DENSE_METHOD]
        on_grid = [r for r in mine if r.get("_targets")]
        curve = on_grid if on_grid else (mine if len(mine) > 1 else [])
        if curve:
            curves[lab] = sorted(curve, key=lambda r: (r.get("gflops") or 0.0, r[xcol]))
        points += [r for r in mine if not any(r is c for c in curve)]
    hollow = {id(r) for r in pts if xcol == "img_per_s" and _timing_flagged(r)}
    return {"curves": curves, "points": points, "dense": dense, "hollow": hollow,
            "frontier": pareto([(r[xcol], r["top1"]) for r in pts], xcol == "gflops")}


def _point_label(r: dict, has_curve: bool) -> str:
    """A separate marker's legend entry: its label, and for an off-grid run of a curve, its setting."""
    if not has_curve:
        return r["label"]
    setting = _paper_setting(r).split(", ")
    return f"{r['label']} {setting[0]}, off-grid"


def _dodge(layers: dict, xcol: str) -> dict[str, float]:
    """A small horizontal offset per curve on the GFLOPs axis, where matched FLOPs stack every
    method at the same x (a fraction of the axis range; said in the legend)."""
    labels = list(layers["curves"])
    if xcol != "gflops" or len(labels) < 2:
        return {lab: 0.0 for lab in labels}
    xs = [r[xcol] for rs in layers["curves"].values() for r in rs] + [r[xcol] for r in layers["dense"]]
    span = (max(xs) - min(xs)) or 1.0
    step = 0.008 * span
    return {lab: (i - (len(labels) - 1) / 2) * step for i, lab in enumerate(labels)}


def plot(res: dict, plots_dir: Path) -> list[Path]:
    """accuracy vs GFLOPs and vs throughput, per model; returns the files written.

    Curves per method, controls and off-grid runs as separate labelled markers, the Pareto
    frontier as a wide grey band behind them, 95% Wilson intervals as bars (said in the legend),
    flagged timings hollow on the throughput axis.
    """
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    disp = [r for r in res["display"] if r.get("top1") is not None]
    written: list[Path] = []
    models = _models(disp)
    labels = list(dict.fromkeys(r["label"] for r in disp if r["method"] != DENSE_METHOD))
    palette = sns.color_palette("colorblind", max(1, len(labels)))
    style = {lab: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}
    axes_spec = [("gflops", "accuracy_vs_gflops", "Computation (GFLOPs per image)"),
                 ("img_per_s", "accuracy_vs_throughput", "Throughput (images/s)")]
    for model in models:
        rows = [r for r in disp if r["model"] == model]
        for xcol, fname, xlabel in axes_spec:
            layers = plot_layers(rows, xcol)
            if not (layers["curves"] or layers["points"] or layers["dense"]):
                continue
            with sns.axes_style("whitegrid"), plt.rc_context(PLOT_RC):
                fig, ax = plt.subplots(figsize=(FIG_SIZE[0], FIG_SIZE[1] + 0.5))
                handles: list = []
                front = layers["frontier"]
                if len(front) > 1:
                    ax.step([p[0] for p in front], [p[1] for p in front], where="post" if xcol == "gflops" else "pre",
                            color="0.55", lw=4.0, alpha=0.3, solid_capstyle="round", zorder=0)
                    handles.append(Line2D([], [], color="0.55", lw=4.0, alpha=0.3, label="Pareto frontier"))
                dodge = _dodge(layers, xcol)

                def draw(r, x, color, marker, ms, zorder):
                    lo, hi = _yerr([r])
                    ax.errorbar([x], [r["top1"]], yerr=[lo, hi], fmt="none", ecolor=color, elinewidth=0.6,
                                capsize=1.2, alpha=0.55, zorder=zorder - 1)
                    hollow = id(r) in layers["hollow"]
                    ax.plot([x], [r["top1"]], ls="none", marker=marker, ms=ms, mec=color if hollow else "white",
                            mew=0.9 if hollow else 0.4, mfc="none" if hollow else color, zorder=zorder)

                for lab, lr in layers["curves"].items():
                    color, marker = style[lab]
                    xs = [r[xcol] + dodge[lab] for r in lr]
                    ax.plot(xs, [r["top1"] for r in lr], color=color, lw=1.0, alpha=0.85, zorder=2)
                    for r, x in zip(lr, xs):
                        draw(r, x, color, marker, 4.0, 3)
                    handles.append(Line2D([], [], color=color, marker=marker, ms=4.0, mec="white", mew=0.4, label=lab))
                for r in layers["points"]:
                    color, _ = style[r["label"]]
                    draw(r, r[xcol], color, "X", 6.0, 5)
                    handles.append(Line2D([], [], ls="none", color=color, marker="X", ms=6.0, mec="white", mew=0.4,
                                          label=_point_label(r, r["label"] in layers["curves"])))
                for r in layers["dense"]:
                    draw(r, r[xcol], "black", "*", 8.0, 6)
                if layers["dense"]:
                    handles.append(Line2D([], [], ls="none", color="black", marker="*", ms=8.0, mec="white",
                                          mew=0.4, label="dense"))
                if layers["hollow"]:
                    handles.append(Line2D([], [], ls="none", color="0.3", marker="o", ms=4.0, mfc="none", mew=0.9,
                                          label="hollow: flagged timing"))
                ax.set_xlabel(xlabel if xcol == "gflops" else _tp_label([r for rs in layers["curves"].values()
                                                                          for r in rs] + layers["points"]
                                                                         + layers["dense"]))
                ax.set_ylabel("Top-1 accuracy (%)")
                if len(models) > 1:
                    ax.set_title(model)
                note = ERRORBAR_NOTE + ("; curves dodged slightly in x" if any(dodge.values()) else "")
                ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.27), ncol=2, frameon=False,
                          handlelength=1.8, columnspacing=1.0, title=note, title_fontsize=6, fontsize=6.5)
                fig.tight_layout()
                suffix = "" if len(models) == 1 else "_" + model.replace("/", "_")
                written += _savefig(fig, plots_dir / f"{fname}{suffix}")
                plt.close(fig)
    return written


def _tp_label(rows) -> str:
    r = rows[0]
    dev = r.get("device") or ""
    extra = f", {dev}" + (f" x{r['threads']}" if r.get("threads") and dev == "cpu" else "")
    if r.get("batch_size"):
        extra += f", batch {r['batch_size']}"
    return f"Throughput (images/s{extra})"


def _yerr(rows):
    lo = [max(0.0, r["top1"] - r["top1_lo"]) if r.get("top1_lo") is not None else 0.0 for r in rows]
    hi = [max(0.0, r["top1_hi"] - r["top1"]) if r.get("top1_hi") is not None else 0.0 for r in rows]
    return [lo, hi]


# --------------------------------------------------------------------------- the report

def ensure_report_writable(out: str | os.PathLike, plots: bool = True) -> None:
    """Refuse, before measuring or reading anything, an ``out`` the tables or plots could not be written to."""
    from .store import ensure_writable_dir

    out = Path(out)
    ensure_writable_dir(out, "output directory")
    for name in TABLE_FILES:
        if (out / name).is_dir():
            raise UserError(f"cannot write {out / name}: it is a directory")
    if plots:
        ensure_writable_dir(out / "plots", "plots directory")


def write_report(out: str | os.PathLike, plots: bool = True) -> dict:
    """Write the tables and plots of ``out`` from its records; returns the rows and paths."""
    from .store import atomic_write_text

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"results directory {out} does not exist")
    ensure_report_writable(out, plots)
    res = collect(out)
    files = []
    for name, fn in (("results.md", markdown), ("results.csv", csv_text), ("results.tex", latex),
                     ("results_paper.tex", latex_paper)):
        p = out / name
        try:
            atomic_write_text(p, fn(res))
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror}") from None
        files.append(p)
    if plots:
        files += plot(res, out / "plots")
    res["files"] = files
    return res


SUMMARY_COLUMNS = ("Method", "Setting", "FLOPs", "Speedup", "Top-1 % [95% CI]", "Flags")


def summary_table(res: dict):
    """A compact rich table of the display rows for the terminal (the full table is results.md).

    At most six columns, which fit 80: numbers are never cut; the setting (parameters, seeds,
    learned parts), the flags and a seed-averaged top-1's interval wrap onto further lines."""
    from rich import box
    from rich.table import Table

    multi = len(_models(res["display"])) > 1
    rows = []
    for r in res["display"]:
        c = display_cells(r)
        setting = c["Params"] if c["Params"] != "–" else ""
        if r.get("learned") not in (None, "none"):
            setting += ("; " if setting else "") + r["learned"]
        top1 = _f(r.get("top1"), ".2f")
        if r["row_type"] == "mean" and r.get("top1_std") is not None:
            top1 += f"±{r['top1_std']:.2f}"
        if r.get("top1_lo") is not None:
            top1 += f" [{r['top1_lo']:.1f}–{r['top1_hi']:.1f}]"  # no space inside: it wraps before the interval
        rows.append(([r["model"]] if multi else []) +
                    [c["Method"], setting or "–", c["FLOPs"], c["Speedup [q1, q3]"].split(" [")[0], top1,
                     c["Flags"]])
    cols = (["Model"] if multi else []) + list(SUMMARY_COLUMNS)
    # columns nothing was measured for (a FLOPs-only sweep's speedup and top-1) are left out
    shown = [j for j, c in enumerate(cols)
             if c in ("Method", "Setting") or any(row[j] not in ("–", "") for row in rows)]
    t = Table(title=f"tokenbench: {Path(res['out'])}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for j in shown:
        c = cols[j]
        t.add_column(c, no_wrap=c in ("Method", "FLOPs", "Speedup"), justify="right" if c in ("FLOPs", "Speedup")
                     else "left", overflow="fold", min_width={"Setting": 16, "Top-1 % [95% CI]": 17}.get(c))
    for row in rows:
        t.add_row(*(row[j] for j in shown))
    return t


# --------------------------------------------------------------------------- paired comparisons

def _parse_selector(text: str) -> tuple[str, dict]:
    """``METHOD`` or ``METHOD:KEY=VALUE,KEY=VALUE`` (values read as in ``--set``)."""
    from .registry import parse_set

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
    return method, parse_set(items)


def _matches(row: dict, method: str, params: dict, by_label: bool = False) -> bool:
    if (row.get("label") if by_label else row["method"]) != method:
        return False
    for k, v in params.items():
        have = row["_params"].get(k)
        if isinstance(v, (int, float)) and isinstance(have, (int, float)) and not isinstance(v, bool):
            if not math.isclose(float(have), float(v), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != v:
            return False
    return True


def _select(rows: list[dict], text: str) -> list[dict]:
    """The rows ``text`` picks: one setting (its seeds, if the method is seeded)."""
    method, params = _parse_selector(text)
    # a sweep entry's label (e.g. [methods.topk-finetuned]) names it; otherwise the method does
    by_label = any(r.get("label") == method and r["method"] != method for r in rows)
    got = [r for r in rows if _matches(r, method, params, by_label)]
    if not got:
        same = sorted({params_text(r) for r in rows if r["method"] == method})
        known = sorted({r["method"] for r in rows})
        hint = (f"; its settings here: {'; '.join(same)}" if same else f"; methods here: {', '.join(known)}")
        raise UserError(f"no accuracy record matches {text!r}{hint}")
    def settings_of(rs):
        return {json.dumps([r.get("label"), r.get("checkpoint"),
                            {k: v for k, v in r["_params"].items() if k != r["_seed_param"]}], sort_keys=True)
                for r in rs}

    settings = settings_of(got)
    own = [r for r in got if r.get("label") == method]
    if len(settings) > 1 and own and len(settings_of(own)) == 1:
        return own  # `topk` is the [methods.topk] entry, not also [methods.topk-finetuned]
    if len(settings) > 1:
        shown = sorted({f"{r.get('label') or r['method']}: {params_text(r)}" for r in got})
        raise UserError(f"{text!r} matches {len(settings)} settings ({'; '.join(shown)}); "
                        "add KEY=VALUE, or name the sweep entry's label, to pick one")
    return got


def paired(out: str | os.PathLike, a: str, b: str) -> dict:
    """McNemar's paired test between two settings measured on the same images in ``out``.

    Each of ``a`` and ``b`` selects one setting (``METHOD:KEY=VALUE,...``); a seeded method
    gives one comparison per seed.  Returns both sides' accuracy and, per pair, the images
    only one side gets right and the exact two-sided p-value.
    """
    from .measure import mcnemar

    res = collect(out)
    rows = [r for r in res["rows"] if r.get("_correct")]
    ra, rb = _select(rows, a), _select(rows, b)

    def side(r):
        return {"method": r["method"], "params": r["_params"], "top1": r["top1"], "top1_ci95": [r["top1_lo"], r["top1_hi"]],
                "n": r["n"], "gflops": r.get("gflops"), "learned": r.get("learned"), "checkpoint": r.get("checkpoint")}

    pairs = []
    for x in ra:
        for y in rb:
            if x.get("_acc_setting") != y.get("_acc_setting") or len(x["_correct"]) != len(y["_correct"]):
                raise UserError(f"{params_text(x)} and {params_text(y)} were not measured on the same images; "
                                "a paired test needs the same data subset")
            m = mcnemar([c == "1" for c in x["_correct"]], [c == "1" for c in y["_correct"]])
            pairs.append({"a": side(x), "b": side(y), "only_a": m["only_a"], "only_b": m["only_b"],
                          "p_value": m["p_value"], "diff": x["top1"] - y["top1"]})
    return {"out": str(out), "a": a, "b": b, "pairs": pairs}
