"""The surgery honours timm's fused-attention switch, and the record says which kernel ran."""

import pytest
import torch
import torch.nn.functional as F

from conftest import peak_weights, random_images, tiny_vit
from tokenbench import registry, runner
from tokenbench.measure import env
from tokenbench.backbones import AttnInfo


def _set_fused(model, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on


@pytest.mark.parametrize("name,params", [("tome", {"r": 4}), ("evit", {"keep_rate": 0.7}), ("none", {})])
def test_explicit_attention_when_timm_fused_attn_is_off(name, params, monkeypatch):
    m = peak_weights(registry.apply(tiny_vit(), name, **params)).eval()
    x = random_images(m, 3)
    with torch.inference_mode():
        fused = m(x)
    assert env.attention_kernel(m) == "sdpa"
    _set_fused(m, False)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        explicit = m(x)
    assert not calls  # the surgery ran the explicit softmax, as timm's own forward would
    assert env.attention_kernel(m) == "explicit"
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-4)
    _set_fused(m, True)
    with torch.inference_mode():
        m(x)
    assert calls  # and the fused kernel again when the switch is back on


def test_class_attention_is_one_row():
    # what EViT and top-k read: the class query against all keys, never the full matrix
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    info = AttnInfo(q, k, None, 0.5, 1)
    full = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(info.cls_attn(), full[:, :, 0].mean(1))


def test_the_explicit_product_is_timed_under_its_own_key():
    # a timing with timm's switch off never reuses, nor replaces, one of the fused kernel
    from timm.layers import set_fused_attn, use_fused_attn

    spec = runner.spec_dict("vit_tiny_patch16_224", "tome", {"r": 2, "prop_attn": True}, False, None, None)
    dense = runner.spec_dict("vit_tiny_patch16_224", "none", {}, False, None, None)
    cpu = runner.Settings(device="cpu")

    def keys():
        return (runner.key_fields("throughput", spec, "w", cpu),
                runner.key_fields("speedup", spec, "w", cpu, baseline=dense),
                runner.key_fields("flops", spec, "w", cpu))

    assert use_fused_attn() and env.timm_attention() == "sdpa"
    fused = keys()
    assert all("attention" not in k for k in fused)  # fused keys are as they always were
    set_fused_attn(False)
    try:
        explicit = keys()
        assert env.timm_attention() == "explicit"
    finally:
        set_fused_attn(True)
    set_fused_attn(True, experimental=True)  # TIMM_FUSED_ATTN=2: models fused only on request are fused too
    try:
        experimental = keys()
    finally:
        set_fused_attn(True)
    assert explicit[0]["attention"] == explicit[1]["attention"] == "explicit"
    assert experimental[0]["attention"] == "sdpa-experimental"
    assert len({str(fused[0]), str(explicit[0]), str(experimental[0])}) == 3
    assert explicit[1] != fused[1] != experimental[1]
    assert explicit[2] == fused[2] == experimental[2]  # FLOPs do not depend on the kernel
