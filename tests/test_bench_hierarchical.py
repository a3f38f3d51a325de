"""bench.py on hierarchical models: the settings by backbone family, the gather / scatter
overhead model (dense output and FLOPs, the split installed at the method's blocks), and the
quick mode's rows on the tiny stand-in for `default-convnext` (no timing is checked)."""

from __future__ import annotations

import json

import torch

from tokenbench import backbones
from tokenbench.measure import flop_count, timing
from tokenbench.api import load

from test_render import _bench


def test_settings_by_model_then_by_family():
    bench = _bench()
    hier = bench.settings_for("convnext_tiny", "convnext")
    assert hier == bench.settings_for("swin_tiny_patch4_window7_224", "swin") == bench.SETTINGS_HIERARCHICAL
    assert hier[0] == ("none", {})
    for m in ("dynamicvit", "random"):
        assert sorted(p["keep_rate"] for name, p in hier if name == m) == [0.7, 0.9]
    assert bench.settings_for("deit_small_patch16_224", "vit") == bench.SETTINGS
    assert bench.settings_for("default", "vit") == bench.SETTINGS_EMBEDDED


def test_overhead_model_is_the_dense_model_plus_gather_and_scatter(tiny_default_convnext):
    bench = _bench()
    blocks = bench.split_blocks("default-convnext", "dynamicvit", {"keep_rate": 0.7})
    stage3 = backbones.backbone_of(load("default-convnext")[0]).sites("stage 3")
    assert blocks == stage3[1:]                                 # from the first predictor on
    net = bench.all_positions_model("default-convnext", blocks)
    dense = load("default-convnext")[0]
    assert sorted(backbones.plan_of(net).subset) == blocks and not backbones.plan_of(net).pre
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), dense(x), rtol=1e-5, atol=1e-5)
    st = backbones.last_state(net)
    assert st.tokens_mlp == st.tokens                           # every position on the slow path
    assert flop_count.flops(net)["gflops"] == flop_count.flops(dense)["gflops"]


def test_quick_mode_rows(tiny_default_convnext, tmp_path, capsys, monkeypatch):
    """The rows of the quick mode, every timing stubbed (tests time nothing): the overhead row is
    timed against the same dense model as the methods, and tabulated apart."""
    bench = _bench()
    pairs = []

    def throughput(net, **kw):
        return {"img_per_s": 100.0, "spread": 0.01, "env": {}}

    def speedup(net, baseline, **kw):
        pairs.append((net, baseline))
        return {"speedup": 0.8, "speedup_q1": 0.75, "speedup_q3": 0.85, "img_per_s": 80.0, "spread": 0.02, "env": {}}

    monkeypatch.setattr(timing, "throughput", throughput)
    monkeypatch.setattr(timing, "speedup", speedup)
    out = tmp_path / "b"
    quick = ["--models", "default-convnext", "--batch-sizes", "2", "--min-run-time", "0.1", "--compile", "none",
             "--out", str(out)]
    assert bench.main(quick) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["params"]) for r in rows] == [
        ("none", "{}"), ("dynamicvit", '{"keep_rate":0.7}'), ("dynamicvit", '{"keep_rate":0.9}'),
        ("random", '{"keep_rate":0.7}'), ("random", '{"keep_rate":0.9}'),
        ("gather-scatter", '{"of":"dynamicvit","keep_rate":0.7,"slow":"all"}')]
    assert len(pairs) == 5 and len({id(b) for _, b in pairs}) == 1
    assert sorted(backbones.plan_of(pairs[-1][0]).subset) == sorted(backbones.plan_of(pairs[0][0]).subset)
    dense, over = rows[0], rows[-1]
    assert over["family"] == "overhead" and over["gflops"] == dense["gflops"] and over["flops_reduction"] == 1.0
    assert rows[3]["flops_reduction"] > rows[1]["flops_reduction"] > rows[2]["flops_reduction"] > 1.0
    md = (out / "bench.md").read_text()
    assert "Gather / scatter overhead" in md and "| default-convnext | 2 | +25.0% (x0.800 [0.75, 0.85]) | - |" in md
    assert "Gather / scatter overhead" in capsys.readouterr().out
    assert bench.main(quick + ["--methods", "random"]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "random", "random"]
    assert bench.main(quick + ["--methods", "gather-scatter"]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "gather-scatter"]


def test_bench_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    bench = _bench()
    assert bench.cli(["--compile", "bogus", "--models", "default", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown compile mode 'bogus'" in err
    assert not (tmp_path / "b").exists()  # nothing written
