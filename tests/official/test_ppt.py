"""PPT against the official patch (xjwu1024/PPT, ``ppt_deit.apply_patch`` at blocks 3, 6, 9, then
``model.r``) on the same timm model: thresholds that send every image to pruning, every image
to pooling, and the official default.  With proportional attention (the official default): without
it the official code forgets token sizes at each site, which ours does not (methods/ppt.py)."""

import copy

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5
SITES = [3, 6, 9]


def official(dense, clone, r, threshold, prop_attn):
    from official_code import importing_from

    net = copy.deepcopy(dense).eval()
    with importing_from(clone):
        import ppt_deit

        ppt_deit.apply_patch(net, prop_attn=prop_attn, pp_loc_list=SITES, threshold=threshold)
    net.r = r
    return net


@pytest.mark.parametrize("r,threshold,prop_attn", [(8, 0.0, True), (8, 1.0, True), (12, 7e-5, True),
                                                   (50, 7e-5, True)],
                         ids=["prune", "pool", "official-threshold", "official-defaults"])
def test_ppt_equals_the_official_patch(r, threshold, prop_attn, parity, peaked):
    clone = clone_of("xjwu1024+PPT")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "ppt", r=r, threshold=threshold, prop_attn=prop_attn)
    theirs = official(dense, clone, r, threshold, prop_attn)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, f"r={r} threshold={threshold} prop_attn={prop_attn}",
                     reduced_from=dense(x))
