"""``report.html``: the report as one self-contained page to explore, offline.

Built from the same typed rows as the tables and plots (:func:`tokenbench.report.collect.collect`,
the layers of :func:`tokenbench.report.plot.plot_layers`):

- per model, accuracy against GFLOPs and against the paired speedup (Plotly, its JavaScript
  inlined): hovering a point shows the method, its setting, FLOPs, the speedup with its
  quartiles, top-1 with its 95% interval, McNemar's p against dense and the flags; the legend is
  grouped by family (clicking a family's title hides or shows it), and family boxes above the
  plots filter plots and table together;
- a table of every setting, sorted by clicking a column's header;
- the token pictures and analysis figures found beside the records (linked relatively, so the
  page stays small and the images load from the results folder it sits in).

The data behind the page is embedded as JSON: ``<script id="tb-points">`` holds one entry per
setting, and each ``<script class="tb-figure">`` one Plotly figure.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .render import NONE, num, p_value_text, sig, speedup_text
from .plot import ERRORBAR_NOTE, plot_layers
from .stats import params_text
from .plot import DENSE_ERRORBAR_NOTE
from .tables import (FLAG_HELP, display_rows, flags_text, flops_cell, iou_test_text, miou_text, models_of,
                     setting_line, top1_text)

HTML_FILE = "report.html"
_IDS: dict[int, int] = {}  # a row's index in the page's points while one page is built
# Plotly marker symbols per family (the static plots' markers, in Plotly's names)
FAMILY_SYMBOLS = {"pruning": "circle", "merging": "square", "hybrid": "diamond", "baseline": "x", "none": "star"}
OTHER_SYMBOL = "triangle-up"
# where pictures are looked for, relative to the results folder (the sibling ``figures`` folder
# holds the repository's token pictures next to the committed sweeps)
PICTURE_DIRS = ("analysis/plots", "figures", "visuals", "../figures")
PALETTE = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133",
           "#56b4e9", "#023eff", "#ff7c00", "#1ac938", "#e8000b", "#8b2be2", "#9f4800", "#f14cc1", "#a3a3a3",
           "#b8850a", "#006374"]
AXES = (("gflops", "Computation (GFLOPs per image)"), ("speedup", "Speedup over dense (paired)"))


def _finite(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def _point(i: int, r) -> dict:
    """One setting, as the page's JSON holds it."""
    return {"id": i, "model": r.model, "label": r.label, "method": r.method, "family": r.family or "other",
            "setting": params_text(r), "target": r.target, "gflops": _finite(r.gflops),
            "flops_rel": _finite(r.flops_rel), "speedup": _finite(r.speedup), "speedup_q1": _finite(r.speedup_q1),
            "speedup_q3": _finite(r.speedup_q3), "img_per_s": _finite(r.img_per_s), "top1": _finite(r.top1),
            "top1_lo": _finite(r.top1_lo), "top1_hi": _finite(r.top1_hi), "top5": _finite(r.top5),
            "mcnemar_p": _finite(r.mcnemar_p), "flags": flags_text(r), "dense": r.is_dense, "line_of": r.line_of,
            "task": r.task, "miou": _finite(r.miou), "miou_lo": _finite(r.miou_lo), "miou_hi": _finite(r.miou_hi),
            "pixel_accuracy": _finite(r.pixel_accuracy), "gflops_backbone": _finite(r.gflops_backbone),
            "iou_diff": _finite(r.iou_diff), "iou_p": _finite(r.iou_p)}


def _hover(r) -> str:
    mc = NONE if r.mcnemar_p is None else p_value_text(r.mcnemar_p)
    lines = [f"<b>{html.escape(r.label)}</b> ({html.escape(r.method)}, {html.escape(r.family or 'other')})",
             f"setting: {html.escape(params_text(r))}",
             f"FLOPs: {flops_cell(r)} ({sig(r.gflops)} GFLOPs)",
             f"speedup: {speedup_text(r.speedup, r.speedup_q1, r.speedup_q3, r.is_dense)}",
             f"top-1: {top1_text(r)} %",
             f"McNemar p vs dense: {mc}"]
    if r.is_seg:  # mIoU, pixel accuracy and the paired IoU test in place of top-1 and McNemar
        lines[2] += f", backbone {sig(r.gflops_backbone)}"
        lines[-2:] = [f"mIoU: {miou_text(r)} %", f"pixel accuracy: {num(r.pixel_accuracy, '.2f')} %",
                      f"IoU vs dense (pts): {iou_test_text(r)}"]
    if r.flags:
        lines.append(f"flags: {html.escape(flags_text(r))}")
    return "<br>".join(lines)


