"""`tokenbench train`: DynamicViT's recipe end to end on a tiny embedded model, resumable."""

import json

import pytest

from tokenbench.errors import UserError


@pytest.fixture
def fake_fmnist(tmp_path):
    from test_harness import _fake_fmnist

    d = tmp_path / "fmnist"
    d.mkdir()
    _fake_fmnist(d, n=300)
    return d


def test_train_dynamicvit_resumes_and_loads(cli, tiny_default, fake_fmnist, tmp_path):
    out = tmp_path / "run"
    args = ["train", "default", "--method", "dynamicvit", "--set", "keep_rate=0.7", "--data-dir", str(fake_fmnist),
            "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    code, stdout, err = cli(*args, "--max-steps", "3")
    assert code == 0, err
    assert (out / "last.pt").is_file() and not (out / "model.pt").exists()
    code, stdout, err = cli(*args, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["resumed_from"] == 3 and summary["finished"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "dynamicvit" and cfg["params"] == {"keep_rate": 0.7}
    header = (out / "train_log.csv").read_text().splitlines()[0]
    assert "ratio_loss" in header and "keep_frac" in header and "keep_frac_s3" in header
    # the checkpoint carries the predictors and loads into the applied model
    from tokenbench.api import load

    net, prov = load("default", "dynamicvit", {"keep_rate": 0.7}, checkpoint=str(out / "model.pt"))
    assert prov["learned_parts"] == "trained"
    with pytest.raises(UserError, match="does not fit"):
        load("default", "none", {}, checkpoint=str(out / "model.pt"))


def test_finetune_other_method_and_bad_input(cli, tiny_default, fake_fmnist, tmp_path):
    code, stdout, err = cli("train", "default", "--method", "topk", "--data-dir", str(fake_fmnist), "--out",
                            str(tmp_path / "t"), "--epochs", "1", "--batch-size", "64", "--max-steps", "2")
    assert code == 0, err
    code, stdout, err = cli("train", "default", "--method", "dynamicvit", "--set", "keep_rate=1.5")
    assert code == 2 and "out of range" in err
    code, stdout, err = cli("train", "default", "--method", "dynamicvit", "--loss-weight", "bogus=1",
                            "--data-dir", str(fake_fmnist), "--out", str(tmp_path / "b"), "--max-steps", "1")
    assert code == 2 and "unknown loss weight" in err
