"""DCT against the official ``dct`` / ``idct`` (LUMIA-Group/FourierTransformer,
``LRA/code/attention_dct.py``) in a reference forward written here: timm's blocks run one by
one, and before blocks 3, 6 and 9 the patch tokens go through the official transform, the
first ``ceil(keep_rate * n)`` coefficients kept, and the official inverse of that length (times
``sqrt(K / n)`` with ``rescale``, our training-free choice)."""

import copy
import math

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5
SITES = (3, 6, 9)


def reference(dense, dct, idct, x, keep_rate, rescale):
    h = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
    for i, blk in enumerate(dense.blocks):
        if i in SITES:
            prefix, patches = h[:, :1], h[:, 1:]
            n = patches.shape[1]
            k = math.ceil(keep_rate * n)
            coef = dct(patches.transpose(1, 2), norm="ortho")[..., :k]
            patches = idct(coef, norm="ortho").transpose(1, 2)
            if rescale:
                patches = patches * math.sqrt(k / n)
            h = torch.cat([prefix, patches], dim=1)
        h = blk(h)
    return dense.forward_head(dense.norm(h))


@pytest.mark.parametrize("keep_rate,rescale", [(0.7, True), (0.5, True), (0.7, False)])
def test_dct_equals_the_official_transform(keep_rate, rescale, parity, peaked):
    from official_code import importing_from

    clone = clone_of("LUMIA-Group+FourierTransformer")
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "dct", keep_rate=keep_rate, rescale=rescale)
    with importing_from(clone, "LRA/code"):
        from attention_dct import dct, idct
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(dense, dct, idct, x, keep_rate, rescale)
        parity.check(ours(x), want, TOL, f"keep_rate={keep_rate} rescale={rescale}", reduced_from=dense(x))
