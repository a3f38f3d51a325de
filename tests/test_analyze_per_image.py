"""tokenbench analyze on a method whose token count varies per image (ATS): its budget and keep
figures against counts taken image by image, one image per forward (no padding)."""

import csv

import numpy as np
import pytest
import torch

from conftest import peak_weights, write_sweep

TINY = "tb_analyze_per_image_vit"
N_IMAGES = 16


def _register():
    """A tiny ViT with peaked attention, so that ATS's samples collide and its counts differ per image."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TINY):
        return

    def build(pretrained=False, **kw):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kw.pop(k, None)
        cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
        return peak_weights(VisionTransformer(**{**cfg, **kw}))

    build.__name__ = TINY
    build.__module__ = "conftest"
    register_model(build)


_register()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    import io
    import sys

    from tokenbench.cli.main import main

    tmp = tmp_path_factory.mktemp("analyze_per_image")
    sweep = write_sweep(tmp / "s.toml", TINY, "[methods.ats]\nkeep_rate = 0.4\n", out=tmp / "out", limit=N_IMAGES,
                        batch_size=8)
    old = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        for args in (["run", str(sweep), "--no-plots", "--json"], ["analyze", str(tmp / "out"), "--json"]):
            try:
                main(args)
            except SystemExit as e:
                assert not e.code, (args, e.code)
    finally:
        sys.stdout, sys.stderr = old
    return tmp / "out"


def _one_by_one(method: str, params: dict):
    """Per image, alone in its batch: mean tokens entering a block, and patches surviving the last block."""
    from tokenbench.analysis.trace import evaluated_dataset, trace_batch
    from tokenbench.api import load
    from tokenbench.backbones import last_state

    net, _ = load(TINY, method, params)
    ds, _ = evaluated_dataset(net, {"name": "synthetic", "limit": N_IMAGES})
    tokens, surviving, labels = [], [], []
    for i in range(len(ds)):
        x, y = ds[i][0][None], int(ds[i][1])
        labels.append(y)
        with torch.no_grad():
            net(x)
        tokens.append(float(np.mean(last_state(net).tokens)))
        surviving.append(float(trace_batch(net, x, [11])["survive_11"].sum()))
    return np.array(tokens), np.array(surviving), np.array(labels)


def test_budget_of_a_per_image_method_is_counted_image_by_image(analysed):
    tokens, surviving, labels = _one_by_one("ats", {"keep_rate": 0.4})
    assert tokens.std() > 0.5                                   # the count really varies per image
    row = next(r for r in _rows(analysed / "analysis" / "budget.csv") if r["setting"].startswith("ats"))
    assert row["count"] == "varies"
    assert float(row["tokens_mean"]) == pytest.approx(tokens.mean(), abs=1e-6)
    assert float(row["tokens_std"]) == pytest.approx(tokens.std(ddof=1), rel=1e-3) or \
        float(row["tokens_std"]) == pytest.approx(tokens.std(), rel=1e-3)
    assert float(row["tokens_min"]) == pytest.approx(tokens.min()) and float(row["tokens_max"]) == pytest.approx(
        tokens.max())
    sp = next(r for r in _rows(analysed / "analysis" / "spatial.csv") if r["setting"].startswith("ats"))
    assert float(sp["surviving"]) == pytest.approx(surviving.mean() / 64, abs=1e-6)
    per_class = next(r for r in _rows(analysed / "analysis" / "budget_per_class.csv")
                     if r["setting"].startswith("ats") and r["quantity"] == "tokens")
    names = [k for k in per_class if k not in ("setting", "level", "quantity")]
    for c, name in enumerate(names):
        if (labels == c).any():
            assert float(per_class[name]) == pytest.approx(tokens[labels == c].mean(), abs=0.01), name
