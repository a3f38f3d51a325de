"""A dense model's encoder started from a classification checkpoint, and its optimiser groups."""

import pytest
import torch

from tokenbench.errors import UserError
from tokenbench.models import build_embedded
from tokenbench.models_seg import build_seg_model, init_encoder
from tokenbench.train_seg import split_groups

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_channels": [8, 16]}
TINY_CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16]}


def classifier(arch, family=None):
    torch.manual_seed(1)
    return build_embedded({**arch, "img_size": 28, "num_classes": 10, **({"family": family} if family else {})})


def test_a_vit_encoder_takes_the_classifier_weights_with_position_embeddings_resampled_to_its_grid():
    from timm.layers import resample_abs_pos_embed

    cls = classifier(TINY_VIT)
    seg = build_seg_model("default-seg", TINY_VIT)
    left_out = init_encoder(seg, cls.state_dict())
    enc, src = seg.encoder.state_dict(), cls.state_dict()
    assert left_out == ["head.bias", "head.weight"]
    assert torch.equal(enc["blocks.1.mlp.fc2.weight"], src["blocks.1.mlp.fc2.weight"])
    assert torch.equal(enc["patch_embed.proj.0.weight"], src["patch_embed.proj.0.weight"])
    assert enc["pos_embed"].shape == (1, 1 + 14 * 14, 32)
    expected = resample_abs_pos_embed(src["pos_embed"], (14, 14), num_prefix_tokens=1)
    assert torch.allclose(enc["pos_embed"], expected)
    assert torch.equal(enc["pos_embed"][:, 0], src["pos_embed"][:, 0])  # the class token's stays


def test_a_convnext_encoder_takes_the_classifier_weights_but_its_classifier():
    cls = classifier(TINY_CONVNEXT, "convnext")
    seg = build_seg_model("default-convnext-seg", TINY_CONVNEXT)
    left_out = init_encoder(seg, cls.state_dict())
    assert left_out == ["head.fc.bias", "head.fc.weight"]
    enc, src = seg.encoder.state_dict(), cls.state_dict()
    assert all(torch.equal(enc[k], src[k]) for k in enc)


def test_weights_of_another_architecture_are_refused_in_one_line():
    cls = classifier({**TINY_VIT, "embed_dim": 48})
    seg = build_seg_model("default-seg", TINY_VIT)
    with pytest.raises(UserError, match="do not fit the encoder"):
        init_encoder(seg, cls.state_dict())


def test_the_decoder_learns_at_the_full_rate_and_the_encoder_at_its_scale():
    seg = build_seg_model("default-seg", TINY_VIT)
    groups = split_groups(seg, 0.05, 0.2)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale) == sum(1 for _ in seg.parameters())
    assert all(scale[id(p)] == 1.0 for p in seg.decoder.parameters())
    assert seg.refine is not None and all(scale[id(p)] == 1.0 for p in seg.refine.parameters())
    assert all(scale[id(p)] == 0.2 for p in seg.encoder.parameters())
