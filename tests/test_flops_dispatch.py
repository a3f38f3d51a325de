"""FLOPs on many images by fvcore's rules read on the dispatcher, equal to fvcore image by image."""

from __future__ import annotations

import torch

from conftest import tiny_vit
from tokenbench import registry
from tokenbench.measure import flop_count
from tokenbench.measure.flops_dispatch import count


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[: n // 2, :, :16] = 0.0          # half the images with an empty band: different token counts
    return x


def test_per_image_flops_equal_fvcore_image_by_image():
    model = registry.apply(tiny_vit(), "ats", keep_rate=0.6)
    xs = images(4)
    fv = [flop_count.fvcore_count(model, xs[i:i + 1]) for i in range(4)]   # fvcore, image by image
    want = [t / 1e9 for t, _ in fv]
    assert len(set(want)) > 1                                     # the counts do vary per image
    got = flop_count.flops(model, inputs=xs, max_images=4)
    assert abs(got["gflops"] - sum(want) / 4) < 1e-12
    assert got["gflops_per_image"]["min"] == min(want) and got["gflops_per_image"]["max"] == max(want)
    for i, (total, by_op) in enumerate(fv):
        fast_total, fast_by_op = count(model, xs[i:i + 1])
        assert fast_total == total and {k: v for k, v in fast_by_op.items() if v} == by_op


def test_dense_and_merging_models_count_like_fvcore():
    for name in ("none", "tome", "mctf", "evit"):
        model = registry.apply(tiny_vit(), name)
        x = images(1)
        assert count(model, x)[0] == flop_count.fvcore_count(model, x)[0], name


def test_an_operator_without_a_rule_falls_back_to_fvcore():
    class Mixer(torch.nn.Module):
        def forward(self, x):
            return torch.einsum("bchw,bchw->bc", x, x)

    assert count(Mixer(), torch.rand(1, 3, 4, 4)) is None
