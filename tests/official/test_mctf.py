"""MCTF against the official model (mlvlab/MCTF, ``models/deit.py`` with ``models/modules/blocks.py``
and ``utils/mctf.py``) on the same weights, at the official evaluation settings
(``--mctf_type [r,0,0,1,1,1,20,40,1,1,0] --activate_layer [1..11]``) and variations of them."""

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5
OFFICIAL = dict(r=16, tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=True, one_step_ahead=1, pooling=1,
                prop_attn=True)


def official(dense, clone, p):
    from official_code import import_bare, importing_from, load_same_weights
    from official_code._geometry import vit_geometry

    g = vit_geometry(dense)
    g["input_size"] = g.pop("img_size")
    mctf_type = [p["r"], 0, 0, int(p["prop_attn"]), p["one_step_ahead"], p["tau_sim"], p["tau_info"], p["tau_size"],
                 int(p["bidirection"]), p["pooling"], 0]
    with importing_from(clone):
        m = import_bare(clone, "models.deit")
        net = m.VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), task_type=[1, 0, 0], use_mctf=True,
                                  activate_layer=list(range(1, g["depth"])), mctf_type=mctf_type, **g).eval()
    load_same_weights(net, dense.state_dict())
    return lambda x: net(x, r_eval=p["r"])


@pytest.mark.parametrize("changes", [dict(r=6), dict(r=4, one_step_ahead=2), dict(r=5, bidirection=False),
                                     dict(r=6, pooling=0, prop_attn=False)],
                         ids=["official-settings", "precise", "one-direction", "size-pooling-no-prop-attn"])
def test_mctf_equals_the_official_model(changes, parity, peaked):
    clone = clone_of("mlvlab+MCTF")
    p = dict(OFFICIAL, **changes)
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "mctf", **p)
    theirs = official(dense, clone, p)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, str(changes), reduced_from=dense(x))
