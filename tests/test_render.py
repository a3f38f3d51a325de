"""One row, three reporting paths (report, figures, bench.py): the same cells; and the rows stay method-agnostic."""

import importlib.util
import re
from pathlib import Path

from tokenbench.report import render
from tokenbench.figures.tables import compare_row, ours_from_row, row_cells
from tokenbench.figures.tables import params_text as figure_params_text
from tokenbench.report.tables import csv_value, display_cells
from tokenbench.report.rows import Row

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(**kw) -> Row:
    base = dict(model="deit_small_patch16_224", label="tome", method="tome", family="merging",
                params={"r": [5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4, 4], "prop_attn": True}, gflops=3.12345,
                flops_rel=0.678, img_per_s=123.4, img_per_s_q1=120.0, img_per_s_q3=125.0, speedup=1.4567,
                speedup_q1=1.4012, speedup_q3=1.5049, top1=79.123, top1_lo=78.51, top1_hi=79.74, n=1000,
                batch_size=16, precision="fp32")
    base.update(kw)
    return Row(**base)


def test_report_figures_and_bench_write_one_row_alike():
    row = _row()
    cells = display_cells(row)
    ours = ours_from_row(row, {"metrics": {"tokens": [197.0] * 3}, "weights": "timm:x"})
    fig = compare_row(ours, None, in_recipe=True)
    fig_cells = row_cells(fig, {}, matched=False)
    bench_cols = _bench().timing_columns(row, 1 / row.flops_rel, 0.05, "")
    # parameters, schedules run-length encoded: the same text in the report and the figure
    assert cells["Params"] == figure_params_text(fig) == fig_cells[1] == "r=[5x3,4x9], prop_attn=True"
    assert cells["Params"] == render.params_text(row.params)
    # top-1 with its 95% interval
    assert cells["Top-1 % [95% CI]"] == fig_cells[10] == "79.12 [78.5, 79.7]"
    # the speedup: the same value in all three, and its quartiles as bench.py writes them
    assert cells["Speedup [q1, q3]"] == f"{fig_cells[8]} {bench_cols['speedup_iqr']}" == "1.46x [1.40, 1.50]"
    assert bench_cols["efficiency"] == round(1.4567 * 0.678, 3)
    # the method's family, in the report's and the figure's tables alike
    assert cells["Family"] == fig_cells[2] == "merging"
    # a seeded mean row: the number of seeds, in the report and the figure alike
    mean = _row(row_type="mean", params={"keep_rate": 0.7}, seeds=[0, 1, 2], method="random", label="random")
    fig_mean = compare_row(ours_from_row(mean, None), None, in_recipe=True)
    assert display_cells(mean)["Params"] == figure_params_text(fig_mean) == "keep_rate=0.7, 3 seeds"


def test_csv_columns_of_a_row():
    row = _row(keys={"flops": "abc"}, flags={"noisy", "busy"}, warnings=["one", "two"])
    assert csv_value(row, "params") == '{"prop_attn": true, "r": [5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4, 4]}'
    assert csv_value(row, "flags") == "busy,noisy" and csv_value(row, "warnings") == "one | two"
    assert csv_value(row, "flops_key") == "abc" and csv_value(row, "accuracy_key") is None
    assert csv_value(row, "mcnemar_p") is None and csv_value(row, "model") == row.model
    assert not hasattr(row, "get") and not hasattr(row, "__getitem__")  # one name per field: the attribute


def test_family_markers_differ_and_colours_follow_the_method():
    styles = render.method_styles(["tome", "evit", "topk"], {"tome": "merging", "evit": "pruning", "topk": "pruning"})
    assert styles["evit"][1] == styles["topk"][1] != styles["tome"][1]
    assert len({styles[k][0] for k in styles}) == 3


def test_reporting_code_names_no_method_nor_method_parameter():
    src = [*(ROOT / "tokenbench" / "report").glob("*.py"), *(ROOT / "tokenbench" / "figures").glob("*.py")]
    assert len(src) > 10
    for path in src:
        name = path.name
        code = path.read_text()
        code = re.sub(r'""".*?"""', "", code, flags=re.S)  # docstrings may give examples
        code = re.sub(r"#.*", "", code)
        for word in ("keep_rate", '["r"]', '"r":', '== "seed"', '["seed"]', 'get("seed"', "tome", "evit", "topk",
                     "dynamicvit", '"random"', "search_param"):
            assert word not in code, f"{name} names {word}"
