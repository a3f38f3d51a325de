"""LTMP against the official inference model (Mxbonn/ltmp,
``ltmp/timm/lt_mergeprune_inference.py``: ``InferenceLTMPVisionTransformer`` with its
``InferenceLTMPBlock``) on the same weights and thresholds.  The official inference runs one
image at a time (per-image token counts), so it is called image by image; ours runs the batch
(padded and masked).  Thresholds are set so that every block merges and prunes."""

import copy

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


def official(dense, ours, clone):
    from official_code import import_bare, importing_from, load_same_weights
    from official_code._geometry import vit_geometry

    with importing_from(clone):
        m = import_bare(clone, "ltmp.timm.lt_mergeprune_inference")
    cls = type("Inference", (m.InferenceLTMPVisionTransformer,), {
        # newer timm's init_weights reads an attribute the official constructor never sets;
        # every weight is loaded from ours afterwards
        "init_weights": lambda self, mode="": None,
        # newer timm's forward passes an attn_mask the official forward_features does not take,
        # and its forward_head reads attributes the official constructor never sets: the
        # class-token head of timm 0.9 (the official's time), written out
        "forward": lambda self, x: self.head(self.fc_norm(self.forward_features(x)[:, 0]))})
    net = cls(block_fn=m.InferenceLTMPBlock, **vit_geometry(dense)).eval()
    net.reg_token, net.dynamic_img_size = None, False   # read by newer timm's _pos_embed
    load_same_weights(net, ours.state_dict(), rename=lambda k: k.replace("ltmp.", "blocks.", 1))
    return net


@pytest.mark.parametrize("merge_t,prune_t", [(0.2, 0.5), (0.5, 0.9), (0.0, 0.0)],
                         ids=["merge-and-prune", "less", "merge-most"])
def test_ltmp_equals_the_official_inference_model(merge_t, prune_t, parity, peaked):
    clone = clone_of("Mxbonn+ltmp")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "ltmp")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("merge_masker.threshold"):
                p.fill_(merge_t)
            elif name.endswith("prune_masker.threshold"):
                p.fill_(prune_t / 65)                 # importance: mean attention received, 1/N on average
    theirs = official(dense, ours, clone)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.cat([theirs(x[i:i + 1]) for i in range(len(x))])
        parity.check(ours(x), want, TOL, f"merge threshold {merge_t}, prune threshold {prune_t}/65",
                     reduced_from=dense(x))
