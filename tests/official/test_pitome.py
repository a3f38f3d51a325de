"""PiToMe against the official DeiT patch (hchautran/PiToMe, ``algo/pitome/patch/deit.py``,
then ``model.ratio = R``) on the same timm model.  Without proportional attention: the official
DeiT block calls its attention without token sizes (ours offers ``prop_attn``, off by default)."""

import copy
import types

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


def official(dense, clone, ratio, prop_attn):
    from timm.models.vision_transformer import VisionTransformer

    from official_code import import_bare, importing_from

    net = copy.deepcopy(dense).eval()
    with importing_from(clone):
        deit = import_bare(clone, "algo.pitome.patch.deit")
        deit.apply_patch(net, prop_attn=prop_attn)
    net.ratio = ratio
    # their forward_features reads attributes newer timm dropped (pre_logits, dist_token);
    # timm's own runs the same embedding, blocks and norm, and its head pools the class token
    net.forward_features = types.MethodType(VisionTransformer.forward_features, net)
    return lambda x: net(x, return_flop=False)


@pytest.mark.parametrize("ratio", [0.9125, 0.8, 0.95])
def test_pitome_equals_the_official_patch(ratio, parity, peaked):
    prop_attn = False
    clone = clone_of("hchautran+PiToMe")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "pitome", ratio=ratio, prop_attn=prop_attn)
    theirs = official(dense, clone, ratio, prop_attn)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, f"ratio={ratio} prop_attn={prop_attn}", reduced_from=dense(x))
