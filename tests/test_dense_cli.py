"""`tokenbench eval` and `tokenbench train` on the dense task, and their one-line refusals."""

import json
from pathlib import Path

import pytest
import torch

from tokenbench import data_scenes as ds


@pytest.fixture(autouse=True)
def small_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_SEG_DIR", str(tmp_path / "no-weights"))
    for split, n in (("train", 32), ("val", 8), ("test", 12)):
        monkeypatch.setitem(ds.SCENE_SIZES, split, n)


def stored(results):
    return [p for p in results.rglob("*.json")] if results.exists() else []


def test_eval_prints_miou_with_interval_pixel_accuracy_and_flops(cli, tmp_path):
    code, out, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "6",
                         "--results", str(tmp_path / "res"))
    assert code == 0, err
    rec = json.loads(out)
    lo, hi = rec["miou_ci95"]
    assert lo <= rec["miou"] <= hi and 0 <= rec["pixel_accuracy"] <= 100
    assert len(rec["per_class_iou"]) == 11 and rec["n"] == 6
    assert rec["gflops"] == pytest.approx(rec["gflops_backbone"] + rec["gflops_decoder"])
    assert "untrained" in rec["weights"] and "no trained weights" in err
    assert len(stored(tmp_path / "res")) == 1
    code, out, _ = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "6",
                       "--results", str(tmp_path / "res"))
    assert code == 0 and json.loads(out)["reused"] is True


@pytest.mark.parametrize("args,msg", [
    (("default", "--data", "fashion-mnist-scenes"), "default is a classification model"),
    (("default-convnext", "--data", "fashion-mnist-scenes"), "use its dense counterpart default-convnext-seg"),
    (("default-seg", "--data", "fashion-mnist"), "default-seg is a segmentation model; fashion-mnist needs"),
])
def test_eval_refuses_in_one_line_and_stores_nothing(cli, tmp_path, args, msg):
    code, out, err = cli("eval", *args, "--limit", "4", "--results", str(tmp_path / "res"))
    assert code == 2 and msg in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert stored(tmp_path / "res") == []


def test_eval_refuses_bad_voc_masks_and_class_mismatch(cli, tmp_path):
    from test_dense_folders import write_voc

    root = write_voc(tmp_path / "voc")
    code, _, err = cli("eval", "default-seg", "--data", "voc", "--data-dir", str(root), "--split", "val",
                       "--results", str(tmp_path / "res"))
    assert code == 2 and "predicts 11 classes; voc has 21" in err and stored(tmp_path / "res") == []
    empty = write_voc(tmp_path / "empty", listed=[])
    code, _, err = cli("eval", "default-seg", "--data", "voc", "--data-dir", str(empty), "--split", "val")
    assert code == 2 and "the val split is empty" in err


def test_a_damaged_dense_checkpoint_is_refused_with_the_command_that_retrains_it(cli, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    (root / "embedded-default-seg").mkdir(parents=True)
    (root / "embedded-default-seg" / "model.pt").write_bytes(b"not the weights")
    (root / "embedded-default-seg" / "model.pt.sha256").write_text("0" * 64 + "  model.pt\n")
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_SEG_DIR", str(root))
    code, _, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--limit", "2")
    assert code == 2 and "is corrupt" in err and len(err.strip().splitlines()) == 1
    assert "tokenbench train default-seg --data fashion-mnist-scenes --out" in err


def test_a_method_keeping_every_token_runs_on_the_dense_task(cli):
    code, out, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4",
                         "--method", "tome", "--set", "r=0")
    base = json.loads(cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4")[1])
    assert code == 0, err
    assert json.loads(out)["miou"] == pytest.approx(base["miou"])


def test_train_dense_model_a_few_steps_resumably(cli, tmp_path):
    out = tmp_path / "run"
    code, text, err = cli("train", "default-seg", "--data", "fashion-mnist-scenes", "--max-steps", "1",
                          "--batch-size", "8", "--epochs", "1", "--out", str(out), "--json")
    assert code == 0, err
    first = json.loads(text)
    assert first["step"] == 1 and not first["finished"] and 0 <= first["val_miou"] <= 100
    code, text, err = cli("train", "default-seg", "--data", "fashion-mnist-scenes", "--max-steps", "3",
                          "--batch-size", "8", "--epochs", "1", "--out", str(out), "--json")
    done = json.loads(text)
    assert code == 0 and done["resumed_from"] == 1 and done["finished"] and done["step"] == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"]["decoder"] == "linear" and cfg["task"] == "segmentation"
    assert cfg["init"]["model"] == "default" and cfg["init"]["left_out"] == ["head.bias", "head.weight"]
    assert cfg["train"]["backbone_lr_scale"] == 0.5 and cfg["train"]["threads"] == 1
    assert (out / "model.pt").is_file() and (out / "model.pt.sha256").is_file()
    code, text, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4",
                          "--checkpoint", str(out / "model.pt"))
    assert code == 0 and json.loads(text)["weights"].startswith("sha256:"), err


