"""DynamicViT's journal version (``dynamicvit`` on ConvNeXt): the slow / fast split against a
per-image reference, the non-cumulative keep ratios, the scatter-back, the two-stream training
block and losses against hand computations, dense feature shapes, official checkpoint keys,
a training step, and the ``random`` control."""

from __future__ import annotations

import re

import pytest
import torch

from tokenbench import backbones
from tokenbench.methods._two_streams import enter_streams, two_streams
from tokenbench.checkpoint import load_checkpoint
from tokenbench.errors import UserError
from tokenbench.methods import dynamicvit_hierarchical as hier
from tokenbench.registry import apply, get_method

SIZE = 64  # stage 3: a 4 x 4 map (16 positions), 4 blocks: predictors before blocks 1, 2, 3


def tiny_convnext():
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    net = ConvNeXt(depths=(1, 1, 4, 1), dims=(8, 16, 32, 64), num_classes=10)
    net.pretrained_cfg = {"input_size": (3, SIZE, SIZE)}
    return net.eval()


def _x(n=2, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _randomise(net):
    """Fast paths and predictors that matter (the official init makes the fast path ~0)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith((hier.FAST_ATTR, hier.PREDICTOR_ATTR)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    return net


def _dynamic(keep_rate=0.7):
    return _randomise(apply(tiny_convnext(), "dynamicvit", keep_rate=keep_rate)).eval()


def _ffn(blk, t):
    return blk.mlp(blk.norm(t)) * blk.gamma


# --------------------------------------------------------------------------- inference

def _reference_logits(net, x, keep_rate):
    """One image, one position at a time: predictors on the block's input map, the FFN on the
    int(16 * ratio) best positions of the full map, the fast path on the others."""
    ratios = [keep_rate, keep_rate - 0.2, keep_rate - 0.4]
    out = []
    for b in range(x.shape[0]):
        h = net.stem(x[b:b + 1])
        h = net.stages[1](net.stages[0](h))
        h = net.stages[2].downsample(h)
        chosen = None
        for j, blk in enumerate(net.stages[2].blocks):
            tok = h[0].flatten(1).t()                                   # [16, C]
            if j in (1, 2, 3):
                score = net.score_predictor[j - 1](tok[None])[0, :, 0]
                k = int(16 * ratios[j - 1])
                chosen = set(torch.argsort(score, descending=True)[:k].tolist())
            dw = blk.conv_dw(h)[0].flatten(1).t()
            rows = []
            for p in range(16):
                t = dw[p:p + 1]
                if chosen is None or p in chosen:
                    rows.append(_ffn(blk, t))
                else:
                    rows.append(net.fast_paths[str(j)](t))
            h = h + torch.cat(rows).t().reshape(1, -1, 4, 4)
        h = net.stages[3](h)
        out.append(net.forward_head(h))
    return torch.cat(out)


@pytest.mark.parametrize("keep_rate", [0.7, 0.9])
def test_slow_fast_split_equals_a_per_image_reference(keep_rate):
    net, x = _dynamic(keep_rate), _x(3)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference_logits(net, x, keep_rate), rtol=1e-4, atol=1e-5)


def test_keep_ratios_are_fractions_of_the_whole_map():
    """Non-cumulative: predictor s keeps int(N * ratio_s) of all N positions, in Python floats."""
    assert hier.keep_counts(196, 0.7) == [137, 97, 58]       # 0.7 - 0.2 = 0.49999999999999994
    assert hier.keep_counts(196, 0.9) == [176, 137, 98]
    assert hier.predictor_blocks(9) == [1, 2, 3] and hier.predictor_blocks(27) == [3, 6, 9]
    assert hier.predictor_blocks(6) == [1, 2, 3] and hier.predictor_blocks(18) == [2, 4, 6]
    for keep_rate, want in ((0.7, [16, 11, 7, 4]), (0.9, [16, 14, 11, 8])):
        net = _dynamic(keep_rate)
        with torch.no_grad():
            net(_x())
        tokens_mlp = backbones.last_state(net).tokens_mlp
        assert tokens_mlp[2:6] == want                          # stage-3 blocks 0..3 (block 0 dense)
        assert get_method("dynamicvit")().expected_tokens(net, keep_rate=keep_rate)[1][2:6] == want


def test_each_predictor_selects_afresh_from_the_full_map():
    net = _dynamic(0.7)
    seen = []
    choose = hier._predictor_choice

    def spy(s, tokens, st, k):
        idx = choose(s, tokens, st, k)
        seen.append((tokens.shape[1], set(idx[0].tolist())))
        return idx

    hier._predictor_choice = spy
    try:
        net = _dynamic(0.7)
        with torch.no_grad():
            net(_x(1, seed=5))
    finally:
        hier._predictor_choice = choose
    assert [n for n, _ in seen] == [16, 16, 16]
    assert [len(c) for _, c in seen] == [11, 7, 4]


def test_scatter_back_keeps_the_map_and_gives_fast_path_plus_residual():
    net = _dynamic(0.7)
    blk = net.stages[2].blocks[2]
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([[0, 5, 9, 15, 3, 7, 8], [1, 2, 3, 4, 5, 6, 14]])
    st = backbones.TokenState(0)
    st.extra.update({"hier_choice": idx, "hier_fast": net.fast_paths})
    hook = backbones.plan_of(net).subset[2 + 2]                  # stage 3 starts at global block 2
    with torch.no_grad():
        got = backbones.run_on_subset(lambda t: _ffn(blk, t), blk.conv_dw(x).flatten(2).transpose(1, 2),
                                      *hook(blk, None, st))
        out = blk(x)
    assert out.shape == x.shape
    dw = blk.conv_dw(x).flatten(2).transpose(1, 2).detach()
    for b in range(2):
        for p in range(16):
            want = _ffn(blk, dw[b, p]) if p in idx[b].tolist() else net.fast_paths["2"](dw[b, p])
            torch.testing.assert_close(got[b, p], want.detach(), rtol=1e-5, atol=1e-6)


def test_dense_prediction_shapes_equal_the_dense_model():
    from timm.models._features import FeatureListNet

    ref, net = tiny_convnext(), _dynamic(0.7)
    x = _x()
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        net.train(mode == "train")
        with torch.no_grad():
            got = net.forward_intermediates(x, intermediates_only=True)
            want = ref.forward_intermediates(x, intermediates_only=True)
        assert [t.shape for t in got] == [t.shape for t in want]
    net.eval()
    feats = FeatureListNet(net, out_indices=(0, 1, 2, 3), flatten_sequential=True)
    with torch.no_grad():
        assert [t.shape for t in feats(x)] == [t.shape for t in want]
        assert backbones.last_state(net).tokens_mlp[2:6] == [16, 11, 7, 4]   # reduced inside features_only


# --------------------------------------------------------------------------- training

def test_two_stream_block_is_the_official_form():
    """One adaptive block in training with a fixed mask, against the official ``AdaBlock``
    formula written out here."""
    net = _dynamic(0.7).train()
    blk = net.stages[2].blocks[2]
    g = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 32, 4, 4, generator=g)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    fast = net.fast_paths["2"]
    st = backbones.TokenState(0)
    st.extra["streams"] = (x1, x2, x1 * mask + x2 * (1 - mask))
    assert enter_streams(st, st.extra["streams"][2])[0] is x1
    plan = backbones.plan_of(net)
    old = plan.block[4]
    plan.block[4] = two_streams(type(backbones.backbone_of(net)), lambda block, t, s: (mask.flatten(2).transpose(1, 2), fast))
    backbones.base.surgery_of(net).state = st       # continue this forward at block 4
    st.block = 3
    try:
        with torch.no_grad():
            merged = blk(st.extra["streams"][2])
    finally:
        plan.block[4] = old

    def lastdim(f, t):  # the official permute to (N, H, W, C) and back
        return f(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with torch.no_grad():
        d = blk.conv_dw(x1 * mask + x2 * (1 - mask))
        a = d * mask + x1 * (1 - mask)
        b = d * (1 - mask) + x2 * mask
        y1 = x1 + lastdim(lambda t: _ffn(blk, t), a)
        y2 = x2 + lastdim(fast, b)
    torch.testing.assert_close(merged, y1 * mask + y2 * (1 - mask), rtol=1e-5, atol=1e-6)
    y1_got, y2_got, _ = st.extra["streams"]
    torch.testing.assert_close(y1_got, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y2_got, y2, rtol=1e-5, atol=1e-6)


def _loss_fn(net, teacher, **weights):
    return get_method("dynamicvit")().train_setup(net, teacher, {"keep_rate": 0.7}, weights or None)


def test_training_losses_against_a_hand_computation():
    net, teacher = _dynamic(0.7).train(), tiny_convnext()
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = _loss_fn(net, teacher)
    x, y = _x(3), torch.tensor([1, 4, 7])
    torch.manual_seed(11)
    loss, logits, metrics = loss_fn(net, x, y)
    torch.manual_seed(11)  # the same Gumbel draws
    feats = net.forward_features(x)
    s_logits = net.forward_head(feats)
    decisions = backbones.last_state(net).extra["hier_decisions"]
    s_map = net.head.norm(feats).flatten(2).transpose(1, 2)
    with torch.no_grad():
        t_feats = teacher.forward_features(x)
        t_logits = teacher.forward_head(t_feats)
        t_map = teacher.head.norm(t_feats).flatten(2).transpose(1, 2)
    logp = s_logits.log_softmax(-1)
    ce = sum(-(0.9 * logp[i, y[i]] + 0.1 * logp[i].mean()) for i in range(3)) / 3
    ratios = [0.7, 0.7 - 0.2, 0.7 - 0.4]
    ratio = sum(sum((float(d[b].detach().sum()) / 16 - r) ** 2 for b in range(3)) / 3 for d, r in zip(decisions, ratios)) / 3
    pt = t_logits.softmax(-1)
    kl = (pt * (pt.log() - logp)).sum() / 3
    mse = ((s_map - t_map) ** 2).sum() / s_map.numel()
    want = ce + 10 * ratio + 0.5 * kl + 0.5 * mse
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, s_logits, rtol=0, atol=0)
    assert metrics["ratio_loss"] == pytest.approx(ratio, rel=1e-5)
    assert len(decisions) == 3 and all(d.shape == (3, 16, 1) for d in decisions)


def test_a_training_step_reaches_the_predictors_and_fast_paths():
    net, teacher = _dynamic(0.7).train(), tiny_convnext()
    loss_fn = _loss_fn(net, teacher)
    loss, _, _ = loss_fn(net, _x(2), torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith((hier.PREDICTOR_ATTR, hier.FAST_ATTR)) and name.endswith("fc.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.score_predictor[0].in_conv[1].weight.grad.abs().sum() > 0


def test_param_groups_as_the_official():
    net = _dynamic(0.7)
    groups = get_method("dynamicvit")().param_groups(net, 0.05)
    by = {(g["lr_scale"], g["fix_epochs"], g["weight_decay"]): len(g["params"]) for g in groups}
    new = sum(n for (sc, fx, _), n in by.items() if sc == 1.0 and fx == 0)
    assert new == sum(1 for k, _ in net.named_parameters() if k.startswith((hier.FAST_ATTR, hier.PREDICTOR_ATTR)))
    assert {(sc, fx) for sc, fx, _ in by} == {(1.0, 0), (0.2, 5)}


# --------------------------------------------------------------------------- official checkpoints

def _to_official(sd: dict) -> dict:
    """Our state dict in the official AdaConvNeXt layout (the inverse mapping, written here)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            k = "downsample_layers.0." + k[5:]
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k)
        if m:
            leaf = m.group(3).replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
            k = f"stages.{m.group(1)}.{m.group(2)}.{leaf}"
        m = re.match(r"^fast_paths\.(\d+)\.(norm|fc|gamma)(.*)$", k)
        if m:
            k = f"stages.2.{m.group(1)}." + {"norm": "fast_path.0", "fc": "fast_path.1", "gamma": "fast_path_gamma"}[
                m.group(2)] + m.group(3)
        if k.startswith("score_predictor.") and v.ndim == 2:
            v = v[..., None, None]                                     # official 1x1 convolutions
        k = {"head.norm.weight": "norm.weight", "head.norm.bias": "norm.bias",
             "head.fc.weight": "head.weight", "head.fc.bias": "head.bias"}.get(k, k)
        out[k] = v.clone()
    return out


