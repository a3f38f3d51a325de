"""DynamicViT against the official ``VisionTransformerDiffPruning`` (raoyongming/DynamicViT),
both loading the same state dict (backbone and prediction modules).  The official forward
counts 14 x 14 patches, so the model is 224 px, patch 16, narrow (48 channels)."""

import copy

import pytest
import torch

from tokenbench import registry

from .conftest import clone_of, narrow_deit

TOL = 1e-5


@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
def test_dynamicvit_equals_the_official_model(keep_rate, parity, peaked):
    from official_code import BUILDERS

    off = BUILDERS["dynamicvit"]
    clone = clone_of(off.repo)
    dense = peaked(narrow_deit())
    ours = registry.apply(copy.deepcopy(dense), "dynamicvit", keep_rate=keep_rate)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # predictors that rank tokens decisively (the official init is near zero)
        for name, p in ours.named_parameters():
            if name.startswith("score_predictor."):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    official = off.build(dense, ours, clone, keep_rate=keep_rate)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), official(x), TOL, f"keep_rate={keep_rate}", reduced_from=dense(x))
