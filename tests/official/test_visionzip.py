"""VisionZip against the official reduction (dvlab-research/VisionZip,
``CLIPVisionTower_VisionZip.forward`` in ``visionzip/clip_encoder.py``) in a reference forward
written here: timm's blocks run one by one; at the chosen block its attention and its keys
averaged over heads (what the official patched CLIP attention returns as ``metric``) are taken,
the official forward reduces the block's output from them, and the remaining blocks, the norm
and the head run on the result.  The official forward reads its inputs from a LLaVA vision
tower (HF transformers); here a stand-in object hands it the same tensors, and transformers'
classes, which it only names, are stubbed while it is imported."""

import copy
import sys
import types

import pytest
import torch

from conftest import tiny_vit
from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5


class _Names(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _official_forward(clone):
    from official_code import import_bare, importing_from

    names = ("transformers", "transformers.models", "transformers.models.clip",
             "transformers.models.clip.modeling_clip", "transformers.modeling_outputs")
    if "transformers" in sys.modules:
        pytest.skip("transformers is imported: the stand-ins would shadow it")
    sys.modules.update({n: _Names(n) for n in names})
    try:
        with importing_from(clone):
            return import_bare(clone, "visionzip.clip_encoder").CLIPVisionTower_VisionZip.forward
    finally:
        for n in names:
            sys.modules.pop(n, None)


class _Tower:
    """What the official forward reads of LLaVA's vision tower: the outputs of one call, the
    layer's ``metric`` and ``_info`` (the penultimate entries, as it indexes them with -2)."""

    def __init__(self, attn, out, metric, dominant, contextual):
        self._info = {"dominant": dominant, "contextual": contextual}
        self._outputs = types.SimpleNamespace(attentions=[attn, None], hidden_states=[out, None])
        layer = types.SimpleNamespace(metric=metric)
        self.vision_model = types.SimpleNamespace(encoder=types.SimpleNamespace(layers=[layer, None]))

    def __call__(self, images, **kwargs):
        return self._outputs


def attention_and_keys(blk, h):
    """The block's attention probabilities [B, H, N, N] and keys averaged over heads [B, N, d]."""
    b, n, c = h.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(h)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1), k.mean(1)


def reference(dense, official_forward, x, layer, dominant, contextual):
    h = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
    for i, blk in enumerate(dense.blocks):
        if i == layer:
            attn, metric = attention_and_keys(blk, h)
            out = blk(h)
            tower = _Tower(attn, out, metric, dominant, contextual)
            me = types.SimpleNamespace(vision_tower=tower, device=x.device, dtype=x.dtype)
            h, _ = official_forward(me, x)
        else:
            h = blk(h)
    return dense.forward_head(dense.norm(h))


@pytest.mark.parametrize("keep_rate,contextual,layer", [(0.5, -1, 2), (0.3, 4, 5), (0.6, 10, -2)])
def test_visionzip_equals_the_official_reduction(keep_rate, contextual, layer, parity, peaked):
    from tokenbench.methods.visionzip import split_counts

    clone = clone_of("dvlab-research+VisionZip")
    forward = _official_forward(clone)
    dense = peaked(tiny_vit())
    ours = registry.apply(copy.deepcopy(dense), "visionzip", keep_rate=keep_rate, contextual=contextual, layer=layer)
    dominant, ctx = split_counts(64, keep_rate, contextual)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(dense, forward, x, layer % 12, dominant, ctx)
        parity.check(ours(x), want, TOL, f"keep_rate={keep_rate} contextual={contextual} layer={layer} "
                                         f"({dominant} dominant + {ctx} contextual)", reduced_from=dense(x))
