"""ToMe against the official ``tome.patch.timm`` (facebookresearch/ToMe) on the same timm model."""

import copy

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


@pytest.mark.parametrize("params", [dict(r=4), dict(r=8, prop_attn=False), dict(r=[6, 0, 3, 8] * 3)],
                         ids=["r4", "r8-no-prop-attn", "r-schedule"])
def test_tome_equals_the_official_patch(params, parity, peaked):
    from official_code import BUILDERS

    off = BUILDERS["tome"]
    clone = clone_of(off.repo)
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "tome", **params)
    official = off.build(dense, ours, clone, **params)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), official(x), TOL, str(params), reduced_from=dense(x))