def test_official_keys_load(tmp_path):
    src = _dynamic(0.7)
    official = _to_official(src.state_dict())
    assert "downsample_layers.0.0.weight" in official and "stages.2.3.fast_path_gamma" in official
    assert official["score_predictor.0.in_conv.1.weight"].ndim == 4
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    dst = apply(tiny_convnext(), "dynamicvit", keep_rate=0.7).eval()
    info = load_checkpoint(dst, path)
    assert info["learned_parts_in_checkpoint"]
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_official_keys_load_from_the_cli(tmp_path, cli):
    import timm

    torch.manual_seed(0)
    net = apply(timm.create_model("convnext_atto"), "dynamicvit", keep_rate=0.7)
    path = tmp_path / "official.pth"
    torch.save({"model": _to_official(net.state_dict())}, path)
    code, out, err = cli("flops", "convnext_atto", "--method", "dynamicvit", "--set", "keep_rate=0.7",
                         "--checkpoint", str(path), "--json")
    assert code == 0, err
    assert '"learned_parts": "trained"' in out


# --------------------------------------------------------------------------- refusals, random

def test_refusals_are_one_line():
    with pytest.raises(UserError, match="keep_rate > 0.4"):
        apply(tiny_convnext(), "dynamicvit", keep_rate=0.4)
    with pytest.raises(UserError, match="tome does not apply to convnext"):
        apply(tiny_convnext(), "tome")
    from timm.models.convnext import ConvNeXt

    shallow = ConvNeXt(depths=(1, 1, 3, 1), dims=(8, 16, 32, 64), num_classes=10)
    with pytest.raises(UserError, match="at least 4 blocks"):
        apply(shallow, "dynamicvit")


