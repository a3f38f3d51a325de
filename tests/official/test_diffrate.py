"""DiffRate against the official DeiT patch (OpenGVLab/DiffRate, ``DiffRate/patch/deit.py`` with
``set_kept_num``) on the same timm model.  The official counts are on the 197-token scale, so
the model has DeiT-S's geometry (224 px, patch 16) at a narrow width."""

import copy

import pytest
import torch

from tokenbench import registry

from .conftest import clone_of, narrow_deit

TOL = 1e-5
STEEP = ([197, 190, 160, 140, 120, 100, 90, 80, 60, 50, 40, 10],   # prune, then merge, per block
         [197, 180, 150, 130, 110, 95, 85, 70, 55, 45, 30, 5])


def official(dense, clone, prune, merge):
    from official_code import import_bare, importing_from

    net = copy.deepcopy(dense).eval()
    with importing_from(clone):
        deit = import_bare(clone, "DiffRate.patch.deit")
        deit.apply_patch(net)
    for blk in net.blocks:   # the block reads timm 0.4's one drop_path (newer timm: drop_path1/2, Identity here)
        blk.drop_path = blk.drop_path1
    net.set_kept_num(list(prune), list(merge))
    return lambda x: net(x, return_flop=False)


@pytest.mark.parametrize("schedule", ["default", "steep"])
def test_diffrate_equals_the_official_patch(schedule, parity, peaked):
    from tokenbench.registry import get_method

    clone = clone_of("OpenGVLab+DiffRate")
    defaults = {p.name: p.default for p in get_method("diffrate").params}
    prune, merge = (defaults["prune"], defaults["merge"]) if schedule == "default" else STEEP
    dense = peaked(narrow_deit())
    ours = registry.apply(copy.deepcopy(dense), "diffrate", prune=list(prune), merge=list(merge))
    theirs = official(dense, clone, prune, merge)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, f"{schedule} schedule", reduced_from=dense(x))