def _trace(rows, xs, name, family, color, symbol, hollow, mode, dash=None, size=9, show_legend=True) -> dict:
    fam = family or "other"
    return {
        "type": "scatter", "mode": mode, "name": name, "legendgroup": fam, "legendgrouptitle": {"text": fam},
        "showlegend": show_legend, "meta": {"family": fam, "kind": "setting"},
        "x": xs, "y": [r.score for r in rows], "customdata": [_IDS.get(id(r)) for r in rows],
        "text": [_hover(r) for r in rows], "hovertemplate": "%{text}<extra></extra>",
        "error_y": {"type": "data", "symmetric": False, "thickness": 1, "width": 2, "color": color,
                    "array": [max(0.0, r.score_hi - r.score) if r.score_hi is not None else 0.0 for r in rows],
                    "arrayminus": [max(0.0, r.score - r.score_lo) if r.score_lo is not None else 0.0 for r in rows]},
        "line": {"color": color, "width": 1.5, **({"dash": dash} if dash else {})},
        "marker": {"color": color, "size": size, "line": {"color": color, "width": 1.5},
                   "symbol": [symbol + ("-open" if id(r) in hollow else "") for r in rows]},
    }


def _figure(rows, xcol: str, xlabel: str, colors: dict, title: str) -> Optional[dict]:
    """One Plotly figure (as a dict) of ``rows`` on ``xcol``, or None when nothing can be drawn."""
    layers = plot_layers(rows, xcol)
    xv, hollow = layers["x"], layers["hollow"]
    traces = []
    front = layers["frontier"]
    if len(front) > 1:
        traces.append({"type": "scatter", "mode": "lines", "name": "Pareto frontier", "hoverinfo": "skip",
                       "x": [p[0] for p in front], "y": [p[1] for p in front],
                       "line": {"color": "rgba(120,120,120,0.35)", "width": 8,
                                "shape": "hv" if xcol == "gflops" else "vh"},
                       "meta": {"family": "frontier", "kind": "frontier"}, "legendgroup": "frontier"})
    for lab, lr in layers["curves"].items():
        fam = lr[0].family
        traces.append(_trace(lr, [xv[id(r)] for r in lr], lab, fam, colors[lab], FAMILY_SYMBOLS.get(fam, OTHER_SYMBOL),
                             hollow, "lines+markers", "dash" if fam == "baseline" else None))
    for r in layers["points"]:
        name = r.label if r.label not in layers["curves"] else f"{r.label} {params_text(r)}, off-grid"
        traces.append(_trace([r], [xv[id(r)]], name, r.family, colors[r.label],
                             FAMILY_SYMBOLS.get(r.family, OTHER_SYMBOL), hollow, "markers", size=12))
    others = [r for r in layers["line"] if r.line_of]
    if others:
        traces.append(_trace(others, [xv[id(r)] for r in others], "dense models of other sizes", "baseline", "#222222",
                             "cross", hollow, "markers"))
    if layers["dense"]:
        traces.append(_trace(layers["dense"], [xv[id(r)] for r in layers["dense"]], "dense", "none", "#000000",
                             "star", hollow, "markers", size=15))
    if len(traces) <= (1 if len(front) > 1 else 0):
        return None
    seg = any(r.is_seg for r in rows)
    layout = {"title": {"text": title, "font": {"size": 14}}, "template": "plotly_white", "height": 560,
              "xaxis": {"title": {"text": xlabel}},
              "yaxis": {"title": {"text": "mIoU (%)" if seg else "Top-1 accuracy (%)"}},
              "legend": {"groupclick": "togglegroup", "tracegroupgap": 6, "font": {"size": 11}},
              "hovermode": "closest", "margin": dict(l=60, r=20, t=50, b=90),
              "annotations": [{"text": (DENSE_ERRORBAR_NOTE if seg else ERRORBAR_NOTE) + "; hollow: flagged or unpaired timing", "showarrow": False,
                               "xref": "paper", "yref": "paper", "x": 0, "y": -0.2, "font": {"size": 10}}]}
    return {"data": traces, "layout": layout}


