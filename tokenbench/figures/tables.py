"""A figure's rows (ours beside the published figures they match) and its tables: NAME.md, NAME.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .plan import Plan, measure_command
from .recipe import GFLOPS_AGREEMENT, Published, arch, matches, weights_same
from ..report.render import csv_table, fmt_value, interval_text, markdown_table, num, signed, tokens_text
from ..report.render import params_text as _params_text
from ..report.rows import DENSE_METHOD, Row, method_family

FLAG_HELP = {
    "gflops-differs": f"our GFLOPs differ from the published value by more than {GFLOPS_AGREEMENT}",
    "weights-differ": "our top-1 is of other weights than the published one (e.g. off the shelf vs trained)",
    "flops-miss": "FLOPs land further than the tolerance from the matched-FLOPs target",
    "noisy": "throughput interquartile range above 10% of the median",
    "busy": "the machine was busy while timing",
    "incomplete": "a planned measurement is missing (rerun to complete)",
    "warning": "the records carry warnings",
}


def _row_run_index(keys: list[dict]) -> dict[str, int]:
    return {kk["flops"]: i for i, kk in enumerate(keys) if "flops" in kk}


def _weights_text(weights: Optional[str], checkpoint: Optional[str]) -> str:
    if checkpoint:
        return f"checkpoint {Path(checkpoint).name}"
    if not weights:
        return "–"
    if weights.startswith("random-init"):
        return "random-init"
    return weights


def ours_from_row(r: Row, frec: Optional[dict], why: str = "") -> dict:
    """Our side of a figure row: the report's row, with the tokens per block and weights of its FLOPs record."""
    fm = (frec or {}).get("metrics", {})
    return {
        "model": r.model, "label": r.label, "method": r.method, "params": dict(r.params),
        "seeds": r.seeds, "target": r.target, "targets": r.targets or [],
        "tokens": fm.get("tokens"), "tokens_mlp": fm.get("tokens_mlp"),
        "gflops": r.gflops, "flops_rel": r.flops_rel, "img_per_s": r.img_per_s, "speedup": r.speedup,
        "top1": r.top1, "top1_lo": r.top1_lo, "top1_hi": r.top1_hi, "n": r.n,
        "weights": (frec or {}).get("weights"), "checkpoint": r.checkpoint, "family": r.family,
        "learned": r.learned, "accuracy_status": "measured" if r.top1 is not None else (why or "not measured"),
        "report_flags": sorted(r.flags), "warnings": r.warnings or [],
        "device": r.device, "device_name": r.device_name, "threads": r.threads, "batch_size": r.batch_size,
    }


def collect_figure(plan: Plan, runs: list, keys: list[dict], status: list[tuple[bool, str]], searcher=None) -> dict:
    """Figure rows: each of our rows beside every published figure it matches, and the differences."""
    from ..report.collect import collect
    from ..store import Store

    res = collect(plan.out)
    store = Store(plan.out)
    idx = _row_run_index(keys)
    rows: list[dict] = []
    used: set[int] = set()
    for r in res["display"]:
        i = idx.get(r.keys.get("flops"))
        frec = store.get(r.keys["flops"]) if r.keys.get("flops") else None
        params = dict(r.params)
        ok, why = status[i] if i is not None else (False, "")
        ours = ours_from_row(r, frec, why)
        pubs = [p for p in plan.published if matches(p, r.model, r.method, params)]
        for p in pubs:
            used.add(p.row)
        for p in pubs or [None]:
            rows.append(compare_row(ours, p, in_recipe=True))
    # published figures of the recipe's models that no run reproduces: our GFLOPs for the same configuration
    extra = []
    if searcher is not None:
        for p in plan.published:
            if p.row in used:
                continue
            model = next((m for m in plan.sweep.models if arch(m) == arch(p.model)), None)
            if model is None:
                continue
            from ..registry import get_method

            try:
                params = get_method(p.method).validate(dict(p.params))
                g = searcher.count(model, plan.sweep.img_size, p.method, params)
            except UserError:
                continue
            ours = {"model": model, "label": "dense" if p.method == DENSE_METHOD else p.method, "method": p.method,
                    "family": method_family(p.method),
                    "params": params, "seeds": None, "target": None, "targets": [], "tokens": None,
                    "tokens_mlp": None, "gflops": g, "flops_rel": None, "img_per_s": None, "speedup": None,
                    "top1": None, "top1_lo": None, "top1_hi": None, "n": None, "weights": None, "checkpoint": None,
                    "learned": None, "accuracy_status": "not in this recipe's runs (GFLOPs only)",
                    "report_flags": [], "warnings": []}
            extra.append(compare_row(ours, p, in_recipe=False))
    return {"rows": rows, "extra": extra, "res": res, "plan": plan}


