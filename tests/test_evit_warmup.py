"""EViT's training-only keep-rate warm-up (the official ``adjust_keep_rate``)."""

import math

import pytest
import torch

from tokenbench.errors import UserError
from tokenbench.registry import get_method


def evit_module():
    import importlib

    return importlib.import_module(get_method("evit").__module__)


def official_adjust_keep_rate(iters, epoch, warmup_epochs, total_epochs, ITERS_PER_EPOCH,
                              base_keep_rate=0.5, max_keep_rate=1):
    # Re-stated from the published algorithm (helpers.adjust_keep_rate) to compare against.
    if epoch < warmup_epochs:
        return 1
    if epoch >= total_epochs:
        return base_keep_rate
    total_iters = ITERS_PER_EPOCH * (total_epochs - warmup_epochs)
    iters = iters - ITERS_PER_EPOCH * warmup_epochs
    return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5


@pytest.mark.parametrize("start,shrink", [(0, 0), (1, 2), (2, 3), (0, 1)])
def test_warmup_matches_official_schedule(start, shrink):
    warmup_keep_rate = evit_module().warmup_keep_rate
    ipe = 7
    for it in range(ipe * (start + shrink + 2)):
        ours = warmup_keep_rate(it / ipe, 0.6, start, shrink)
        ref = official_adjust_keep_rate(it, it // ipe, start, start + shrink, ipe, base_keep_rate=0.6)
        assert ours == pytest.approx(ref, abs=1e-12), (it, ours, ref)


def test_train_params_split_and_refused():
    cls = get_method("evit")
    p, tp = cls.validate_training({"keep_rate": "0.5", "shrink_epochs": "2"})
    assert p == {"keep_rate": 0.5, "fuse_token": True}
    assert tp == {"shrink_start_epoch": 0.0, "shrink_epochs": 2.0}
    with pytest.raises(UserError, match="shrink_epochs"):
        cls.validate_training({"shrink_epoch": 1})
    with pytest.raises(UserError, match="out of range"):
        cls.validate_training({"shrink_epochs": -1})
    with pytest.raises(UserError, match="unknown parameter"):   # not a model parameter
        cls.validate({"shrink_epochs": 1})


def test_warmup_changes_training_tokens_only():
    from conftest import tiny_vit
    TRAIN_KEEP_RATE = evit_module().TRAIN_KEEP_RATE
    from tokenbench.backbones import plan_settings
    from tokenbench.registry import apply

    base = tiny_vit()
    n_patches = base.patch_embed.num_patches
    x = torch.randn(2, 3, *base.patch_embed.img_size)
    model = apply(base, "evit", keep_rate=0.5)
    meth = get_method("evit")()
    params = {"keep_rate": 0.5, "shrink_start_epoch": 1.0, "shrink_epochs": 1.0}

    def tokens_out(train: bool, epoch: float):
        model.train(train)
        meth.train_step(model, params, epoch)
        seen = []
        h = model.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        with torch.no_grad():
            model(x)
        h.remove()
        return seen[0]

    dense = n_patches + 1
    assert tokens_out(True, 0.5) == dense                   # before the warm-up: nothing pruned
    assert plan_settings(model)[TRAIN_KEEP_RATE] == 1.0
    mid, end = tokens_out(True, 1.5), tokens_out(True, 2.0)
    assert end < mid < dense                                # shrinking, then at keep_rate
    assert tokens_out(False, 0.5) == end                    # evaluation always at keep_rate


def test_train_cli_refuses_unknown_train_param(cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("train", "default", "--method", "evit", "--set", "keep_rate=0.7",
                       "--set", "shrink_epoc=1", "--max-steps", "1", "--out", str(out))
    assert code == 2 and "shrink_epochs" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_finetune_records_train_params(tmp_path, monkeypatch):
    """A one-step EViT fine-tune with the warm-up writes the training-only parameters beside
    the model parameters in config.json."""
    import dataclasses
    import json

    from tokenbench import train as T
    from tokenbench import train_data

    n = 64
    g = torch.Generator().manual_seed(0)
    fake = (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
    monkeypatch.setattr(train_data, "fmnist_tensors", lambda data_dir=None: fake)
    cfg = dataclasses.replace(T.FINETUNE_RECIPE, epochs=1, batch_size=32, max_steps=1, eval_limit=16)
    T.finetune("default", "evit", {"keep_rate": 0.7, "shrink_epochs": 1}, tmp_path, cfg=cfg, progress=False)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["params"] == {"keep_rate": 0.7, "fuse_token": True}
    assert conf["train_params"] == {"shrink_start_epoch": 0.0, "shrink_epochs": 1.0}
