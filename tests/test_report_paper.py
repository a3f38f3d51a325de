"""Tables and plots a paper can use (compact table, controls apart from curves,
a visible Pareto frontier, error bars explained, flagged timings hollow)."""

import pytest

from tokenbench.report.write import TABLE_FILES
from tokenbench.report.tables import latex, latex_paper
from conftest import plotted_figures
from tokenbench.report.plot import plot_layers
from tokenbench.report.rows import Row


def _row(label, method, params, gflops, top1, targets=(), img=None, flags=(), checkpoint=None, learned="none"):
    r = Row(model="m", label=label, method=method, params=dict(params), targets=list(targets),
            gflops=gflops, flops_rel=gflops / 0.05, top1=top1, top1_lo=top1 - 0.9, top1_hi=top1 + 0.9,
            top5=99.0, n=5000, params_m=0.93, device="cpu", device_name="cpu", threads=2,
            batch_size=64, precision="fp32", learned=learned, checkpoint=checkpoint, flags=set(flags), tolerance=0.03)
    if img is not None:
        r = r.replace(img_per_s=img, img_per_s_q1=img - 5, img_per_s_q3=img + 5, speedup=img / 900)
    return r


@pytest.fixture
def res(tmp_path):
    rows = [
        _row("dense", "none", {}, 0.05, 88.8, img=900),
        _row("tome", "tome", {"r": [5] + [4] * 11, "prop_attn": True}, 0.026, 88.4, [0.5], img=1180),
        _row("tome", "tome", {"r": [3] * 3 + [2] * 9, "prop_attn": True}, 0.036, 88.8, [0.7], img=960),
        _row("topk", "topk", {"keep_rate": 0.48}, 0.026, 85.4, [0.5], img=1630),
        _row("topk", "topk", {"keep_rate": 0.755}, 0.036, 87.6, [0.7], img=1160, flags=("noisy",)),
        _row("topk", "topk", {"keep_rate": 0.7}, 0.034, 87.5, img=1150),  # off-grid: no FLOPs target
        _row("dynamicvit", "dynamicvit", {"keep_rate": 0.5}, 0.026, 87.7, img=1420, checkpoint="a/model.pt",
             learned="fine-tuned"),
        _row("dynamicvit", "dynamicvit", {"keep_rate": 0.7}, 0.034, 88.5, img=1030, checkpoint="b/model.pt",
             learned="fine-tuned", flags=("busy",)),
        _row("topk-finetuned", "topk", {"keep_rate": 0.7}, 0.034, 88.4, img=1200, checkpoint="c/model.pt",
             learned="fine-tuned"),
    ]
    return {"rows": rows, "display": rows, "notes": [], "plan": None, "out": tmp_path}


def test_compact_paper_table_fits_a_column(res):
    tex = latex_paper(res)
    body = [ln for ln in tex.splitlines() if ln.endswith("\\\\")]
    assert "\\begin{tabular}{llrrr}" in tex and len(body) == 1 + len(res["display"])
    assert body[0] == "Method & Setting & GFLOPs & Speedup & Top-1 (\\%) \\\\"
    assert all(ln.count("&") == 4 for ln in body)
    assert "tome & r=[5,4x11] & 0.0260 & 1.31$\\times$ & 88.40 $\\pm$ 0.9 \\\\" in body  # no default prop_attn
    assert any(ln.startswith("topk & keep\\_rate=0.755") and "$^\\dagger$" in ln for ln in body)  # noisy timing
    assert any(ln.startswith("dynamicvit (fine-tuned) & keep\\_rate=0.7 ") for ln in body)
    assert "95% Wilson" in tex and "$^\\dagger$ timing flagged" in tex


def test_full_table_says_constant_columns_once(res):
    tex = latex(res)
    body = [ln for ln in tex.splitlines() if ln.endswith("\\\\")]
    assert "cpu x2" not in "".join(body) and "% same in every row: Device: cpu x2" in tex
    assert body[0].startswith("Method & Setting & Target") and "Params (M)" not in body[0]
    assert len({ln.count("&") for ln in body}) == 1


def test_report_writes_the_paper_table():
    assert "results_paper.tex" in TABLE_FILES


def test_controls_and_off_grid_runs_are_not_part_of_a_curve(res):
    layers = plot_layers(res["display"], "gflops")
    curve = layers["curves"]
    assert [r.params["keep_rate"] for r in curve["topk"]] == [0.48, 0.755]  # the off-grid 0.7 is not spliced in
    assert len(curve["tome"]) == 2 and len(curve["dynamicvit"]) == 2   # a method trained at two settings
    assert "topk-finetuned" not in curve
    assert sorted((r.label, r.params["keep_rate"]) for r in layers["points"]) == [
        ("topk", 0.7), ("topk-finetuned", 0.7)]
    assert not layers["hollow"]  # flags concern timing: only the throughput axis shows them
    tp = plot_layers(res["display"], "img_per_s")
    assert {(r.label, r.params["keep_rate"]) for r in res["display"] if id(r) in tp["hollow"]} == {
        ("topk", 0.755), ("dynamicvit", 0.7)}


def test_plots_explain_error_bars_show_the_frontier_and_hollow_flags(res, monkeypatch, tmp_path):
    figs = plotted_figures(res, tmp_path, monkeypatch)
    for name, fig in figs.items():
        ax = fig.axes[0]
        leg = fig.legends[0]  # below the axes, in columns
        assert "95% Wilson interval" in leg.get_title().get_text()
        labels = [t.get_text() for t in leg.get_texts()]
        assert "Pareto frontier" in labels and "topk-finetuned" in labels and "topk keep_rate=0.7, off-grid" in labels
        frontier = [ln for ln in ax.get_lines() if ln.get_zorder() == 0]
        assert len(frontier) == 1 and frontier[0].get_linewidth() >= 3  # a wide band behind everything
        hollow = [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")
                  and str(ln.get_markerfacecolor()) == "none"]
        if name == "accuracy_vs_throughput":
            assert "hollow: flagged timing" in labels and len(hollow) == 2
        else:
            assert not hollow and "hollow: flagged timing" not in labels