def compare_row(ours: dict, p: Optional[Published], in_recipe: bool) -> dict:
    row = dict(ours)
    row["in_recipe"] = in_recipe
    flags = set(ours["report_flags"])
    row.update({"paper": None, "source": None, "source_row": None, "gflops_published": None, "gflops_diff": None,
                "speedup_published": None, "speedup_diff": None, "top1_published": None, "top1_diff": None,
                "weights_published": None, "hardware_published": None, "throughput_published": None,
                "dense_throughput_published": None, "weights_same": None})
    if p is not None:
        row.update({"paper": p.paper, "source": p.source, "source_row": p.row, "gflops_published": p.gflops,
                    "speedup_published": p.speedup, "top1_published": p.top1, "weights_published": p.weights,
                    "hardware_published": p.hardware, "throughput_published": p.throughput,
                    "dense_throughput_published": p.dense_throughput})
        if p.gflops is not None and ours["gflops"] is not None:
            row["gflops_diff"] = ours["gflops"] - p.gflops
            if abs(row["gflops_diff"]) > GFLOPS_AGREEMENT + 1e-9:
                flags.add("gflops-differs")
        if p.speedup is not None and ours["speedup"] is not None:
            row["speedup_diff"] = ours["speedup"] - p.speedup
        if p.top1 is not None and ours["top1"] is not None:
            row["top1_diff"] = ours["top1"] - p.top1
            row["weights_same"] = weights_same(p, ours["weights"] or "", ours["checkpoint"])
            if not row["weights_same"]:
                flags.add("weights-differ")
    row["flags"] = sorted(flags)
    return row


# --------------------------------------------------------------------------- tables

CSV_COLUMNS = ["in_recipe", "model", "label", "method", "family", "params", "target", "tokens", "tokens_mlp",
               "gflops", "gflops_published", "gflops_diff", "flops_rel", "img_per_s", "speedup", "speedup_published",
               "speedup_diff", "top1", "top1_lo", "top1_hi", "n", "top1_published", "top1_diff", "accuracy_status",
               "weights", "checkpoint", "weights_published", "paper", "source", "hardware_published",
               "throughput_published", "dense_throughput_published", "device", "device_name", "threads",
               "batch_size", "flags"]


_f = num  # older names, still imported
_signed = signed


def params_text(row: dict) -> str:
    """A figure row's parameters (and its number of seeds)."""
    return _params_text(row["params"], len(row["seeds"]) if row.get("seeds") else None)


def row_cells(row: dict, src: dict[int, int], matched: bool) -> list[str]:
    top1 = "not measured"
    if row["top1"] is not None:
        top1 = f"{row['top1']:.2f}" + interval_text(row.get("top1_lo"), row.get("top1_hi"))
    elif not row["in_recipe"]:
        top1 = "–"
    cells = [row["label"], params_text(row)]
    if matched:
        cells.append(row.get("target") or "–")
    x = "x"
    cells += [
        row.get("family") or "–",
        tokens_text(row.get("tokens")),
        num(row["gflops"], ".3f"), num(row["gflops_published"], ".1f"), signed(row["gflops_diff"], ".2f"),
        num(row["img_per_s"], ".1f"), num(row["speedup"], ".2f") + (x if row["speedup"] is not None else ""),
        num(row["speedup_published"], ".2f") + (x if row["speedup_published"] is not None else ""),
        top1, num(row["top1_published"], ".2f"), signed(row["top1_diff"], ".2f"),
        _weights_text(row["weights"], row["checkpoint"]) if row["in_recipe"] else "–",
        f"[{src[row['source_row']]}]" if row.get("source_row") else "–",
        ", ".join(row["flags"]),
    ]
    return cells


