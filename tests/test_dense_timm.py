"""Any timm backbone as a dense model: `tokenbench train MODEL --task segmentation` on a segmentation
folder (frozen linear head or --finetune), the checkpoint read back by `tokenbench eval`, and the
one-line refusals of mixed tasks and bad folders."""

import json

import pytest
import torch
from conftest import register_tiny_timm
from test_dense_folders import write_ade, write_voc

TINY = register_tiny_timm("tb_tiny_vit_dense", depth=4)


def stored(results):
    return list(results.rglob("*.json")) if results.exists() else []


def train(cli, out, data, root, *extra):
    code, text, err = cli("train", TINY, "--task", "segmentation", "--data", data, "--data-dir", str(root),
                          "--epochs", "2", "--batch-size", "2", "--num-workers", "0", "--out", str(out), "--json",
                          *extra)
    assert code == 0, err
    return json.loads(text)


_TRAINED: dict = {}


@pytest.fixture
def ade(cli, tmp_path_factory):
    """An ADE20K-layout folder and a frozen linear head trained on it (once for the module)."""
    if not _TRAINED:
        tmp = tmp_path_factory.mktemp("ade")
        root = write_ade(tmp / "ADEChallengeData2016")
        _TRAINED["run"] = (root, tmp / "run", train(cli, tmp / "run", "ade20k", root))
    return _TRAINED["run"]


def encoder_state(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def fresh_encoder():
    import timm

    torch.manual_seed(0)
    return timm.create_model(TINY, num_classes=0).state_dict()


def test_frozen_linear_head_trains_and_eval_reads_the_checkpoint(cli, ade, tmp_path):
    root, run, summary = ade
    assert summary["finished"] and 0 <= summary["val_miou"] <= 100
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["arch"]["decoder"] == "linear" and cfg["arch"]["frozen"]
    assert cfg["arch"]["backbone"] == TINY and cfg["arch"]["classes"] == 150
    enc = encoder_state(run / "model.pt")
    assert all(torch.equal(enc[f"encoder.{k}"], v) for k, v in fresh_encoder().items())  # the probe left it alone
    code, out, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(root), "--checkpoint",
                         str(run / "model.pt"), "--json", "--results", str(tmp_path / "res"))
    assert code == 0, err
    rec = json.loads(out)
    assert rec["n"] == 3 and len(rec["per_class_iou"]) == 150 and rec["weights"].startswith("sha256:")
    assert rec["gflops_backbone"] > 0 and rec["gflops_decoder"] > 0 and len(stored(tmp_path / "res")) == 1


def test_finetune_trains_the_backbone_with_a_head_on_the_last_four_blocks(cli, tmp_path):
    root = write_voc(tmp_path / "voc", ids=("a", "b", "c", "d"), size=(32, 32))
    summary = train(cli, tmp_path / "run", "voc", root, "--finetune", "--head", "linear4", "--max-steps", "2")
    assert summary["step"] == 2
    summary = train(cli, tmp_path / "run", "voc", root, "--finetune", "--head", "linear4")
    assert summary["finished"] and summary["resumed_from"] == 2
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    arch = cfg["arch"]
    assert arch["decoder"] == "linear4" and not arch["frozen"] and arch["classes"] == 21
    assert cfg["train"]["backbone_lr_scale"] == 0.1  # the backbone at a tenth of the head's rate
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["decoder.cls.weight"].shape == (21, 4 * 32, 1, 1)
    enc = encoder_state(tmp_path / "run" / "model.pt")
    assert not all(torch.equal(enc[f"encoder.{k}"], v) for k, v in fresh_encoder().items())
    code, out, err = cli("eval", TINY, "--data", "voc", "--data-dir", str(root), "--checkpoint",
                         str(tmp_path / "run" / "model.pt"), "--json")
    assert code == 0 and json.loads(out)["n"] == 4, err


def one_line_refusal(code, err, msg):
    assert code == 2 and msg in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_classification_model_on_a_dense_folder_is_refused(cli, tmp_path):
    root = write_voc(tmp_path / "voc")
    code, _, err = cli("eval", TINY, "--data", "voc", "--data-dir", str(root), "--results", str(tmp_path / "res"))
    one_line_refusal(code, err, f"{TINY} is a classification model; voc needs a dense model")
    assert f"tokenbench train {TINY} --task segmentation --data voc" in err      # a command that runs
    assert stored(tmp_path / "res") == []
    code, _, err = cli("train", TINY, "--data", "voc", "--data-dir", str(root), "--out", str(tmp_path / "r"))
    one_line_refusal(code, err, "--task segmentation")
    assert not (tmp_path / "r").exists()


def test_a_segmentation_checkpoint_on_classification_data_is_refused(cli, ade, tmp_path):
    _, run, _ = ade
    code, _, err = cli("eval", TINY, "--data", "synthetic", "--checkpoint", str(run / "model.pt"),
                       "--results", str(tmp_path / "res"))
    one_line_refusal(code, err, "holds a segmentation model; synthetic needs a classification model")
    assert stored(tmp_path / "res") == []
    other = register_tiny_timm("tb_tiny_vit_dense_other", depth=4)
    code, _, err = cli("eval", other, "--data", "ade20k", "--data-dir", str(ade[0]), "--checkpoint",
                       str(run / "model.pt"))
    one_line_refusal(code, err, f"trained on {TINY}, not {other}")
    code, _, err = cli("train", TINY, "--task", "segmentation", "--data", "fashion-mnist",
                       "--out", str(tmp_path / "r"))
    one_line_refusal(code, err, "fashion-mnist is a classification dataset")


