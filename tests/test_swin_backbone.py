"""The Swin backbone: geometry, parity with timm, the slow / fast split of the FFN (attention on
the full map, MLP on chosen positions, a fast path on the others, scattered back), the
multi-scale maps, FLOPs on K positions, and the official key layout."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_same_as_timm, slow_fast
from tokenbench import backbones
from tokenbench.backbones import backbone_of
from tokenbench.backbones.swin import is_official_layout, official_to_timm
from tokenbench.errors import UserError
from tokenbench.methods._two_streams import two_streams
from tokenbench.registry import apply

# 64 px, windows of 2: stage maps 16, 8, 4, 2; block 3 (stage 3) has shifted windows and masks.
TINY = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=2, num_classes=10)


def tiny_swin(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **{**TINY, **kw}).eval()


def _x(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_geometry_and_sites():
    net = tiny_swin()
    bb = backbone_of(net)
    assert bb.name == "swin" and "swin" in backbones.known_backbones()
    assert bb.depth == 5 and bb.sites("stage 3") == [2, 3] and bb.sites("every") == [0, 1, 2, 3, 4]
    assert bb.grid == (4, 4) and bb.width == 64 and bb.num_patches == 16
    assert bb.dense_tokens() == [256, 64, 16, 16, 4]
    cfg = bb.input_config()
    assert (cfg["img_size"], cfg["in_chans"], cfg["patch_size"], cfg["num_classes"]) == (64, 3, 4, 10)
    assert net.layers[2].blocks[1].shift_size == (1, 1)                  # the test covers shifted windows
    assert bb.activation_bytes(64) >= 256 * 16 * 4 * 4                   # at least the first stage's map
    with pytest.raises(UserError, match="class token"):
        bb.prepare("topk", need_class_token=True)


def test_swin_tiny_geometry_at_224():
    import timm

    bb = backbone_of(timm.create_model("swin_tiny_patch4_window7_224"))
    assert bb.depth == 12 and bb.sites("stage 3") == [4, 5, 6, 7, 8, 9]
    assert bb.grid == (14, 14) and bb.width == 384 and bb.input_config()["img_size"] == 224


def test_dense_forward_and_intermediates_equal_timm():
    ref, net = tiny_swin(), apply(tiny_swin(), "none")
    assert_same_as_timm(ref, net, _x())
    assert backbones.last_state(net).tokens_mlp == [256, 64, 16, 16, 4]
    backbones.restore(net)
    assert all(type(a) is type(b) for a, b in zip(net.modules(), ref.modules()))
    assert not backbones.is_prepared(net)


_slow_fast = slow_fast


def test_subset_of_every_position_is_the_dense_block():
    ref, net = tiny_swin(), _slow_fast(tiny_swin(), keep=16, fast=None)   # the 4 x 4 stage-3 map
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [0, 1])                               # plain and shifted windows
def test_slow_fast_split_equals_a_per_image_reference(block):
    """Batched gather / scatter against one image at a time (the attention on its full map)
    and one position at a time (the MLP or the fast path)."""
    torch.manual_seed(2)
    fast = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    net = _slow_fast(tiny_swin(), keep=5, fast=fast)
    blk = net.layers[2].blocks[block]
    x = torch.randn(3, 4, 4, 64)
    with torch.no_grad():
        got = blk(x)
        for b in range(3):
            mixed = x[b:b + 1] + blk._attn(blk.norm1(x[b:b + 1]))           # [1, 4, 4, C], full map
            flat = mixed[0].reshape(16, 64)
            chosen = set(flat.norm(dim=-1).topk(5).indices.tolist())
            for p in range(16):
                t = flat[p:p + 1]
                out = blk.mlp(blk.norm2(t)) if p in chosen else fast(t)
                torch.testing.assert_close(got[b, p // 4, p % 4], (t + out)[0], rtol=1e-5, atol=1e-5)
    assert backbones.last_state(net).tokens_mlp[-1] == 5


def test_the_maps_keep_their_shapes_for_dense_prediction():
    """``forward_intermediates`` and a ``features_only`` net over the reducing model return the
    dense model's map at every stage."""
    import timm
    from timm.models import FeatureListNet

    net = _slow_fast(tiny_swin(), keep=3, fast=None)
    ref = tiny_swin()
    x = _x()
    with torch.no_grad():
        got = net.forward_intermediates(x, intermediates_only=True)
        want = ref.forward_intermediates(x, intermediates_only=True)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert not torch.allclose(got[2], want[2])                        # stage 3 was reduced
        feats = FeatureListNet(net, out_indices=(0, 1, 2, 3), flatten_sequential=True)(x)
        dense = timm.create_model("swin_tiny_patch4_window7_224", **TINY, features_only=True)(x)
    assert [t.shape for t in feats] == [t.shape for t in dense]
    assert backbones.last_state(net).tokens_mlp == [256, 64, 3, 3, 4]


