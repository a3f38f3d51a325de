"""The report's accuracy plots stay readable with every method of the default sweep: the legend
beside (never over) the axes and the x label, at least four y ticks, and the speedup axis drawn
from paired timings (an unpaired run hollow and off the frontier)."""

import pytest

from conftest import plotted_figures
from tokenbench.report.plot import plot_layers
from tokenbench.report.rows import Row

MIN_Y_TICKS = 4

METHODS = ["tome", "topk", "evit", "random", "dynamicvit", "ppt", "mctf", "pitome", "tofu", "diffrate",
           "zerotprune", "dct", "kmedoids", "dpcknn", "extra1", "extra2"]


def _row(label, gflops, top1, target=None, speedup=None, img=None, flags=(), dense=False):
    return Row(model="m", label=label, method="none" if dense else label,
               params={} if dense else {"keep_rate": gflops / 0.05}, targets=[target] if target else [], gflops=gflops,
               flops_rel=gflops / 0.05, top1=top1, top1_lo=top1 - 0.9, top1_hi=top1 + 0.9, top5=99.0,
               n=5000, params_m=0.93, device="cpu", device_name="cpu", threads=2, batch_size=64,
               precision="fp32", learned="none", flags=set(flags), tolerance=0.03, img_per_s=img, speedup=speedup,
               family="merging" if "t" in label else "pruning")


@pytest.fixture
def res(tmp_path):
    rows = [_row("dense", 0.052, 88.8, img=440.0, dense=True)]
    for i, m in enumerate(METHODS):
        for t in (0.5, 0.7, 0.9):
            rows.append(_row(m, 0.052 * t, 85.0 + 3.5 * t + 0.05 * i, t, speedup=1.0 / t - 0.02 * i,
                             img=440.0 / t))
    rows.append(_row("dct-like", 0.036, 89.5, 0.7, speedup=None, img=900.0))  # fastest by img/s, unpaired
    return {"rows": rows, "display": rows, "notes": [], "plan": None, "out": tmp_path}


@pytest.fixture
def figs(res, monkeypatch, tmp_path):
    return plotted_figures(res, tmp_path, monkeypatch)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legend_clear_of_the_axes_and_enough_y_ticks(figs):
    assert set(figs) == {"accuracy_vs_gflops", "accuracy_vs_throughput"}
    for name, fig in figs.items():
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ax = fig.axes[0]
        legend = (fig.legends or [ax.get_legend()])[0]
        leg = legend.get_window_extent(r)
        assert not _overlap(leg, ax.get_window_extent(r)), name
        assert not _overlap(leg, ax.xaxis.label.get_window_extent(r)), name
        for t in ax.get_xticklabels():
            assert not _overlap(leg, t.get_window_extent(r)), name
        lo, hi = ax.get_ylim()
        assert len([t for t in ax.get_yticks() if lo <= t <= hi]) >= MIN_Y_TICKS, name
        # at the size the README shows (the saved width, about 3.4 in): the data keeps most of the height
        assert ax.get_window_extent(r).height / fig.dpi >= 1.6, name
        assert len(legend.get_texts()) >= 20


def test_speedup_axis_is_paired_and_unpaired_runs_stay_off_the_frontier(res, figs):
    layers = plot_layers(res["display"], "speedup")
    unpaired = next(r for r in res["display"] if r.label == "dct-like")
    assert id(unpaired) in layers["unpaired"] and id(unpaired) in layers["hollow"]
    assert layers["x"][id(unpaired)] == pytest.approx(900 / 440)
    assert all(x != pytest.approx(900 / 440) for x, _ in layers["frontier"])
    tome = next(r for r in res["display"] if r.label == "tome" and r.targets == [0.5])
    assert layers["x"][id(tome)] == pytest.approx(2.0)                         # its paired speedup, not img/s
    ax = figs["accuracy_vs_throughput"].axes[0]
    assert "Speedup over dense (paired" in ax.get_xlabel()
