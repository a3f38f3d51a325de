"""Dense sweeps end to end on tiny dense models: the plan, the matched-FLOPs search on the whole
dense model, refused methods skipped in one line, records reused, the report's mIoU table and plots."""

import json

import pytest
import torch

from tokenbench import data_scenes as ds

TINY_SEG = {"embed_dim": 32, "depth": 12, "num_heads": 2, "mlp_ratio": 2.0, "stem_channels": [8, 16]}


@pytest.fixture
def tiny_seg(tmp_path, monkeypatch):
    """A tiny `default-seg` with (random) committed weights, and a handful of scenes."""
    from tokenbench.models_seg import build_seg_model
    from tokenbench.train import finalize

    monkeypatch.setenv("TOKENBENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_SEG_DIR", str(tmp_path / "seg"))
    for split, n in (("train", 8), ("val", 8), ("test", 8)):
        monkeypatch.setitem(ds.SCENE_SIZES, split, n)
    d = tmp_path / "seg" / "embedded-default-seg"
    torch.manual_seed(0)
    finalize(build_seg_model("default-seg", TINY_SEG), d)
    (d / "config.json").write_text(json.dumps({"arch": TINY_SEG}))
    return d


def dense_sweep(path, methods: str, out, measure=("flops", "accuracy"), top: str = ""):
    from conftest import write_sweep

    path = write_sweep(path, "default-seg", methods, out=out, measure=measure, limit=None, top=top,
                       tables='[data]\nname = "fashion-mnist-scenes"\nlimit = 4\nbatch_size = 4\n'
                              '[throughput]\nbatch_size = 2\nmin_run_time = 0.01\nrounds = 3\nretries = 0\n'
                              'latency = false\n')
    return path


def run_json(cli, *args):
    code, out, err = cli("run", *args, "--json")
    assert code == 0, err
    return json.loads(out), err


def no_grid_method(monkeypatch) -> str:
    """A method declaring that it cannot restore the grid on a ViT (registered for one test)."""
    from tokenbench import registry

    cls = type("NoGrid", (registry.get_method("topk"),), {"name": "topk-no-grid",
                                                          "restores_grid": {"convnext": registry.GridRestore.FILL}})
    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    return cls.name


def test_a_dense_sweep_measures_each_setting_with_miou_and_reuses_its_records(cli, tiny_seg, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "out"
    refused = no_grid_method(monkeypatch)
    sweep = dense_sweep(tmp_path / "s.toml", f"[methods.tome]\n[methods.topk]\n[methods.{refused}]\n", out,
                        top="flops_targets = [0.7]")
    res, err = run_json(cli, str(sweep))
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["sweep"]["task"] == "segmentation"
    assert plan["skipped"] == [f"{refused} skipped on default-seg: {refused} cannot hand back the full feature map "
                               "on vit models (restores_grid none)"]
    assert f"note: {refused} skipped on default-seg" in err and err.count(refused) == 2
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "tome", "topk"}
    for r in rows.values():
        assert r["task"] == "segmentation" and r["miou_lo"] <= r["miou"] <= r["miou_hi"]
        assert 0 <= r["pixel_accuracy"] <= 100 and r["n"] == 4
        assert r["gflops"] == pytest.approx(r["gflops_backbone"] + r["gflops_decoder"])
    for lab in ("tome", "topk"):  # matched on the whole dense model's FLOPs, decoder included
        assert abs(rows[lab]["flops_rel"] - 0.7) <= 0.01 and rows[lab]["target"] == "0.7"
        assert rows[lab]["gflops_decoder"] == pytest.approx(rows["dense"]["gflops_decoder"])
        assert rows[lab]["iou_p"] is not None and rows[lab]["iou_diff_lo"] <= rows[lab]["iou_diff"]
    assert rows["dense"]["iou_p"] is None
    again, _ = run_json(cli, str(sweep))
    assert again["measured"] == 0 and again["reused"] == 3