def markdown(fig: dict) -> str:
    plan: Plan = fig["plan"]
    rows, extra = fig["rows"], fig["extra"]
    matched = plan.recipe.x == "target"
    cols = ["Method", "Params"] + (["Target"] if matched else []) + [
        "Family", "Tokens per block", "GFLOPs", "GFLOPs pub.", "Δ GFLOPs", "img/s", "Speedup", "Speedup pub.",
        "Top-1 %", "Top-1 pub.", "Δ Top-1", "Weights (ours)", "Src", "Flags"]
    # footnotes: published sources in order of first use
    src: dict[int, int] = {}
    for r in rows + extra:
        if r.get("source_row") and r["source_row"] not in src:
            src[r["source_row"]] = len(src) + 1
    by_row = {p.row: p for p in plan.published}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"# Figure {plan.name}", ""]
    if plan.recipe.description:
        lines += [plan.recipe.description + ("" if not plan.embedded else
                                             f" — on the embedded Fashion-MNIST model (`{', '.join(models)}`)."), ""]
    weights = sorted({_weights_text(r["weights"], r["checkpoint"]) for r in rows})
    lines.append(f"Model: {', '.join(models)}; weights: {', '.join(weights)}.")
    from ..report.tables import setting_line

    lines += [setting_line(fig["res"]), ""]

    several = len(models) > 1  # a recipe of several sizes: a model column first

    def table(rs):
        return markdown_table((["Model"] if several else []) + cols,
                              (([r["model"]] if several else []) + row_cells(r, src, matched) for r in rs))

    lines += table(rows) + [""]
    if extra:
        lines += ["Published figures of this model that none of the runs above reproduces (our GFLOPs counted "
                  "for the same configuration):", ""]
        lines += table(extra) + [""]
    lines += _notes(fig, src, by_row)
    return "\n".join(lines) + "\n"


def gflops_agreement(fig: dict) -> dict:
    """How many published GFLOPs values ours agree with (within GFLOPS_AGREEMENT)."""
    pairs = [r for r in fig["rows"] + fig["extra"] if r["gflops_diff"] is not None]
    differ = [r for r in pairs if abs(r["gflops_diff"]) > GFLOPS_AGREEMENT + 1e-9]
    return {"compared": len(pairs), "agree": len(pairs) - len(differ),
            "differ": [{"label": r["label"], "params": r["params"], "ours": r["gflops"],
                        "published": r["gflops_published"], "source_row": r["source_row"]} for r in differ],
            "max_abs_diff": max((abs(r["gflops_diff"]) for r in pairs), default=None)}