def _table(points: list[dict], rows, multi: bool) -> str:
    cols = (["Model"] if multi else []) + ["Method", "Family", "Setting", "FLOPs", "GFLOPs", "Speedup [q1, q3]",
                                           "img/s", "Top-1 % [95% CI]", "Top-5 %", "McNemar p", "Flags"]
    seg = any(r.is_seg for r in rows)
    if seg:
        cols[-4:-1] = ["mIoU % [95% CI]", "Pixel acc. %", "IoU vs dense (pts), p"]
    head = "".join(f'<th data-col="{i}" title="click to sort">{html.escape(c)}</th>' for i, c in enumerate(cols))
    body = []
    for p, r in zip(points, rows):
        cells = ([(r.model, r.model)] if multi else []) + [
            (r.label, r.label), (p["family"], p["family"]), (params_text(r), params_text(r)),
            (flops_cell(r), p["flops_rel"]), (sig(r.gflops), p["gflops"]),
            (speedup_text(r.speedup, r.speedup_q1, r.speedup_q3, r.is_dense), p["speedup"]),
            (num(r.img_per_s, ".0f"), p["img_per_s"]), (top1_text(r), p["top1"]), (num(r.top5, ".2f"), p["top5"]),
            (NONE if r.mcnemar_p is None else p_value_text(r.mcnemar_p), p["mcnemar_p"]), (flags_text(r), flags_text(r))]
        if seg:
            cells[-4:-1] = [(miou_text(r), p["miou"]), (num(r.pixel_accuracy, ".2f"), p["pixel_accuracy"]),
                            (iou_test_text(r), p["iou_diff"])]
        tds = "".join(f'<td data-v="{html.escape(str("" if v is None else v))}">{html.escape(str(t))}</td>'
                      for t, v in cells)
        body.append(f'<tr data-family="{html.escape(p["family"])}">{tds}</tr>')
    return f'<table id="tb-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def pictures(out: Path) -> list[Path]:
    """The PNG pictures of the token reductions and the analysis found for ``out`` (see PICTURE_DIRS)."""
    found: list[Path] = []
    for sub in PICTURE_DIRS:
        d = (out / sub)
        if d.is_dir():
            found += sorted(p for p in d.glob("*.png") if p.is_file())
    return list(dict.fromkeys(p.resolve() for p in found))


def _pictures_html(out: Path) -> str:
    pics = pictures(out)
    if not pics:
        return ""
    items = []
    for p in pics:
        rel = Path(os.path.relpath(p, out.resolve())).as_posix()
        items.append(f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" loading="lazy" '
                     f'alt="{html.escape(p.stem)}"></a><figcaption>{html.escape(rel)}</figcaption></figure>')
    return '<h2>Token pictures and analysis figures</h2><div class="pics">' + "".join(items) + "</div>"


def _json_script(obj, attrs: str) -> str:
    text = json.dumps(obj, allow_nan=False, default=str).replace("</", "<\\/")
    return f'<script type="application/json" {attrs}>{text}</script>'


def plotly_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("plotly") is not None


