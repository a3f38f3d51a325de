"""`tokenbench train` on image folders and synthetic data; the Fashion-MNIST batches unchanged."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenbench.errors import UserError
from tokenbench.train import FINETUNE_RECIPE, TrainConfig, finetune
from tokenbench.train_data import augment

from conftest import register_tiny_timm  # noqa: E402

TINY = register_tiny_timm("tiny_vit_train_data")  # 32 px, patch 4, 10 classes


def _folder(root: Path, classes: int = 2, per_class: int = 8, splits=("train", "val")) -> Path:
    """A tiny ImageFolder tree: ``root/<split>/class<k>/<i>.png``, 32x32 RGB, class k brightest in channel k."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                a = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)
                a[..., c % 3] += 127
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("imgs"))


def _cfg(**kw):
    # 16 training images, batches of 4: 4 steps an epoch, 8 in all
    base = dataclasses.replace(FINETUNE_RECIPE, epochs=2, batch_size=4, lr=1e-3, warmup_steps=2, ckpt_every=2,
                               eval_every=4, eval_limit=4, num_workers=0, threads=1)
    return dataclasses.replace(base, **kw)


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("method,params", [("none", {}), ("dynamicvit", {"keep_rate": 0.7})])
def test_folder_training_writes_a_run(images, tmp_path, method, params):
    out = tmp_path / "run"
    s = finetune(TINY, method, params, out, _cfg(), data="folder", data_dir=str(images), progress=False)
    assert s["finished"] and s["steps"] == 8 and 0 <= s["test_acc"] <= 100
    assert (out / "model.pt").is_file() and (out / "model.pt.sha256").is_file() and (out / "last.pt").is_file()
    rows = (out / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4", "8"]
    assert all(np.isfinite(float(r.split(",")[3])) for r in rows[1:])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == "folder" and cfg["data_dir"] == str(images) and cfg["classes"] == 2
    assert cfg["train_images"] == 16 and cfg["eval_images"] == 16 and cfg["eval_split"] == "val"
    tf = cfg["train_transform"]
    assert tf["mixup"] is None and tf["cutmix"] is None and "mixup" in tf["note"]
    assert tf["timm_create_transform"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert tf["timm_create_transform"]["input_size"] == [3, 32, 32]
    assert cfg["eval_transform"]["timm_create_transform"]["input_size"] == [3, 32, 32]


def test_folder_resume_matches_straight_run(images, tmp_path):
    """Stopped at step 3 (mid-epoch, past a checkpoint) and resumed == trained straight through."""
    p = {"keep_rate": 0.7}
    finetune(TINY, "dynamicvit", p, tmp_path / "a", _cfg(), data="folder", data_dir=str(images), progress=False)
    s = finetune(TINY, "dynamicvit", p, tmp_path / "b", _cfg(max_steps=3), data="folder", data_dir=str(images),
                 progress=False)
    assert s["step"] == 3 and not s["finished"]
    s = finetune(TINY, "dynamicvit", p, tmp_path / "b", _cfg(), data="folder", data_dir=str(images), progress=False)
    assert s["resumed_from"] == 3 and s["finished"]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = [(tmp_path / r / "train_log.csv").read_text().splitlines()[-1].split(",")[:6] for r in "ab"]
    assert last[0] == last[1]  # step, epoch, lr, loss and accuracy over steps 5-8, test accuracy


def test_folder_batches_independent_of_workers_and_start(images):
    """A step's images and augmentation depend on (seed, step) only: not on workers, nor where the loader started."""
    from tokenbench.api import load
    from tokenbench.train_data import build_source

    net, _ = load(TINY)
    src = build_source("folder", str(images), net, _cfg())
    cfg = _cfg()
    straight = list(src.batches(0, 6, 4, cfg))  # crosses the epoch boundary at step 4
    assert len(straight) == 6 and straight[0][0].shape == (4, 3, 32, 32)
    resumed = list(src.batches(3, 6, 4, cfg))
    src.num_workers = 1
    workers = list(src.batches(0, 2, 4, cfg))
    for (x, y), (x2, y2) in zip(straight[3:] + straight[:2], resumed + workers):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # an epoch holds every image once (16 images, 4 batches of 4), the next epoch in another order
    ep0 = torch.cat([y for _, y in straight[:4]])
    assert sorted(ep0.tolist()) == [0] * 8 + [1] * 8
    assert not torch.equal(straight[0][0], straight[4][0])


def test_bad_folders_give_user_errors(images, tmp_path, cli):
    no_train = _folder(tmp_path / "only_val", splits=("val",))
    with pytest.raises(UserError, match="no train/ split"):
        finetune(TINY, "none", {}, tmp_path / "r", _cfg(), data="folder", data_dir=str(no_train), progress=False)
    with pytest.raises(UserError, match="does not exist"):
        finetune(TINY, "none", {}, tmp_path / "r", _cfg(), data="imagenet", data_dir=str(tmp_path / "nope"),
                 progress=False)
    with pytest.raises(UserError, match="--data-dir is required"):
        finetune(TINY, "none", {}, tmp_path / "r", _cfg(), data="folder", progress=False)
    with pytest.raises(UserError, match="an ImageNet split has 1000"):  # data.py's own check
        finetune(TINY, "none", {}, tmp_path / "r", _cfg(), data="imagenet", data_dir=str(images), progress=False)
    with pytest.raises(UserError, match="fewer than one batch"):
        finetune(TINY, "none", {}, tmp_path / "r", _cfg(batch_size=32), data="folder", data_dir=str(images),
                 progress=False)
    code, _, err = cli("train", TINY, "--method", "none", "--data", "folder", "--data-dir", str(no_train),
                       "--out", str(tmp_path / "c"))
    assert code == 2 and "no train/ split" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", TINY, "--method", "none", "--data", "imagenett", "--out", str(tmp_path / "c"))
    assert code == 2 and "imagenet" in err


def test_synthetic_training_from_the_cli(cli, tmp_path):
    out = tmp_path / "syn"
    code, stdout, err = cli("train", TINY, "--method", "none", "--data", "synthetic", "--out", str(out),
                            "--batch-size", "64", "--max-steps", "2", "--num-workers", "0", "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and np.isfinite(summary["test_acc"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == "synthetic" and cfg["synthetic"]["img_size"] == 32 and cfg["train"]["num_workers"] == 0
    # num_workers does not change results, so resuming with another value is allowed
    code, stdout, err = cli("train", TINY, "--method", "none", "--data", "synthetic", "--out", str(out),
                            "--batch-size", "64", "--max-steps", "3", "--num-workers", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["resumed_from"] == 2


def test_fashion_mnist_batches_unchanged():
    """The tensor source yields exactly what the loop computed inline before batch sources existed."""
    from tokenbench.train_data import TensorSource

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, 28, 28, generator=g)
    y = torch.arange(100) % 10
    cfg = TrainConfig(batch_size=32, seed=3, shift=3, hflip=True, erase_p=0.25)
    src = TensorSource(x, y, x[:10], y[:10])
    steps_per_epoch = 100 // 32
    got = list(src.batches(0, 5, steps_per_epoch, cfg))  # 3 steps an epoch: crosses into epoch 1
    # the old inline code of train_loop
    perm, perm_epoch = None, -1
    for step in range(5):
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
            perm = torch.randperm(100, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            perm_epoch = epoch
        i = step % steps_per_epoch
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        gs = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        want_x, want_y = augment(x[idx], cfg, gs), y[idx]
        assert torch.equal(got[step][0], want_x) and torch.equal(got[step][1], want_y), step
    # resuming at step 4 gives step 4's batch
    (rx, ry), = list(src.batches(4, 5, steps_per_epoch, cfg))
    assert torch.equal(rx, got[4][0]) and torch.equal(ry, got[4][1])
