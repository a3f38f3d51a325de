"""A-ViT against the official model (NVlabs/A-ViT, ``timm/models/act_vision_transformer.py``:
``VisionTransformer`` with ``act_mode = 4``, ``forward_features_act_token``) on the same weights
and gate.  The repository ships its own copy of an old timm; the model file is loaded from it
under another package name, beside the installed timm.  Its forward allocates its state with
``.cuda()``: on a CPU that call is made a no-op while it runs.  Both are in inference mode (the
official masks halted tokens, ours drops them: the same logits)."""

import argparse
import copy
from unittest import mock

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


def official(dense, clone, gate_scale, gate_center):
    from official_code import import_bare, importing_from, load_same_weights
    from official_code._geometry import vit_geometry

    with importing_from(clone):
        m = import_bare(clone, "avit_vendored_timm.models.act_vision_transformer", top="timm")
    args = argparse.Namespace(act_mode=4, gate_scale=gate_scale, gate_center=gate_center, distr_prior_alpha=0.0)
    net = m.VisionTransformer(args=args, **vit_geometry(dense)).eval()
    load_same_weights(net, dense.state_dict())
    return net


@pytest.mark.parametrize("gate_scale,gate_center", [(10.0, 5.0), (4.0, 2.0), (10.0, 75.0)],
                         ids=["halting", "halting-early", "official-deit-s-gate"])
def test_avit_equals_the_official_model(gate_scale, gate_center, parity, peaked):
    clone = clone_of("NVlabs+A-ViT")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "avit", gate_scale=gate_scale, gate_center=gate_center)
    theirs = official(dense, clone, gate_scale, gate_center)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        want = theirs(x)
    with torch.no_grad():
        # the official DeiT-S gate on an untrained model halts no token before the last block
        # (dense logits); the other gates halt tokens early
        halts = gate_center < 75
        parity.check(ours(x), want, TOL, f"gate_scale={gate_scale} gate_center={gate_center}",
                     reduced_from=dense(x) if halts else None)
