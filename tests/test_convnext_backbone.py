"""The ConvNeXt backbone: geometry, parity with timm, and the slow / fast split hook kind
(the block's MLP on a subset of positions, a fast path on the others, scattered back)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_as_timm, slow_fast
from tokenbench import backbones
from tokenbench.backbones import backbone_of
from tokenbench.errors import UserError
from tokenbench.registry import apply


def tiny_convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", num_classes=10).eval()


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_geometry_and_sites():
    bb = backbone_of(tiny_convnext())
    assert bb.name == "convnext" and bb.depth == 12                       # depths (2, 2, 6, 2)
    assert bb.sites("stage 3") == [4, 5, 6, 7, 8, 9]
    assert bb.grid == (14, 14) and bb.input_config()["img_size"] == 224
    assert bb.dense_tokens()[:5] == [56 * 56, 56 * 56, 28 * 28, 28 * 28, 14 * 14]


def test_dense_forward_and_intermediates_equal_timm():
    ref, net = tiny_convnext(), apply(tiny_convnext(), "none")
    assert_same_as_timm(ref, net, _x())
    backbones.restore(net)
    assert type(net.stages[2].blocks[0]) is type(ref.stages[2].blocks[0])


_slow_fast = slow_fast


def test_subset_of_every_position_is_the_dense_block():
    ref, net = tiny_convnext(), _slow_fast(tiny_convnext(), keep=16, fast=None)  # 4 x 4 map at 64 px
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_slow_fast_split_equals_a_per_image_reference():
    """Batched gather / scatter against one image and one position at a time."""
    torch.manual_seed(2)
    fast = torch.nn.Sequential(torch.nn.LayerNorm(160), torch.nn.Linear(160, 160))
    net = _slow_fast(tiny_convnext(), keep=5, fast=fast)
    blk = net.stages[2].blocks[0]
    x = torch.randn(3, 160, 4, 4)
    with torch.no_grad():
        got = blk(x)
        for b in range(3):
            dw = blk.conv_dw(x[b:b + 1])[0].flatten(1).t()                 # [16, C]
            chosen = set(dw.norm(dim=-1).topk(5).indices.tolist())
            for p in range(16):
                t = dw[p:p + 1]
                if p in chosen:
                    out = (blk.mlp(blk.norm(t[..., None, None]))[..., 0, 0] if blk.use_conv_mlp
                           else blk.mlp(blk.norm(t))) * blk.gamma
                else:
                    out = fast(t)
                torch.testing.assert_close(got[b, :, p // 4, p % 4], x[b, :, p // 4, p % 4] + out[0],
                                           rtol=1e-5, atol=1e-5)
    assert backbones.last_state(net).tokens_mlp[-1] == 5


def test_the_map_keeps_its_shape_for_dense_prediction():
    net = _slow_fast(tiny_convnext(), keep=3, fast=None)
    ref = tiny_convnext()
    with torch.no_grad():
        got = net.forward_intermediates(_x(), intermediates_only=True)
        want = ref.forward_intermediates(_x(), intermediates_only=True)
    assert [t.shape for t in got] == [t.shape for t in want]


def test_vit_methods_refuse_convnext_with_one_line():
    with pytest.raises(UserError, match="tome does not apply to convnext models"):
        apply(tiny_convnext(), "tome")
    with pytest.raises(UserError, match="class token"):
        backbone_of(tiny_convnext()).prepare("topk", need_class_token=True)