def test_train_dense_model_takes_the_backbone_rate_and_clipping_it_is_given(cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("train", "default-seg", "--data", "fashion-mnist-scenes", "--max-steps", "1",
                       "--batch-size", "8", "--epochs", "1", "--backbone-lr-scale", "0.5", "--grad-clip", "0",
                       "--out", str(out), "--json")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["backbone_lr_scale"] == 0.5 and cfg["grad_clip"] is None


@pytest.mark.parametrize("extra,flag", [(("--fix-epochs", "1"), "--fix-epochs"),
                                        (("--loss-weight", "ratio_weight=2"), "--loss-weight"),
                                        (("--set", "keep_rate=0.7"), "--set")])
def test_train_dense_model_refuses_method_only_flags_in_one_line(cli, tmp_path, extra, flag):
    out = tmp_path / "run"
    code, _, err = cli("train", "default-seg", "--data", "fashion-mnist-scenes", *extra, "--out", str(out))
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_dense_run_resumes_with_another_length_only_when_rescheduled(cli, tmp_path):
    out = tmp_path / "run"
    args = ("train", "default-seg", "--data", "fashion-mnist-scenes", "--batch-size", "8", "--out", str(out), "--json")
    code, _, err = cli(*args, "--epochs", "1", "--max-steps", "1")
    assert code == 0, err
    code, _, err = cli(*args, "--epochs", "2")
    assert code == 2 and "--reschedule" in err
    code, text, err = cli(*args, "--epochs", "2", "--reschedule")
    assert code == 0 and json.loads(text)["step"] == 8, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rescheduled"] == [{"from_epochs": 1.0, "to_epochs": 2.0, "at_step": 1}]


def test_pixel_cross_entropy_lowers_the_loss_of_a_tiny_dense_model(tmp_path):
    from tokenbench.train import TrainConfig
    from tokenbench.train_seg import train_seg

    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_channels": [8, 16]}
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=2, hflip=True, ckpt_every=100, eval_limit=8)
    summary = train_seg("default-seg", tmp_path / "tiny", cfg, arch=tiny, progress=False)
    rows = (tmp_path / "tiny" / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    assert summary["finished"] and losses[-1] < losses[0]


@pytest.mark.parametrize("args,msg", [
    (("train", "default", "--data", "fashion-mnist-scenes"), "default is a classification model"),
    (("train", "default-seg", "--data", "fashion-mnist"), "default-seg is a segmentation model; fashion-mnist needs"),
    (("train", "default-seg", "--data", "fashion-mnist-scenes", "--task", "classification"),
     "default-seg is a segmentation model"),
    (("train", "default"), "--method is required to train a classification model"),
])
def test_train_refuses_mixed_tasks(cli, tmp_path, args, msg):
    code, _, err = cli(*args, "--out", str(tmp_path / "r"))
    assert code == 2 and msg in err and not (tmp_path / "r").exists()


def test_compare_pairs_two_dense_settings_on_per_image_iou(cli, tmp_path):
    res = str(tmp_path / "res")
    for extra in ((), ("--method", "tome", "--set", "r=0")):
        code, _, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--limit", "6", "--results", res,
                           *extra)
        assert code == 0, err
    code, out, err = cli("compare", res, "tome:r=0", "none", "--json")
    assert code == 0, err
    (d,) = json.loads(out)["comparisons"]
    assert d["n"] == 6 and d["mean_diff"] == pytest.approx(0, abs=1e-9) and d["p_value"] == 1.0
    assert d["a"]["miou"] == pytest.approx(d["b"]["miou"])
    code, _, err = cli("compare", res, "topk:keep_rate=0.7", "none")
    assert code == 2 and "no dense record matches" in err