def html_page(res: dict) -> str:
    """The page's text from a collected report (:func:`tokenbench.report.collect.collect`)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise UserError("the HTML report needs plotly: pip install plotly") from None
    out = Path(res["out"])
    disp = [r for r in display_rows(res)]
    _IDS.clear()
    _IDS.update({id(r): i for i, r in enumerate(disp)})
    points = [_point(i, r) for i, r in enumerate(disp)]
    labels = list(dict.fromkeys(r.label for r in disp if not r.is_dense))
    colors = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    drawn = [r for r in disp if r.score is not None]
    what = "mIoU" if any(r.is_seg for r in disp) else "top-1"
    models = models_of([r for r in drawn if not r.line_of])
    figs = []
    for model in models:
        rows = [r for r in drawn if r.model == model or r.line_of == model]
        for xcol, xlabel in AXES:
            fig = _figure(rows, xcol, xlabel, colors, f"{model}: {what} against {xlabel.split(' (')[0].lower()}")
            if fig is not None:
                figs.append(fig)
    families = sorted({p["family"] for p in points})
    plan = res.get("plan") or {}
    title = plan.get("sweep", {}).get("name") or out.name
    desc = plan.get("sweep", {}).get("description") or ""
    used = sorted({f for r in disp for f in r.flags})
    flag_items = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape(FLAG_HELP.get(f, f))}</li>" for f in used)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res.get("notes") or [])
    boxes = "".join(f'<label><input type="checkbox" class="tb-family" value="{html.escape(f)}" checked> '
                    f'{html.escape(f)}</label>' for f in families)
    fig_html = "".join(f'<div class="tb-plot" id="tb-plot-{i}"></div>' +
                       _json_script(f, f'class="tb-figure" data-target="tb-plot-{i}"') for i, f in enumerate(figs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>tokenbench report: {html.escape(title)}</title>
<style>{_CSS}</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>tokenbench report: {html.escape(title)}</h1>
<p>{html.escape(desc)}</p>
<p>{html.escape(setting_line(res))} {len(points)} settings; hover a point for its numbers.</p>
<div id="tb-filter">Families: {boxes}</div>
<div class="plots">{fig_html}</div>
<h2>All settings</h2>
<p>Click a column's header to sort. Speedup: paired with the dense model, median over rounds with its
quartiles. {_score_text(what)}</p>
{_table(points, disp, len(models) > 1)}
{"<h2>Flags</h2><ul>" + flag_items + "</ul>" if flag_items else ""}
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
{_pictures_html(out)}
{_json_script(points, 'id="tb-points"')}
<script>{_JS}</script>
</body></html>
"""


def _score_text(what: str) -> str:
    if what == "mIoU":
        return ("mIoU: one confusion matrix over the set, with its 95% bootstrap interval over images; GFLOPs of "
                "backbone and decoder. IoU vs dense: mean per-image IoU difference from the dense model (points), "
                "its 95% bootstrap interval and the Wilcoxon signed-rank p.")
    return "Top-1: with its 95% Wilson interval. McNemar p: exact test against the dense model on the same images."


def write_html(res: dict) -> Path:
    """Write ``<out>/report.html`` from a collected report; returns its path."""
    from ..store import write_texts

    return write_texts({Path(res["out"]) / HTML_FILE: html_page(res)})[0]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.5em}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:1em}
.tb-plot{min-height:560px;border:1px solid #eee}
#tb-filter label{margin-right:1em;cursor:pointer}
table{border-collapse:collapse;font-size:0.85em}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;white-space:nowrap}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
tr:nth-child(even){background:#fafafa}
.pics{display:flex;flex-wrap:wrap;gap:1em}
.pics figure{margin:0;max-width:480px} .pics img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.8em;color:#555}
"""

_JS = """
(function(){
  var plots = [];
  document.querySelectorAll('script.tb-figure').forEach(function(s){
    var fig = JSON.parse(s.textContent);
    var div = document.getElementById(s.getAttribute('data-target'));
    Plotly.newPlot(div, fig.data, fig.layout, {responsive: true, displaylogo: false});
    plots.push(div);
  });
  function hidden(){
    var h = {};
    document.querySelectorAll('input.tb-family').forEach(function(c){ if(!c.checked) h[c.value] = true; });
    return h;
  }
  function applyFilter(){
    var h = hidden();
    plots.forEach(function(div){
      var vis = div.data.map(function(t){ return (t.meta && h[t.meta.family]) ? false : true; });
      Plotly.restyle(div, {visible: vis});
    });
    document.querySelectorAll('#tb-table tbody tr').forEach(function(tr){
      tr.style.display = h[tr.getAttribute('data-family')] ? 'none' : '';
    });
  }
  document.querySelectorAll('input.tb-family').forEach(function(c){ c.addEventListener('change', applyFilter); });
  var table = document.getElementById('tb-table');
  table.querySelectorAll('th').forEach(function(th){
    th.addEventListener('click', function(){
      var col = +th.getAttribute('data-col');
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(o){ o.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (x === '' ? 1 : y === '' ? -1 : x.localeCompare(y));
        return asc ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
})();
"""
