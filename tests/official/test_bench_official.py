"""``bench.py --official DIR``: the official models built, checked and timed beside ours; a
missing clone is one line and the rest is timed.  Tiny models, a few milliseconds of timing:
what is written is checked, never a speed."""

import importlib.util
import json
from pathlib import Path

from conftest import register_tiny_timm

from .conftest import clone_of

ROOT = Path(__file__).resolve().parents[2]
# 224 px, patch 16 (DynamicViT's official forward counts 14 x 14 patches), 48 channels
MODEL = register_tiny_timm("official_bench_vit", img_size=224, patch_size=16, embed_dim=48)
METHODS = "tome:r=4,evit:keep_rate=0.7,dynamicvit:keep_rate=0.7"
SMALL = register_tiny_timm("official_bench_tiny")   # 32 px: seconds


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, official_dir, compile_mode="none", model=MODEL, methods=METHODS):
    out = tmp_path / "b"
    args = ["--models", model, "--methods", methods, "--batch-sizes", "2", "--min-run-time", "0.02",
            "--compile", compile_mode, "--threads", "1", "--out", str(out), "--official", str(official_dir)]
    assert _bench().main(args) == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_missing_clones_are_one_line_each_and_the_rest_is_timed(tmp_path, capsys):
    data, md = _run(tmp_path, tmp_path, model=SMALL, methods="tome:r=2,evit:keep_rate=0.7")  # no clone at all
    assert [r["method"] for r in data["rows"]] == ["none", "tome", "evit"]
    notes = data["official"]["notes"]
    assert len(notes) == 2 and all("no clone at" in n and "git clone https://github.com/" in n for n in notes)
    assert data["official"]["rows"] == []
    err = capsys.readouterr().err
    assert sum("no clone at" in line for line in err.splitlines()) == 2
    assert "Ours against the official code" in md and "(nothing timed)" in md


def test_not_a_folder_is_one_line(tmp_path):
    bench = _bench()
    assert bench.cli(["--models", MODEL, "--official", str(tmp_path / "nowhere")]) == 2


def test_official_models_are_built_checked_and_timed(tmp_path):
    for repo in ("facebookresearch+ToMe", "youweiliang+evit", "raoyongming+DynamicViT"):
        root = clone_of(repo).parent
    data, md = _run(tmp_path, root)
    rows = data["official"]["rows"]
    assert [r["method"] for r in rows] == ["tome", "evit", "dynamicvit"] and data["official"]["notes"] == []
    for r in rows:
        assert r["equal"] and r["max_abs_diff"] < 1e-4
        assert r["vs_official"] > 0 and r["official_img_per_s"] > 0 and r["img_per_s"] > 0   # ours over theirs
        assert r["aten_ops"] > 0 and r["official_aten_ops"] > 0 and r["host_ms"] > 0   # what a forward costs the host
        assert r["attention"] == "sdpa / explicit"   # timm's fused kernel in ours, the product written out in theirs
    tome = rows[0]
    assert tome["aten_ops"] < tome["official_aten_ops"] and tome["official_host_ms"] > 0
    assert md.count("| official_bench_vit |") == 7   # the main table's 4 rows and the official table's 3