def _notes(fig: dict, src: dict[int, int], by_row: dict[int, Published]) -> list[str]:
    plan: Plan = fig["plan"]
    rows = fig["rows"]
    lines = []
    ag = gflops_agreement(fig)
    if plan.embedded:
        lines.append("Published figures: none (they are of ImageNet models; this is the embedded Fashion-MNIST "
                     "model, so only ours are shown).")
    elif plan.options.model and not plan.published:
        lines.append(f"Published figures: none match (the recipe's model was replaced by {plan.options.model}).")
    elif ag["compared"]:
        s = (f"GFLOPs agreement: {ag['agree']} of {ag['compared']} published values within {GFLOPS_AGREEMENT:g} "
             f"of ours (largest difference {ag['max_abs_diff']:.3f}).")
        if ag["differ"]:
            s += " Differing: " + "; ".join(f"{d['label']} ({', '.join(f'{k}={fmt_value(v)}' for k, v in d['params'].items())}): "
                                            f"{d['ours']:.3f} vs {d['published']:.1f} [{src.get(d['source_row'])}]"
                                            for d in ag["differ"]) + "."
        lines.append(s)
    nopub = ([r for r in rows if r["paper"] is None]
             if not plan.embedded and (not plan.options.model or plan.published) else [])
    if nopub:
        lines.append(f"{len(nopub)} row(s) have no published counterpart in the recipe's papers "
                     f"({', '.join(plan.recipe.papers)}): published cells –.")
    lines += ["",
              "GFLOPs: fvcore, one multiply-add = one FLOP, per image, the method's own scoring/prediction modules "
              "included; published GFLOPs are rounded by the papers to 0.1. Tokens per block: the sequence entering "
              "each block (class token included; `197x3` = 197 in three blocks). Speedup: throughput over the dense "
              "model's, ours on our device, published = the paper's method over the paper's own dense model on the "
              "paper's hardware (never our throughput against theirs). Top-1: 95% Wilson interval.", ""]
    missing = [r for r in rows if r["top1"] is None]
    if missing:
        reasons = sorted({r["accuracy_status"] for r in missing})
        lines.append(f"Top-1 not measured for {len(missing)} of {len(rows)} rows: " + "; ".join(reasons) + ".")
        lines.append(f"To measure it: `{measure_command(plan)}`.")
        need = [s for s in plan.checkpoints.values()]
        if need:
            lines.append("Checkpoints it looks for in --checkpoint-dir:")
            for s in need:
                have = plan.found.get(s.label)
                lines.append(f"- `{s.file}` ({s.label}): {s.help}" + (
                    f" [found: {', '.join(Path(p).name for p in have.values())}]" if have else ""))
        lines.append("")
    if plan.dropped:
        lines += [f"Entries left out: {', '.join(plan.dropped)} (their checkpoint is missing, or they do not apply "
                  "to this model).", ""]
    if src:
        lines.append("Sources of the published figures:")
        for row_no, n in sorted(src.items(), key=lambda kv: kv[1]):
            p = by_row[row_no]
            extra = []
            if p.weights:
                extra.append(f"weights {p.weights}")
            if p.hardware:
                extra.append(f"throughput on {p.hardware}, dense {p.dense_throughput:g} img/s" if p.dense_throughput
                             else f"throughput on {p.hardware}")
            if p.note:
                extra.append(p.note)
            lines.append(f"[{n}] {p.paper}: {p.source}" + (f" ({'; '.join(extra)})" if extra else "") +
                         f" — published.csv row {p.row}.")
        lines.append("")
    used = sorted({f for r in rows + fig["extra"] for f in r["flags"]})
    if used:
        lines += ["Flags: " + "; ".join(f"**{f}**: {FLAG_HELP.get(f, f)}" for f in used) + ".", ""]
    warn = sorted({f"- {r['label']} ({params_text(r)}): {w}" for r in rows for w in r["warnings"]})
    if warn:
        lines += ["Warnings:"] + warn + [""]
    if fig["res"]["notes"]:
        lines += ["Notes:"] + [f"- {n}" for n in fig["res"]["notes"]] + [""]
    return lines


def csv_text(fig: dict) -> str:
    def cell(r: dict, k: str):
        v = r.get(k)
        if k in ("params", "tokens", "tokens_mlp") and v is not None:
            return json.dumps(v)
        return ",".join(v) if k == "flags" else v

    return csv_table(CSV_COLUMNS, fig["rows"] + fig["extra"], cell)


def public_rows(fig: dict) -> list[dict]:
    """The rows as plain JSON-able dicts (the CSV's columns)."""
    return [{k: r.get(k) for k in CSV_COLUMNS} for r in fig["rows"] + fig["extra"]]
