"""ATS against the official ViT with ATS blocks (adaptivetokensampling/ATS,
``libs/models/transformers/vit.py``, ``ats_block.py``, ``transformer_block.py``; only its
``MODEL_REGISTRY`` stubbed and the configuration given as a namespace), in the official DeiT-S
configuration (``ATS_BLOCKS = [3..11]``, ``NUM_TOKENS`` = every token, ``DROP_TOKENS``) on the
same weights.  The official code runs one image at a time here: in a padded batch it scores the
padding as 0, so an image's result depends on its batch-mates (methods/ats.py, "Deviations");
ours runs the batch."""

import copy
import sys
import types

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


def official(dense, clone):
    from official_code import import_bare, importing_from, load_same_weights
    from official_code._geometry import vit_geometry

    g = vit_geometry(dense)
    tokens = (g["img_size"] // g["patch_size"]) ** 2 + 1
    vit = types.SimpleNamespace(IMG_SIZE=g["img_size"], PATCH_SIZE=g["patch_size"], IN_CHANNELS=3,
                                NUM_CLASSES=g["num_classes"], EMBED_DIM=g["embed_dim"], DEPTH=g["depth"],
                                NUM_HEADS=g["num_heads"], MLP_RATIO=g["mlp_ratio"], QKV_BIAS=g["qkv_bias"],
                                QK_SCALE=None, REPRESENTATION_SIZE=None, DROP_RATE=0.0, ATTN_DROP_RATE=0.0,
                                DROP_PATH_RATE=0.0, HYBRID_BACKBONE=None, NORM_LAYER=None,
                                ATS_BLOCKS=list(range(3, g["depth"])), NUM_TOKENS=[tokens] * g["depth"],
                                DROP_TOKENS=True)
    registry_stub = types.SimpleNamespace(register=lambda *a, **k: (lambda cls: cls))
    with importing_from(clone):
        sys.modules["libs.models.build"] = types.SimpleNamespace(MODEL_REGISTRY=registry_stub)
        try:
            m = import_bare(clone, "libs.models.transformers.vit")
        finally:
            sys.modules.pop("libs.models.build", None)
        net = m.ViT(types.SimpleNamespace(VIT=vit)).eval()
    load_same_weights(net, dense.state_dict(), own=lambda k: k.endswith(".out_zero_mask"))  # a constant buffer
    return lambda x: net(x)[0]


def test_ats_equals_the_official_model_image_by_image(parity, peaked):
    clone = clone_of("adaptivetokensampling+ATS")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "ats")
    theirs = official(dense, clone)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.cat([theirs(x[i:i + 1]) for i in range(len(x))])
        parity.check(ours(x), want, TOL, "official DeiT-S configuration", reduced_from=dense(x))
