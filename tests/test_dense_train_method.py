"""`tokenbench train DENSE_MODEL --method M`: a dense model trained with a method in the loop."""

import json

import pytest
import torch

from tokenbench import data_scenes as ds

ARGS = ("--data", "fashion-mnist-scenes", "--batch-size", "8", "--epochs", "1", "--json")


@pytest.fixture(autouse=True)
def small_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENBENCH_EMBEDDED_SEG_DIR", str(tmp_path / "no-weights"))
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        monkeypatch.setitem(ds.SCENE_SIZES, split, n)


def log_rows(out):
    lines = (out / "train_log.csv").read_text().splitlines()
    return [dict(zip(lines[0].split(","), r.split(","))) for r in lines[1:]]


@pytest.mark.parametrize("model", ["default-seg", "default-convnext-seg"])
def test_dynamicvit_trains_its_predictors_on_the_dense_task_resumably(cli, tmp_path, model):
    out = tmp_path / "run"
    args = ("train", model, "--method", "dynamicvit", "--set", "keep_rate=0.7", *ARGS, "--out", str(out))
    code, text, err = cli(*args, "--max-steps", "1", "--fix-epochs", "0")
    assert code == 0, err
    assert json.loads(text)["step"] == 1
    first = torch.load(out / "last.pt", weights_only=False)["model"]
    code, text, err = cli(*args, "--max-steps", "2", "--fix-epochs", "0")
    done = json.loads(text)
    assert code == 0 and done["resumed_from"] == 1 and done["finished"] and done["step"] == 3, err
    state = torch.load(out / "model.pt", weights_only=True)
    learned = [k for k in state if k.startswith("encoder.") and k not in _dense_keys(model)]
    assert learned and any(not torch.equal(state[k], first[k]) for k in learned)
    row = log_rows(out)[-1]
    for col in ("train_loss", "pixel_loss", "ratio_loss", "pixel_kl", "map_mse", "keep_frac_s1"):
        assert float(row[col]) == float(row[col]) and abs(float(row[col])) < 1e6, col
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "dynamicvit" and cfg["params"] == {"keep_rate": 0.7} and cfg["task"] == "segmentation"
    code, text, err = cli("eval", model, "--data", "fashion-mnist-scenes", "--json", "--limit", "4",
                          "--method", "dynamicvit", "--set", "keep_rate=0.7", "--checkpoint", str(out / "model.pt"),
                          "--results", str(tmp_path / "res"))
    assert code == 0, err
    rec = json.loads(text)
    assert 0 <= rec["miou"] <= 100


def _dense_keys(model):
    from tokenbench.models_seg import build_seg_model

    return set(build_seg_model(model).state_dict())


def test_eval_reads_the_trained_predictors_from_the_checkpoint(tmp_path):
    from tokenbench.models_seg import build_seg_model
    from tokenbench.registry import apply
    from tokenbench.runner_dense import load_dense

    net = build_seg_model("default-seg")
    apply(net.encoder, "dynamicvit", keep_rate=0.5)
    state = {k: v + 1.0 if "score_predictor" in k and v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "m.pt")
    loaded, prov = load_dense("default-seg", "dynamicvit", {"keep_rate": 0.5}, str(tmp_path / "m.pt"))
    got = loaded.state_dict()
    assert prov["learned_parts"] == "trained"
    assert all(torch.equal(got[k], v) for k, v in state.items())
    dense, prov = load_dense("default-seg", "none", {}, str(tmp_path / "m.pt"))  # read without the method
    assert prov["learned_parts"] == "none" and not any("score_predictor" in k for k in dense.state_dict())
    torch.save(build_seg_model("default-seg").state_dict(), tmp_path / "dense.pt")
    _, prov = load_dense("default-seg", "dynamicvit", {"keep_rate": 0.5}, str(tmp_path / "dense.pt"))
    assert prov["learned_parts"] == "untrained"


def test_tome_fine_tunes_the_dense_model_with_merging_in_the_loop(cli, tmp_path):
    out = tmp_path / "tome"
    code, text, err = cli("train", "default-seg", "--method", "tome", "--set", "r=8", *ARGS, "--max-steps", "3",
                          "--lr", "1e-2", "--out", str(out))
    assert code == 0, err
    summary = json.loads(text)
    assert summary["finished"] and 0 <= summary["val_miou"] <= 100
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "tome" and cfg["params"]["r"] == 8
    assert all(float(r["train_loss"]) > 0 for r in log_rows(out))
    code, text, err = cli("eval", "default-seg", "--data", "fashion-mnist-scenes", "--json", "--limit", "4",
                          "--method", "tome", "--set", "r=8", "--checkpoint", str(out / "model.pt"),
                          "--results", str(tmp_path / "res"))
    assert code == 0, err


def test_the_dense_loss_of_dynamicvit_falls_and_moves_the_predictors(tmp_path):
    from tokenbench.models_seg import build_seg_model
    from tokenbench.registry import apply, get_method
    from tokenbench.train_seg_method import dense_loss

    torch.manual_seed(0)
    tiny = {"embed_dim": 32, "depth": 4, "num_heads": 2, "stem_channels": [8, 16]}
    teacher = build_seg_model("default-seg", tiny).eval()
    student = build_seg_model("default-seg", tiny)
    student.load_state_dict(teacher.state_dict())
    apply(student.encoder, "dynamicvit", keep_rate=0.5)
    student.train()
    loss_fn = dense_loss(student, teacher, get_method("dynamicvit")().dense_train_setup(student.encoder))
    before = {k: v.clone() for k, v in student.state_dict().items() if "score_predictor" in k}
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    x, y = torch.randn(4, 1, 56, 56), torch.randint(0, 11, (4, 56, 56))
    losses = []
    for step in range(8):
        loss, logits, metrics = loss_fn(student, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert logits.shape == (4, 11, 56, 56) and set(metrics) >= {"ratio_loss", "pixel_kl", "map_mse"}
    assert losses[-1] < losses[0]
    after = student.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", ["avit", "ltmp"])
def test_a_learned_method_without_dense_losses_is_refused_in_one_line(cli, tmp_path, method):
    code, _, err = cli("train", "default-seg", "--method", method, *ARGS, "--out", str(tmp_path / "r"))
    assert code == 2 and "has no dense training" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
