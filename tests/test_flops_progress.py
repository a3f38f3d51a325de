"""Counting FLOPs image by image (methods whose token count depends on the image) reports its
progress: each image as it is traced, and a bar with the time left on a terminal."""

import torch

from tokenbench import registry, runner
from tokenbench.measure import flop_count

from conftest import register_tiny_timm, tiny_vit

TINY = register_tiny_timm("tiny_vit_flops_progress")


def test_flops_tells_each_image_as_it_is_counted():
    net = tiny_vit()
    registry.apply(net, "ats", keep_rate=0.7)
    seen = []
    flop_count.flops(net, inputs=torch.randn(3, 3, 32, 32), max_images=3, on_image=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_flops_on_data_draws_a_bar_when_asked(monkeypatch):
    bars = []
    real = runner.image_progress

    def spy(total):
        bars.append(total)
        return real(total)

    monkeypatch.setattr(runner, "image_progress", spy)
    net, _ = __import__("tokenbench.api", fromlist=["load"]).load(TINY, "ats", {"keep_rate": 0.7})
    s = runner.Settings(data="synthetic", limit=4, flops_on_data=True)
    m = runner.flops_on_data(net, {"img_size": None}, s, progress=True)
    assert bars == [4] and m["flops_images"] == 4
    runner.flops_on_data(net, {"img_size": None}, s)
    assert bars == [4]                                                      # no bar unless asked