@pytest.mark.parametrize("bad,msg", [
    ({"mask_size": (32, 16)}, "must match its image"),
    ({"labels": (0, 5, 200)}, "holds label 200, outside the 150 classes"),
    ({"names": ()}, "the val split is empty"),
])
def test_bad_ade20k_folders_are_refused_in_one_line_and_nothing_is_stored(cli, ade, tmp_path, bad, msg):
    _, run, _ = ade
    root = write_ade(tmp_path / "bad", **bad)
    code, _, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(root), "--checkpoint",
                       str(run / "model.pt"), "--results", str(tmp_path / "res"))
    one_line_refusal(code, err, msg)
    assert stored(tmp_path / "res") == []


def test_a_method_without_grid_restoration_is_refused_on_a_timm_dense_model(cli, ade, tmp_path, monkeypatch):
    from tokenbench import registry

    root, run, _ = ade
    cannot = type("NoGrid", (registry.get_method("topk"),), {"name": "topk-no-grid",
                                                             "restores_grid": registry.GridRestore.NONE})
    monkeypatch.setitem(registry._REGISTRY, cannot.name, cannot)
    code, _, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(root), "--checkpoint",
                       str(run / "model.pt"), "--method", cannot.name, "--set", "keep_rate=0.5",
                       "--results", str(tmp_path / "res"))
    one_line_refusal(code, err, "topk-no-grid cannot hand back the full feature map a dense task needs on vit")
    assert stored(tmp_path / "res") == []


def test_records_are_keyed_by_the_folders_content_not_its_place(cli, ade, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    root, run, _ = ade
    res = str(tmp_path / "res")

    def evaluate(where):
        code, out, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(where), "--checkpoint",
                             str(run / "model.pt"), "--json", "--results", res)
        assert code == 0, err
        return json.loads(out)

    first = evaluate(root)
    moved = shutil.copytree(root, tmp_path / "moved" / "ADEChallengeData2016")
    assert evaluate(moved.parent)["reused"] and evaluate(moved)["key"] == first["key"]
    mask = moved / "annotations" / "validation" / "ADE_x_1.png"
    m = np.array(Image.open(mask))
    m[0, 0] = 7
    Image.fromarray(m, mode="L").save(mask)
    changed = evaluate(moved)
    assert not changed["reused"] and changed["key"] != first["key"] and len(stored(tmp_path / "res")) == 2


@pytest.mark.parametrize("command", ["flops", "throughput"])
def test_classification_commands_point_a_segmentation_checkpoint_to_eval(cli, ade, command):
    _, run, _ = ade
    code, _, err = cli(command, TINY, "--checkpoint", str(run / "model.pt"))
    one_line_refusal(code, err, f"holds a dense (segmentation) model: measure it with `tokenbench eval {TINY}")


def test_training_checks_the_folder_before_building_the_backbone(cli, tmp_path, monkeypatch):
    from tokenbench import models_seg_timm

    def no_build(*a, **k):
        raise AssertionError("the backbone was built before the folder was checked")

    monkeypatch.setattr(models_seg_timm, "build_timm_seg", no_build)
    root = write_ade(tmp_path / "ade", splits=("validation",))
    for extra, msg in ((("--data-dir", str(root)), "has no images/training/"), ((), "--data-dir is required for ade20k")):
        code, _, err = cli("train", TINY, "--task", "segmentation", "--data", "ade20k", *extra,
                           "--pretrained", "--out", str(tmp_path / "r"))
        one_line_refusal(code, err, msg)


@pytest.mark.parametrize("args,msg", [
    (("default-seg", "--data", "fashion-mnist-scenes", "--head", "linear4"), "default-seg has its own decoder"),
    (("default-seg", "--data", "fashion-mnist-scenes", "--finetune"), "default-seg has its own decoder"),
    ((TINY, "--task", "segmentation", "--data", "ade20k", "--head", "mlp"), "unknown --head 'mlp'"),
    ((TINY, "--method", "topk", "--head", "linear"), "--head and --finetune train a segmentation head"),
])
def test_head_options_are_refused_where_they_do_not_apply(cli, tmp_path, args, msg):
    code, _, err = cli("train", *args, "--out", str(tmp_path / "r"))
    one_line_refusal(code, err, msg)
    assert not (tmp_path / "r").exists()


def test_eval_of_a_dense_model_refuses_pretrained_in_one_line(cli, ade):
    root, run, _ = ade
    code, _, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(root), "--checkpoint",
                       str(run / "model.pt"), "--pretrained")
    one_line_refusal(code, err, "--pretrained does not apply to a dense model")


@pytest.mark.parametrize("method,setting", [("tome", "r=4"), ("topk", "keep_rate=0.5")])
def test_a_reducing_method_runs_on_a_trained_timm_dense_model_with_fewer_flops(cli, ade, method, setting):
    root, run, _ = ade

    def evaluate(*extra):
        code, out, err = cli("eval", TINY, "--data", "ade20k", "--data-dir", str(root), "--checkpoint",
                             str(run / "model.pt"), "--json", *extra)
        assert code == 0, err
        return json.loads(out)

    dense, reduced = evaluate(), evaluate("--method", method, "--set", setting)
    assert reduced["gflops_backbone"] < dense["gflops_backbone"]
    assert reduced["gflops_decoder"] == pytest.approx(dense["gflops_decoder"]) and reduced["n"] == dense["n"]
