"""The end-of-sweep summary fits 80 columns: only the knob and non-default parameters, flags whole."""

from rich.console import Console

from tokenbench.report.rows import Row
from tokenbench.report.tables import summary_table
from tokenbench.registry import get_method


def _row(label, method, params, flags=(), top1=88.0):
    return Row(model="m", label=label, method=method, params=dict(params), targets=[0.7], gflops=0.035,
               flops_rel=0.7, top1=top1, top1_lo=top1 - 0.9, top1_hi=top1 + 0.9, top5=99.0, n=5000, params_m=0.9,
               device="cpu", threads=2, batch_size=64, precision="fp32", learned="none", flags=set(flags),
               tolerance=0.03, speedup=1.1)


def test_summary_fits_80_columns_with_defaults_left_out_and_flags_whole(tmp_path):
    mctf = get_method("mctf").validate({"r": [3, 3, 3] + [2] * 9})       # every default spelled out
    rows = [_row("mctf", "mctf", mctf, flags=("busy", "noisy", "unpaired")),
            _row("tome", "tome", get_method("tome").validate({"r": 3}), flags=("flops-miss", "unpaired")),
            _row("topk", "topk", {"keep_rate": 0.755})]
    con = Console(width=80, record=True, file=open(tmp_path / "sink", "w"))
    con.print(summary_table({"display": rows, "out": tmp_path}))
    text = con.export_text()
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert "tau_info" not in text and "prop_attn" not in text and "bidirection" not in text
    assert "r=[3x3,2x9]" in text
    words = text.replace(",", " ").split()
    for flag in ("busy", "noisy", "unpaired", "flops-miss"):
        assert flag in words, (flag, text)
    assert len(lines) <= 5 + 2 * len(rows)


def test_rows_of_two_models_are_one_table_each_and_every_flag_stays_whole(tmp_path):
    """A model column would push the flags off an 80-column terminal: one table per model instead,
    titled by it; a long sweep label wraps, a flag or a number never."""
    rows = [_row("dense", "none", {}), _row("evit", "evit", {"keep_rate": 0.385}, flags=("noisy", "unpaired"))]
    other = [_row("dense", "none", {}), _row("dynamicvit-convnext", "dynamicvit", {"keep_rate": 0.7},
                                             flags=("flops-miss", "unpaired"))]
    for r in other:
        r.model = "default-convnext-seg"
    con = Console(width=80, record=True, file=open(tmp_path / "sink", "w"))
    con.print(summary_table({"display": rows + other, "out": "runs/x"}))
    text = con.export_text()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "tokenbench: runs/x: m " in text and "tokenbench: runs/x: default-convnext-seg" in text
    assert "Model" not in text
    words = text.replace(",", " ").split()
    assert words.count("unpaired") == 2 and "noisy" in words and "flops-miss" in words
    assert words.count("88.00") == 4 and words.count("[87.1–88.9]") == 4