@pytest.mark.parametrize("method,setting", [("tome", "r=8"), ("topk", "keep_rate=0.7")])
def test_a_merging_and_a_pruning_method_run_on_the_dense_task_with_fewer_flops(cli, method, setting):
    dense = json.loads(cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4")[1])
    code, out, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4",
                         "--method", method, "--set", setting)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["gflops_backbone"] < 0.9 * dense["gflops_backbone"]
    assert rec["gflops_decoder"] == pytest.approx(dense["gflops_decoder"])   # the decoder sees the full map
    assert 0 <= rec["miou"] <= 100 and rec["miou_ci95"][0] <= rec["miou"] <= rec["miou_ci95"][1]


def test_a_method_that_cannot_restore_the_grid_on_the_model_family_is_refused_in_one_line(cli, tmp_path,
                                                                                           monkeypatch):
    from tokenbench import registry

    base = registry.get_method("random")
    vit_only = type("VitOnly", (base,), {"name": "random-vit-grid",
                                         "restores_grid": {"vit": registry.GridRestore.FILL}})
    monkeypatch.setitem(registry._REGISTRY, vit_only.name, vit_only)
    code, _, err = cli("eval", "default-convnext-seg", "--data", "fashion-mnist-scenes", "--limit", "4",
                       "--method", vit_only.name, "--results", str(tmp_path / "res"))
    assert code == 2 and err.count("\n") == 1 and "on convnext models" in err
    assert stored(tmp_path / "res") == []


@pytest.mark.parametrize("command", ["flops", "throughput"])
def test_classification_commands_point_a_dense_model_to_eval(cli, command):
    code, _, err = cli(command, "default-seg")
    assert code == 2 and "is a dense (segmentation) model" in err and "tokenbench eval default-seg" in err