def test_fvcore_counts_the_mlp_on_k_positions():
    from tokenbench.measure.flop_count import flops

    keep, n, c, hidden = 5, 16, 64, 256
    dense = flops(tiny_swin())
    reduced = flops(_slow_fast(tiny_swin(), keep=keep, fast=None))
    saved = dense["flops_by_operator"]["linear"] - reduced["flops_by_operator"]["linear"]
    assert saved * 1e9 == pytest.approx(2 * (n - keep) * 2 * c * hidden)   # two stage-3 blocks, fc1 + fc2
    assert reduced["tokens_mlp"] == [256, 64, keep, keep, 4]
    # with a fast path (LayerNorm + Linear(C, C), as DynamicViT's) on the N - K others only,
    # which the analytic block cost counts the same way
    fast = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, c))
    net = _slow_fast(tiny_swin(), keep=keep, fast=fast)
    backbones.add_module(net, "fast", fast)                               # a method's module, as methods attach them
    with_fast = flops(net)["flops_by_operator"]["linear"]
    saved = 2 * (n - keep) * (2 * c * hidden - c * c)
    assert (dense["flops_by_operator"]["linear"] - with_fast) * 1e9 == pytest.approx(saved)
    bb = backbone_of(net)
    t = [float(v) for v in bb.dense_tokens()]
    assert bb.block_cost(t, t) - bb.block_cost(t, [*t[:2], keep, keep, t[4]]) == pytest.approx(
        (dense["flops_by_operator"]["linear"] - with_fast) * 1e9)


def test_block_cost_matches_fvcore_on_the_dense_model():
    from tokenbench.measure.flop_count import flops

    net = tiny_swin()
    bb = backbone_of(net)
    t = [float(v) for v in bb.dense_tokens()]
    ops = flops(net)["flops_by_operator"]
    # fvcore's linear + matmul cost minus the stem, merges and head equals the analytic block cost
    merges = sum(m.reduction.in_features * m.reduction.out_features * bb._stage_map(s)[0] * bb._stage_map(s)[1]
                 for s, stage in enumerate(net.layers) if not isinstance(m := stage.downsample, torch.nn.Identity))
    head = net.head.fc.in_features * net.head.fc.out_features
    assert bb.block_cost(t, t) == pytest.approx((ops["linear"] + ops["matmul"]) * 1e9 - merges - head)
    assert bb.block_cost(t, t) > bb.block_cost(t, [*t[:2], 5.0, 5.0, t[4]])


# --------------------------------------------------------------------------- official key layout

