"""EViT against the official ``EViT`` model (youweiliang/evit) on the same weights."""

import copy

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


@pytest.mark.parametrize("params", [dict(keep_rate=0.7), dict(keep_rate=0.5), dict(keep_rate=0.6, fuse_token=False)],
                         ids=["keep0.7", "keep0.5", "keep0.6-no-fusion"])
def test_evit_equals_the_official_model(params, parity, peaked):
    from official_code import BUILDERS

    off = BUILDERS["evit"]
    clone = clone_of(off.repo)
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "evit", **params)
    official = off.build(dense, ours, clone, **params)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), official(x), TOL, str(params), reduced_from=dense(x))