def test_report_tabulates_dense_records_alone_and_leaves_them_out_of_a_classification_table(cli, tmp_path):
    res = str(tmp_path / "res")
    assert cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--limit", "4", "--results", res)[0] == 0
    code, _, err = cli("report", res, "--no-plots")
    assert code == 0, err
    assert "mIoU % [95% CI]" in (tmp_path / "res" / "results.md").read_text()
    assert cli("flops", "default", "--results", res)[0] == 0
    code, out, err = cli("report", res, "--no-plots", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert [r["model"] for r in rep["rows"]] == ["default"] and any("dense" in n for n in rep["notes"])


@pytest.mark.parametrize("args, message", [
    (("default", "--method", "dynamicvit", "--fix-epochs", "-1"), "--fix-epochs must be 0 or more, got -1"),
    (("default", "--method", "dynamicvit", "--threads", "0"), "--threads must be positive, got 0"),
    (("default-seg", "--data", "fashion-mnist-scenes", "--lr", "0"), "--lr must be positive, got 0"),
    (("default-seg", "--data", "fashion-mnist-scenes", "--method", "dynamicvit", "--epochs", "-2"),
     "--epochs must be positive, got -2"),
    (("default", "--method", "dynamicvit", "--max-steps", "-1"), "--max-steps must be 1 or more"),
    (("default", "--method", "dynamicvit", "--max-steps", "0"), "--max-steps must be 1 or more"),  # not 'no limit'
    (("default-seg", "--data", "fashion-mnist-scenes", "--max-steps", "0"), "--max-steps must be 1 or more"),
])
def test_train_refuses_a_recipe_value_out_of_range_in_one_line(cli, tmp_path, args, message):
    code, _, err = cli("train", *args, "--out", str(tmp_path / "run"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_resumes_only_with_its_own_method_settings(cli, tmp_path):
    out = tmp_path / "run"
    args = ("train", "default", "--method", "topk", "--data", "synthetic", "--batch-size", "4", "--out", str(out),
            "--max-steps", "1", "--json")
    code, _, err = cli(*args, "--set", "keep_rate=0.7")
    assert code == 0, err
    before = (out / "config.json").read_text()
    for change, said in ((("--set", "keep_rate=0.5"), 'params {"keep_rate":0.7}, not {"keep_rate":0.5}'),
                         (("--set", "keep_rate=0.7", "--lr", "0.5"), "(lr ")):
        code, _, err = cli(*args, *change)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert (out / "config.json").read_text() == before                 # nothing trained on, nothing rewritten
    code, text, err = cli(*args, "--set", "keep_rate=0.7")             # its own settings: it resumes
    assert code == 0 and json.loads(text)["resumed_from"] == 1, err


def test_a_method_fine_tune_is_lengthened_with_reschedule(cli, tmp_path):
    out = tmp_path / "run"
    args = ("train", "default", "--method", "topk", "--data", "synthetic", "--batch-size", "4", "--out", str(out),
            "--json")
    code, text, err = cli(*args, "--epochs", "0.05")
    assert code == 0 and json.loads(text)["finished"], err
    code, _, err = cli(*args, "--epochs", "0.1")
    assert code == 2 and "--reschedule" in err
    code, text, err = cli(*args, "--epochs", "0.1", "--reschedule")
    assert code == 0 and json.loads(text)["finished"], err
    assert json.loads((out / "config.json").read_text())["rescheduled"][0]["to_epochs"] == 0.1


def test_a_checksum_without_its_checkpoint_keys_the_random_weights_the_model_runs_on(tmp_path, monkeypatch):
    # the .sha256 left behind a deleted model.pt: the model runs on random weights, and its records must
    # say so, never the trained weights' hash (a later run would reuse an untrained number as trained)
    from tokenbench.models_seg import create_seg_model, seg_paths, seg_weights_id

    monkeypatch.setenv("TOKENBENCH_EMBEDDED_SEG_DIR", str(tmp_path))
    p = seg_paths("default-seg")
    p["dir"].mkdir(parents=True)
    p["sha"].write_text("ab" * 32 + "  model.pt\n")
    _, prov = create_seg_model("default-seg")
    assert prov["weights"] == seg_weights_id("default-seg") == "random-init:untrained"


def test_compare_on_dense_records_says_where_only_stale_records_match(tmp_path):
    import json
    from pathlib import Path

    import pytest

    from tokenbench.errors import UserError
    from tokenbench.report.paired_dense import paired_dense
    from tokenbench.store import Store

    ref = Store(Path(__file__).resolve().parents[1] / "results" / "default-seg", read_only=True)
    mine = Store(tmp_path)
    for rec in ref.records("segmentation"):
        kf = rec["key_fields"]
        if kf["model"] == "default-seg" and kf["method"] in ("none", "topk"):
            if kf["method"] == "topk":
                rec = json.loads(json.dumps(rec))
                rec["key_fields"]["code"]["source"] = "0" * 16     # measured by other code
            mine.put(rec)
    with pytest.raises(UserError, match=r"only 2 stale record\(s\) match 'topk'"):
        paired_dense(tmp_path, "none", "topk")


def test_a_learned_method_without_its_trained_parts_warns_on_a_dense_model(cli):
    code, out, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--method", "dynamicvit",
                         "--limit", "4", "--json")
    assert code == 0, err
    assert any("learned parts are untrained" in w for w in json.loads(out)["warnings"])
    trained = Path(__file__).resolve().parent.parent / "results" / "dense-dynamicvit-0.7" / "model.pt"
    if trained.is_file():
        code, out, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--method", "dynamicvit",
                             "--set", "keep_rate=0.7", "--checkpoint", str(trained), "--limit", "4", "--json")
        assert code == 0 and not any("untrained" in w for w in json.loads(out)["warnings"]), err
