"""Fashion-MNIST's val split is carved from train: disjoint from test and from training."""

import json
from pathlib import Path

import pytest
import torch

from conftest import register_tiny_timm

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
TINY = register_tiny_timm("tiny_vit_fmnist_val", img_size=28, in_chans=1, patch_size=7)


def test_val_is_held_out_of_train_and_not_test():
    from tokenbench.data import load_fashion_mnist
    from tokenbench.train_data import fmnist_tensors

    vx, vy = load_fashion_mnist("val")
    tx, ty = load_fashion_mnist("train")
    sx, _ = load_fashion_mnist("test")
    assert len(vy) == 5000 and len(ty) == 55000 and len(sx) == 10000
    assert torch.bincount(vy).tolist() == [500] * 10
    val_rows = {bytes(r.numpy()) for r in vx}
    assert not val_rows & {bytes(r.numpy()) for r in sx[:2000]}
    # training reads the same train split: none of the val images
    train_x = fmnist_tensors(splits=("train",))[0]
    assert len(train_x) == 55000
    assert load_fashion_mnist("val")[0].equal(vx)          # deterministic


def test_eval_val_differs_from_test_and_says_which(cli):
    runs = {}
    for split in ("val", "test"):
        code, out, err = cli("eval", TINY, "--data", "fashion-mnist", "--split", split, "--limit", "50",
                             "--device", "cpu", "--json")
        assert code == 0, err
        runs[split] = json.loads(out)
    assert runs["val"]["data"]["indices_sha"] != runs["test"]["data"]["indices_sha"]
    assert "held out" in runs["val"]["data"]["carved"]
    from tokenbench.identity import data_fingerprint
    assert len({data_fingerprint("fashion-mnist", s) for s in ("train", "val", "test")}) == 3
    code, out, _ = cli("eval", "--help")
    assert "5,000" in out