def test_the_report_of_a_dense_sweep_shows_miou_in_every_table_and_plot(cli, tiny_seg, tmp_path):
    out = tmp_path / "out"
    sweep = dense_sweep(tmp_path / "s.toml", "[methods.topk]\nkeep_rate = [0.5]\n", out)
    run_json(cli, str(sweep))
    code, _, err = cli("report", str(out), "--html")
    assert code == 0, err
    md = (out / "results.md").read_text()
    for col in ("mIoU % [95% CI]", "Pixel acc. %", "GFLOPs backbone", "IoU vs dense (pts) [95% CI], Wilcoxon p"):
        assert col in md
    assert "Top-1 % [95% CI]" not in md and "mIoU on fashion-mnist-scenes test, 4 images" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"miou", "miou_lo", "miou_hi", "pixel_accuracy", "gflops_backbone", "iou_p"} <= set(header)
    assert "mIoU (\\%)" in (out / "results_paper.tex").read_text()
    assert (out / "plots" / "miou_vs_gflops.png").is_file()
    page = (out / "report.html").read_text()
    assert "default-seg: mIoU against" in page and '"yaxis": {"title": {"text": "mIoU (%)"}}' in page


@pytest.mark.parametrize("top,data,msg", [
    ('task = "classification"', "fashion-mnist-scenes", "default-seg is a segmentation model; fashion-mnist-scenes needs a classification"),
    ("", "fashion-mnist", "default-seg is a segmentation model; fashion-mnist needs"),
])
def test_a_sweep_mixing_tasks_is_refused_in_one_line(cli, tiny_seg, tmp_path, top, data, msg):
    from conftest import write_sweep

    sweep = write_sweep(tmp_path / "s.toml", "default-seg", "[methods.tome]\n", out=tmp_path / "out", limit=None,
                        top=top, tables=f'[data]\nname = "{data}"\nlimit = 4\n')
    code, _, err = cli("run", str(sweep))
    assert code == 2 and msg in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_packaged_dense_sweep_names_every_method_that_restores_the_grid():
    from tokenbench.registry import GridRestore, get_method, list_methods
    from tokenbench.sweep import load_sweep
    from tokenbench.sweep.dense import skipped_entries

    sw = load_sweep("default-seg")
    assert sw.task == "segmentation" and sw.data == "fashion-mnist-scenes" and sw.flops_targets == [0.5, 0.7]
    on_vit = {e.method for e in sw.methods if e.models == ["default-seg"]}
    searchable = {m["name"] for m in list_methods() if get_method(m["name"]).knob and m["name"] != "none"}
    restoring = {m for m in searchable if get_method(m).grid_restore("vit") is not GridRestore.NONE}
    assert restoring <= on_vit
    assert skipped_entries(sw) == [] and "resize" in on_vit  # every method restores the grid on a ViT
    on_convnext = [(e.method, e.grid) for e in sw.methods if e.models == ["default-convnext-seg"]]
    assert on_convnext == [("dynamicvit", {"keep_rate": [0.7]}), ("random", {"keep_rate": [0.7]})]


def test_the_flops_search_of_a_dense_model_counts_its_decoder(tiny_seg):
    from tokenbench.measure.dense import dense_flops
    from tokenbench.models_seg import create_seg_model
    from tokenbench.sweep.search import FlopsSearch

    net, _ = create_seg_model("default-seg")
    counted = dense_flops(net)
    assert FlopsSearch().dense("default-seg", None) == pytest.approx(counted["gflops"])
    assert counted["gflops"] > counted["gflops_backbone"]


@pytest.mark.parametrize("method,sets", [("tome", ("r=4",)), ("topk", ("keep_rate=0.5",))])
def test_visualize_draws_image_masks_and_the_positions_a_dense_method_reduced(cli, tiny_seg, tmp_path, method, sets):
    out = tmp_path / "pic.png"
    args = [a for s in sets for a in ("--set", s)]
    code, text, err = cli("visualize", "default-seg", "--method", method, *args, "--n", "2", "--out", str(out),
                          "--json")
    assert code == 0, err
    summary = json.loads(text)
    assert out.is_file() and summary["task"] == "segmentation" and summary["n_images"] == 2
    assert summary["panels_per_image"] == 4 and summary["flops_ratio"] < 1
    assert summary["stages"] and summary["stages"][-1]["tokens"] < 197


