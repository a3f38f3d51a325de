"""ToFu against the one public reimplementation (PiToMe repository, ``algo/tofu``; ToFu has no
official code), where the two agree by design: the pruning blocks.  Both prune in every block
(ours ``merge_from`` past the depth; theirs every block's strategy set to ``prune``), without
proportional attention, with ours given the per-block ``r`` that their keep ratio gives
(``floor(T - T * ratio)`` of the ``T`` tokens entering the block).  Their MLERP step differs
from ours on purpose (methods/tofu.py says how), so it is not compared."""

import copy
import math
import types

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5
REPO = "hchautran+PiToMe"


def their_r(tokens: int, depth: int, ratio: float) -> list[int]:
    """Tokens removed per block under their ratio rule (class token counted in ``T``)."""
    out = []
    for _ in range(depth):
        r = math.floor(tokens - tokens * ratio)
        out.append(r)
        tokens -= r
    return out


def reimplementation(dense, clone, ratio):
    from timm.models.vision_transformer import VisionTransformer

    from official_code import import_bare, importing_from

    net = copy.deepcopy(dense).eval()
    with importing_from(clone):
        deit = import_bare(clone, "algo.tofu.patch.deit")
        deit.apply_patch(net, prop_attn=False)
    for blk in net.blocks:
        blk.init_strategy("prune")
    net.ratio = ratio
    # their forward_features reads attributes newer timm dropped (pre_logits, dist_token);
    # timm's own does the same embedding, blocks and norm, and the head pools the class token
    net.forward_features = types.MethodType(VisionTransformer.forward_features, net)
    return lambda x: net(x, return_flop=False)


@pytest.mark.parametrize("ratio", [0.9, 0.8])
def test_tofu_pruning_equals_the_pitome_reimplementation(ratio, parity, peaked):
    clone = clone_of(REPO)
    dense = peaked(tiny_vit())
    r = their_r(65, 12, ratio)
    ours = registry.apply(copy.deepcopy(dense), "tofu", r=r, merge_from=12, prop_attn=False)
    theirs = reimplementation(dense, clone, ratio)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, f"ratio={ratio} (r={r})", reduced_from=dense(x))