def _to_official(model) -> dict:
    """The inverse mapping, written independently: Microsoft's key layout (downsample at the end
    of the stage before, a bare Linear head, the two index / mask buffers stored)."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        k = k.replace("head.fc.", "head.")
        out[k] = v.clone()
    for name, mod in model.named_modules():
        if hasattr(mod, "relative_position_index"):
            out[f"{name}.relative_position_index"] = mod.relative_position_index.clone()
        if getattr(mod, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = mod.attn_mask.clone()
    return out


def test_official_layout_maps_to_timm_keys():
    src = tiny_swin()
    official = _to_official(src)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert "layers.2.blocks.1.attn_mask" in official
    assert is_official_layout(official) and not is_official_layout(src.state_dict())
    extra = {"layers.2.blocks.1.fastmlp.fc1.1.weight": torch.ones(1)}
    mapped = official_to_timm({"model": {**official, **extra}})
    assert mapped.pop("layers.2.blocks.1.fastmlp.fc1.1.weight") is extra["layers.2.blocks.1.fastmlp.fc1.1.weight"]
    dst = tiny_swin()
    torch.manual_seed(5)
    for p in dst.parameters():
        torch.nn.init.normal_(p)
    dst.load_state_dict(mapped, strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_a_dense_official_checkpoint_loads_through_the_checkpoint_loader():
    from tokenbench.backbones import backbone_of
    from tokenbench.checkpoint import load_state_dict_checked

    src = tiny_swin()
    official = _to_official(src)
    dst = tiny_swin()
    torch.manual_seed(5)
    for p in dst.parameters():
        torch.nn.init.normal_(p)
    load_state_dict_checked(dst, official)  # the loader maps the layout through the backbone
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert backbone_of(dst).from_official(src.state_dict()).keys() == src.state_dict().keys()


def test_vit_methods_refuse_swin_with_one_line():
    with pytest.raises(UserError, match="tome does not apply to swin models"):
        apply(tiny_swin(), "tome")


# --------------------------------------------------------------------------- training: two streams

def test_two_streams_equal_the_official_form_written_out():
    """Stage 3 in training with a streams hook at both blocks: the official
    AdaSwinTransformerBlock / BasicLayer arithmetic, written out here, block by block."""
    torch.manual_seed(3)
    net = tiny_swin(drop_path_rate=0.0).train()
    fast = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    masks = {i: (torch.rand(3, 16, 1) < 0.5).float() for i in (2, 3)}
    seen, started = {}, []
    bb = backbone_of(net)
    plan = bb.prepare("toy")
    plan.on_start.append(lambda model, x, st: started.append((model, tuple(x.shape))))
    for i in (2, 3):
        plan.pre[i] = lambda block, t, st, i=i: seen.__setitem__(i, t.clone())
        plan.block[i] = two_streams(type(bb), lambda block, t, st, i=i: (masks[i], fast))
        plan.subset[i] = lambda block, t, st: pytest.fail("subset used in training")
    x = torch.randn(3, 4, 4, 64)
    got = net.layers[2].blocks(x)

    x1 = x2 = merged = x.reshape(3, 16, 64)
    for i, blk in zip((2, 3), net.layers[2].blocks):
        torch.testing.assert_close(seen[i], merged, rtol=1e-5, atol=1e-5)  # what the official predictor sees
        m = masks[i]
        x0 = x1 * m + x2 * (1 - m)
        mixed = x0 + blk._attn(blk.norm1(x0.reshape(3, 4, 4, 64))).reshape(3, 16, 64)
        a = mixed * m + x1 * (1 - m)
        b = mixed * (1 - m) + x2 * m
        x1, x2 = mixed + blk.mlp(blk.norm2(a)), mixed + fast(b)
        merged = x1 * m + x2 * (1 - m)                                    # the official end-of-stage merge
    want = merged
    torch.testing.assert_close(got, want.reshape(3, 4, 4, 64), rtol=1e-5, atol=1e-5)
    st = backbones.last_state(net)
    torch.testing.assert_close(st.extra["streams"][0], x1.reshape(3, 4, 4, 64), rtol=1e-5, atol=1e-5)
    assert st.tokens_mlp == [16, 16]
    assert started == [(net, (3, 4, 4, 64))]
    got.sum().backward()                                                  # gradients reach the fast path
    assert fast[1].weight.grad is not None


def test_a_deep_copy_runs_its_own_hooks_on_itself():
    import copy

    net = tiny_swin()
    plan = backbone_of(net).prepare("toy")
    seen = []
    plan.on_start.append(lambda model, x, st: seen.append(model))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin(_x())
    assert seen == [twin] and backbones.last_state(net) is None and backbones.last_state(twin) is not None


def test_eval_at_batch_size_two_uses_the_subset_hook():
    """The official BasicLayer's ``if len(x) == 2`` mistakes a batch of two for the pair of
    streams; here eval mode at batch size 2 runs the split like any other batch size."""
    net = _slow_fast(tiny_swin(), keep=5, fast=None)
    plan = backbones.plan_of(net)
    for i in (2, 3):
        plan.block[i] = two_streams(type(backbone_of(net)), lambda block, t, st: pytest.fail("streams used in eval"))
    with torch.no_grad():
        two = net(_x(2))
        three = net(_x(3))
    torch.testing.assert_close(two, three[:2], rtol=1e-5, atol=1e-5)


def test_final_feature_map_is_the_normalised_last_stage():
    net = tiny_swin()
    with torch.no_grad():
        fmap = backbone_of(net).final_feature_map(net.forward_features(_x()))
        last = net.forward_intermediates(_x(), intermediates_only=True)[-1]  # [B, C, H, W], before the norm
    assert fmap.shape == (2, 4, 128)
    torch.testing.assert_close(fmap, net.norm(last.permute(0, 2, 3, 1)).reshape(2, 4, 128), rtol=0, atol=1e-6)