def test_visualize_refuses_a_comparison_sheet_for_a_dense_model_in_one_line(cli, tiny_seg, tmp_path):
    code, _, err = cli("visualize", "default-seg", "--compare", "tome,topk", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "--compare is not available for a dense model's picture" in err
    assert err.count("\n") == 1


def test_a_dense_sweep_times_throughput_and_the_paired_speedup_as_for_classification(cli, tiny_seg, tmp_path):
    out = tmp_path / "out"
    sweep = dense_sweep(tmp_path / "s.toml", "[methods.topk]\nkeep_rate = [0.5]\n", out,
                        measure=("flops", "throughput", "accuracy"))
    res, _ = run_json(cli, str(sweep))
    plan = json.loads((out / "sweep.json").read_text())
    assert [sorted(r["keys"]) for r in plan["runs"]] == [["segmentation", "throughput"],
                                                        ["segmentation", "speedup", "throughput"]]
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["dense"]["speedup"] == 1.0 and rows["topk"]["speedup"] > 0 and rows["topk"]["img_per_s"] > 0
    assert res["measured"] == 5


def test_a_dense_sweep_takes_a_checkpoint_trained_with_the_method_and_refuses_an_encoder_only_one(
        cli, tiny_seg, tmp_path):
    from tokenbench.models_seg import build_seg_model
    from tokenbench.registry import apply

    net = build_seg_model("default-seg", TINY_SEG)
    apply(net.encoder, "dynamicvit", keep_rate=0.7)
    dense_ck, encoder_ck = tmp_path / "dense.pt", tmp_path / "encoder.pt"
    torch.save({"model": net.state_dict()}, dense_ck)
    torch.save({"model": net.encoder.state_dict()}, encoder_ck)
    methods = '[methods.dynamicvit]\nkeep_rate = [0.7]\nflops_targets = []\ncheckpoint = "{}"\n'
    sweep = dense_sweep(tmp_path / "s.toml", methods.format(dense_ck), tmp_path / "out")
    code, out, err = cli("run", str(sweep), "--dry-run")
    assert code == 0, err
    sweep = dense_sweep(tmp_path / "t.toml", methods.format(encoder_ck), tmp_path / "out2")
    code, out, err = cli("run", str(sweep), "--dry-run")
    assert code == 2 and "does not hold default-seg's weights" in err and len(err.strip().splitlines()) == 1


def test_a_per_image_method_is_counted_and_searched_on_the_scenes(cli, tiny_seg, tmp_path):
    # ATS keeps another number of tokens on each scene: its record's FLOPs are the mean over the first
    # scenes of the set (the search counts the same ones, with the same weights), so it lands on its target
    from tokenbench.errors import UserError
    from tokenbench.inputs import data_images
    from tokenbench.measure.dense import dense_flops
    from tokenbench.runner_dense import load_dense
    from tokenbench.store import Store

    out = tmp_path / "out"
    sweep = dense_sweep(tmp_path / "s.toml", "[methods.ats]\n", out, top="flops_targets = [0.8]",
                        measure=("flops", "accuracy", "throughput"))
    res, _ = run_json(cli, str(sweep))
    rows = {r["label"]: r for r in res["rows"]}
    assert abs(rows["ats"]["flops_rel"] - 0.8) <= 0.03 and "flops-miss" not in rows["ats"]["flags"]
    (rec,) = [r for r in Store(out).records("segmentation") if r["key_fields"]["method"] == "ats"]
    assert rec["key_fields"]["flops_images"] == 64 and rec["metrics"]["flops_images"] == 8  # the whole tiny set
    net = load_dense("default-seg", "ats", rec["key_fields"]["params"])[0]
    images = data_images(net, "fashion-mnist-scenes", "test", None, 64, 0, asked=None)[0]  # all 8
    with pytest.raises(UserError, match="--limit 64 is more than the 8 images"):  # a timing batch asks for 64
        data_images(net, "fashion-mnist-scenes", "test", None, 64, 0)
    assert rec["metrics"]["gflops"] == pytest.approx(dense_flops(net, inputs=images)["gflops"])
    dense = [r for r in Store(out).records("segmentation") if r["key_fields"]["method"] == "none"][0]
    assert "flops_images" not in dense["key_fields"] and "flops_images" not in dense["metrics"]
    # and timed on a batch of the scenes, its paired dense model on the same batch
    for kind in ("throughput", "speedup"):
        (t,) = [r for r in Store(out).records(kind) if r["key_fields"]["method"] == "ats"]
        assert t["key_fields"]["input"]["data"] == "fashion-mnist-scenes"
        assert not [w for w in t["metrics"].get("warnings") or [] if "random input" in w]
