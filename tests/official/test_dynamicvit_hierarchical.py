"""DynamicCNN (DynamicViT's journal version on ConvNeXt) against the official ``AdaConvNeXt``
(raoyongming/DynamicViT, ``models/dyconvnext.py``) on the same weights: the official model's
random state dict, predictors and fast paths made decisive, converted to ours by
``convert_checkpoint`` (the path ``--checkpoint`` takes for an official release file).
ConvNeXt-T's layout (stage depths 3, 3, 9, 3; predictors before stage-3 blocks 1, 2, 3) at a
fraction of its width."""

import pytest
import torch

from tokenbench import registry

from .conftest import clone_of

TOL = 1e-5
DEPTHS, DIMS = [3, 3, 9, 3], [16, 32, 64, 128]


def official_convnext(clone, keep_rate):
    from official_code import importing_from

    with importing_from(clone):
        from models.dyconvnext import AdaConvNeXt

        torch.manual_seed(0)
        net = AdaConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=10, pruning_loc=[1, 2, 3],
                          sparse_ratio=[keep_rate, keep_rate - 0.2, keep_rate - 0.4]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decisive predictors, fast paths that matter, logits of a few units
        for name, p in net.named_parameters():
            if "score_predictor" in name or "fast_path" in name or name.endswith("gamma"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if name.startswith("head."):
                p.mul_(30.0)
    return net


@pytest.mark.parametrize("keep_rate", [0.7, 0.9])
def test_dynamiccnn_equals_the_official_adaconvnext(keep_rate, parity):
    from timm.models.convnext import ConvNeXt

    from tokenbench.methods.dynamicvit_hierarchical import convert_checkpoint

    clone = clone_of("raoyongming+DynamicViT")
    theirs = official_convnext(clone, keep_rate)
    dense = ConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=10).eval()
    ours = registry.apply(dense, "dynamicvit", keep_rate=keep_rate).eval()
    converted = convert_checkpoint(ours, theirs.state_dict())
    ours.load_state_dict(converted, strict=True)
    plain = ConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=10).eval()     # the same backbone, no method
    plain.load_state_dict({k: v for k, v in converted.items() if k in plain.state_dict()}, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parity.check(ours(x), theirs(x), TOL, f"ConvNeXt-T layout, keep_rate={keep_rate}", reduced_from=plain(x))