def test_random_uses_the_same_sites_ratios_and_fast_paths():
    net = apply(tiny_convnext(), "random", keep_rate=0.7, seed=3).eval()
    assert hier.FAST_ATTR in backbones.added_modules(net) and hier.PREDICTOR_ATTR not in backbones.added_modules(net)
    x = _x(3)
    with torch.no_grad():
        with backbones.image_ids(net, torch.arange(3)):
            y = net(x)
        assert backbones.last_state(net).tokens_mlp[2:6] == [16, 11, 7, 4]
        with backbones.image_ids(net, torch.tensor([2])):
            torch.testing.assert_close(net(x[2:]), y[2:], rtol=1e-5, atol=1e-6)   # per image, not per batch
    assert get_method("random")().expected_tokens(net, keep_rate=0.7)[1][2:6] == [16, 11, 7, 4]


# --------------------------------------------------------------------------- Swin

def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)  # stage 3: an 8 x 8 map (64 positions), 4 blocks, windows of 4
    return SwinTransformer(img_size=64, patch_size=2, embed_dim=16, depths=(1, 1, 4, 1), num_heads=(1, 1, 2, 2),
                           window_size=4, num_classes=10, drop_path_rate=0.0).eval()


def _swin_x(n=2, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _swin_reference_logits(net, x, keep_rate):
    """One image, one position at a time, written from the official ``AdaSwinTransformerBlock``."""
    ratios = [keep_rate, keep_rate - 0.2, keep_rate - 0.4]
    out = []
    for b in range(x.shape[0]):
        h = net.layers[1](net.layers[0](net.patch_embed(x[b:b + 1])))
        h = net.layers[2].downsample(h)                                     # [1, 8, 8, C]
        chosen = None
        for j, blk in enumerate(net.layers[2].blocks):
            if j in (1, 2, 3):
                score = net.score_predictor[j - 1](h.reshape(1, 64, -1))[0, :, 0]
                chosen = set(torch.argsort(score, descending=True)[:int(64 * ratios[j - 1])].tolist())
            h = (h + blk._attn(blk.norm1(h))).reshape(64, -1)
            rows = [blk.mlp(blk.norm2(h[p:p + 1])) if chosen is None or p in chosen
                    else net.fast_paths[str(j)](h[p:p + 1]) for p in range(64)]
            h = (h + torch.cat(rows)).reshape(1, 8, 8, -1)
        out.append(net.forward_head(net.norm(net.layers[3](h))))
    return torch.cat(out)


def test_swin_slow_fast_split_equals_a_per_image_reference():
    net = _randomise(apply(tiny_swin(), "dynamicvit", keep_rate=0.7)).eval()
    assert hier.FAMILY["swin"]["layer_scale"] is None and net.fast_paths["1"].gamma is None   # fastMlp: no layer scale
    x = _swin_x(3)
    with torch.no_grad():
        y = net(x)
        assert backbones.last_state(net).tokens_mlp[2:6] == [64, 44, 31, 19]   # int(64 * 0.49999...) = 31
        torch.testing.assert_close(y, _swin_reference_logits(net, x, 0.7), rtol=1e-4, atol=1e-5)


def test_swin_official_extra_keys_load_and_a_training_step(tmp_path):
    src = _randomise(apply(tiny_swin(), "dynamicvit", keep_rate=0.7)).eval()
    official = {}
    for k, v in src.state_dict().items():   # the official DynamicSwin names of the extra keys
        m = re.match(r"^fast_paths\.(\d+)\.(norm|fc)\.(weight|bias)$", k)
        if m:
            k = f"layers.2.blocks.{m.group(1)}.fastmlp.fc1.{'0' if m.group(2) == 'norm' else '1'}.{m.group(3)}"
        elif k.startswith("score_predictor."):
            k = "layers.2." + k
        official[k] = v.clone()
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    dst = apply(tiny_swin(), "dynamicvit", keep_rate=0.7).eval()
    load_checkpoint(dst, path)
    x = _swin_x()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    dst.train()
    loss, _, metrics = _loss_fn(dst, tiny_swin())(dst, x, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and len([k for k in metrics if k.startswith("keep_frac_s")]) == 3
    assert dst.score_predictor[2].in_conv[1].weight.grad.abs().sum() > 0
    assert dst.fast_paths["3"].fc.weight.grad.abs().sum() > 0


def test_matched_flops_search_stays_above_the_refused_keep_rates():
    # keep_rate <= 0.4 is refused on hierarchical models: the bisection starts where it is valid
    from tokenbench.sweep.search import FlopsSearch

    def cnt(v):
        if v <= 0.4:
            raise UserError("random on hierarchical models needs keep_rate > 0.4")
        return 10.0 * v

    counted = {}
    FlopsSearch(None)._bisect(get_method("random"), "keep_rate", 8.2, cnt, counted, close=0.01)
    values = [v for v, _ in counted.values()]
    assert 0.4 < min(values) <= 0.5 and any(abs(g - 8.2) <= 0.01 for _, g in counted.values()), counted
